"""The per-model queue of held requests: fair among users, interactive before batch, with
deadlines; re-submissions keep their place, and requests handed back go first."""

from __future__ import annotations

from services.router.holding import Held, ModelQueue
from shared import schema


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def held(
    request_id: str,
    *,
    enqueued: float = 100.0,
    deadline: float = 200.0,
    created: float = 0.0,
    attempt: int = 0,
    user: str = "",
    priority: schema.Priority = "interactive",
) -> Held:
    request = schema.InferRequest(
        request_id=request_id,
        model="m",
        endpoint="chat",
        body=b"{}",
        reply_to="x",
        created=created,
        attempt=attempt,
        identity=schema.Identity(user=user, kind="key") if user else None,
        priority=priority,
    )
    return Held(request=request, data=schema.encode(request), enqueued=enqueued, deadline=deadline)


def ids(queue: ModelQueue) -> list[str]:
    return [h.request.request_id for h in queue.items]


def drain(queue: ModelQueue) -> list[str]:
    out = []
    while (h := queue.pop()) is not None:
        out.append(h.request.request_id)
    return out


def test_requests_leave_in_the_order_they_came():
    queue = ModelQueue()
    positions = [queue.push(held(r)) for r in ("a", "b", "c")]
    assert positions == [1, 2, 3], "push reports the queue position"
    assert drain(queue) == ["a", "b", "c"]
    assert queue.pop() is None


def test_push_front_puts_a_request_back_ahead_of_the_others():
    queue = ModelQueue()
    for r in ("a", "b", "c"):
        queue.push(held(r))
    first = queue.pop()
    queue.push_front(first)  # no worker took it after all
    assert drain(queue) == ["a", "b", "c"]


def test_remove_by_request_id_keeps_the_others_in_order():
    queue = ModelQueue()
    for r in ("a", "b", "c"):
        queue.push(held(r))
    assert queue.remove("b").request.request_id == "b"
    assert queue.remove("b") is None
    assert queue.remove("zzz") is None
    assert ids(queue) == ["a", "c"]


def test_expired_returns_and_removes_only_requests_past_their_deadline():
    clock = Clock()
    queue = ModelQueue(clock=clock)
    queue.push(held("late", deadline=105.0))
    queue.push(held("early", deadline=101.0))
    queue.push(held("later", deadline=300.0))
    clock.now = 100.5
    assert queue.expired() == []
    clock.now = 105.0
    assert [h.request.request_id for h in queue.expired()] == ["late", "early"]
    assert ids(queue) == ["later"]
    assert queue.expired() == []


def test_oldest_wait_is_measured_from_the_head_of_the_queue():
    clock = Clock()
    queue = ModelQueue(clock=clock)
    assert queue.oldest_wait() == 0.0
    queue.push(held("a", enqueued=90.0))
    queue.push(held("b", enqueued=99.0))
    assert queue.oldest_wait() == 10.0


def test_held_request_keeps_its_encoded_bytes_for_forwarding():
    h = held("a")
    assert schema.infer_decoder.decode(h.data) == h.request


def test_a_resubmitted_request_takes_its_place_by_when_it_was_first_sent():
    """Its router died; the caller sent it again. It does not go to the back of another queue."""
    queue = ModelQueue()
    queue.push(held("a", created=1.0))
    queue.push(held("c", created=3.0))
    assert queue.push(held("b", created=2.0, attempt=1)) == 2
    assert queue.push(held("d", created=0.5)) == 4, "a first submission always goes to the back"
    assert drain(queue) == ["a", "b", "c", "d"]


def test_one_users_thousand_requests_do_not_starve_anothers_one():
    queue = ModelQueue()
    for i in range(1000):
        queue.push(held(f"a{i}", user="ann", created=i))
    queue.push(held("b0", user="bob", created=1000))
    assert drain(queue)[:3] == ["a0", "b0", "a1"]


def test_users_take_turns_each_oldest_first():
    queue = ModelQueue()
    for i in range(3):
        for user in ("ann", "bob", "cy"):
            queue.push(held(f"{user}{i}", user=user))
    queue.push(held("ann3", user="ann"))
    assert drain(queue) == ["ann0", "bob0", "cy0", "ann1", "bob1", "cy1", "ann2", "bob2", "cy2", "ann3"]


def test_interactive_requests_go_before_batch_ones():
    queue = ModelQueue()
    for i in range(3):
        queue.push(held(f"batch{i}", user="ann", priority="batch"))
    queue.push(held("chat", user="bob"))
    queue.push(held("chat2", user="ann"))
    assert drain(queue) == ["chat", "chat2", "batch0", "batch1", "batch2"]


def test_a_request_handed_back_goes_first_and_a_resubmission_keeps_its_place():
    queue = ModelQueue()
    queue.push(held("a0", user="ann", created=1))
    queue.push(held("b0", user="bob", created=2))
    back = queue.pop()
    queue.push_front(back)
    queue.push(held("a1", user="ann", created=0.5, attempt=1))  # sent before the others, re-submitted
    assert ids(queue) == ["a0", "a1", "b0"]
    assert drain(queue)[0] == "a0"
