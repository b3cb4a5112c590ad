"""The per-model queue of held requests: first in first out, bounded, with deadlines."""

from __future__ import annotations

from services.router.holding import Held, ModelQueue
from shared import schema


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def held(request_id: str, *, enqueued: float = 100.0, deadline: float = 200.0) -> Held:
    request = schema.InferRequest(
        request_id=request_id, model="m", endpoint="chat", body=b"{}", reply_to="x", created=0.0
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
    queue = ModelQueue(max_len=10)
    positions = [queue.push(held(r)) for r in ("a", "b", "c")]
    assert positions == [1, 2, 3], "push reports the queue position"
    assert drain(queue) == ["a", "b", "c"]
    assert queue.pop() is None


def test_full_once_max_len_requests_are_held():
    queue = ModelQueue(max_len=2)
    assert not queue.full
    queue.push(held("a"))
    assert not queue.full
    queue.push(held("b"))
    assert queue.full and len(queue) == 2
    queue.pop()
    assert not queue.full


def test_push_front_puts_a_request_back_ahead_of_the_others():
    queue = ModelQueue(max_len=10)
    for r in ("a", "b", "c"):
        queue.push(held(r))
    first = queue.pop()
    queue.push_front(first)  # no worker took it after all
    assert drain(queue) == ["a", "b", "c"]


def test_remove_by_request_id_keeps_the_others_in_order():
    queue = ModelQueue(max_len=10)
    for r in ("a", "b", "c"):
        queue.push(held(r))
    assert queue.remove("b") is True
    assert queue.remove("b") is False
    assert queue.remove("zzz") is False
    assert ids(queue) == ["a", "c"]


def test_expired_returns_and_removes_only_requests_past_their_deadline():
    clock = Clock()
    queue = ModelQueue(max_len=10, clock=clock)
    queue.push(held("late", deadline=105.0))
    queue.push(held("early", deadline=101.0))
    queue.push(held("later", deadline=300.0))
    clock.now = 100.5
    assert queue.expired() == []
    clock.now = 105.0
    assert [h.request.request_id for h in queue.expired()] == ["late", "early"]
    assert ids(queue) == ["later"]
    assert queue.expired() == []


def test_next_deadline_is_the_soonest_one_not_the_first_in_line():
    queue = ModelQueue(max_len=10)
    assert queue.next_deadline() is None
    queue.push(held("a", deadline=50.0))
    queue.push(held("b", deadline=20.0))
    queue.push(held("c", deadline=90.0))
    assert queue.next_deadline() == 20.0
    queue.remove("b")
    assert queue.next_deadline() == 50.0


def test_oldest_wait_is_measured_from_the_head_of_the_queue():
    clock = Clock()
    queue = ModelQueue(max_len=10, clock=clock)
    assert queue.oldest_wait() == 0.0
    queue.push(held("a", enqueued=90.0))
    queue.push(held("b", enqueued=99.0))
    assert queue.oldest_wait() == 10.0


def test_held_request_keeps_its_encoded_bytes_for_forwarding():
    h = held("a")
    assert schema.infer_decoder.decode(h.data) == h.request
