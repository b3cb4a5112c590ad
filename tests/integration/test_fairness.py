"""The queue discipline with the simulator: one worker that runs one request at a time, a real
router, and callers of several users and classes. What a user notices: their one request is not
stuck behind another user's flood, and interactive requests are not stuck behind batch ones."""

from __future__ import annotations

import asyncio

import orjson

from shared import schema
from tests.integration.conftest import make_config
from tests.support import eventually

BODY = orjson.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})


async def test_one_users_flood_and_a_batch_flood_do_not_starve_the_others(services):
    config = make_config(
        [
            {
                "id": "m",
                "capacity": 1,
                "engine": {"kind": "sim", "ttft_ms": 50, "itl_ms": 50, "max_concurrency": 1},
            }
        ],
        router={"queue_timeout_s": 60},
    )
    router = await services.router(config)
    await services.worker(config, "m")
    client = await services.client(request_timeout_s=60)
    finished: list[str] = []

    async def ask(name: str, user: str, priority: schema.Priority = "interactive") -> None:
        who = schema.Identity(user=user, kind="key")
        await client.complete("m", "chat", BODY, request_id=name, identity=who, priority=priority)
        finished.append(name)

    def held(user: str, n: int):  # a request of that user's is dispatched only after all these
        return lambda: sum(h.request.identity.user == user for h in router.queues["m"].items) == n

    tasks = [asyncio.create_task(ask(f"batch{i}", "carol", "batch")) for i in range(10)]
    await eventually(held("carol", 9), interval=0.005, what="the batch queued (one running)")
    tasks += [asyncio.create_task(ask(f"ann{i}", "ann")) for i in range(10)]
    await eventually(held("ann", 10), interval=0.005, what="then ann's flood queued")
    tasks.append(asyncio.create_task(ask("bob", "bob")))
    await asyncio.wait_for(asyncio.gather(*tasks), 60)  # 21 requests of ~0.15 s, one at a time

    # The worker took the first batch request at once; after it, bob waits for one of ann's.
    assert finished.index("bob") <= 2, finished
    # Every interactive request ends before the batch's second (its first may have been running).
    interactive = [i for i, name in enumerate(finished) if not name.startswith("batch")]
    assert max(interactive) < sorted(i for i, n in enumerate(finished) if n.startswith("batch"))[1], finished


async def test_a_session_stays_on_its_worker_while_the_usual_choice_would_move_it(services):
    """Two idle workers tie, and the usual choice takes the first by id; a session that began on
    the second (the first was busy then) goes back to it. Turns come once the router has heard
    the workers are free again (their heartbeats), as a person's next message would."""
    config = make_config(
        [{"id": "m", "capacity": 1, "engine": {"kind": "sim", "ttft_ms": 1, "itl_ms": 1}}],
        router={"queue_timeout_s": 30},
    )
    router = await services.router(config)
    for wid in ("w-a", "w-b"):
        await services.worker(config, "m", worker_id=wid)
    client = await services.client(request_timeout_s=30)

    async def turn(session: str = "") -> str:
        await eventually(
            lambda: all((e := router.registry.get(w)) is not None and e.free == 1 for w in ("w-a", "w-b")),
            what="both workers free",
        )
        return (await client.complete("m", "chat", BODY, session=session)).worker_id

    assert await turn() == "w-a"
    async with client.open("m", "chat", BODY) as busy:  # takes w-a; the session starts on w-b
        assert (await client.complete("m", "chat", BODY, session="conv")).worker_id == "w-b"
        async for _ in busy:
            pass
    assert await turn() == "w-a"  # both idle: the first by id
    assert [await turn("conv") for _ in range(3)] == ["w-b"] * 3
