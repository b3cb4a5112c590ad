"""TEST DOUBLE for ``globus_compute_sdk.Executor`` (Globus's cloud cannot be reached here).

It stands at the SDK boundary only: ``submit(fn, *args)`` packs the task as the SDK does (its
ComputeSerializer, a messagepack Task), hands it to a real endpoint engine from
globus-compute-endpoint running in this process (what the endpoint on a login node would run),
and gives back a future that gets a ``task_id`` and, once the engine's result comes, the
function's return value (or its exception), as a ComputeFuture does.
"""

from __future__ import annotations

import concurrent.futures
import uuid

from globus_compute_common import messagepack
from globus_compute_endpoint.engines import GCFuture
from globus_compute_sdk.serialize import ComputeSerializer


class StandInExecutor:
    def __init__(self, engine, *, endpoint_id: str):
        self.engine, self.endpoint_id = engine, endpoint_id
        self.serde = ComputeSerializer()
        self.submitted: list[concurrent.futures.Future] = []
        self.shut_down = False

    def submit(self, fn, *args, **kwargs) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.task_id = str(uuid.uuid4())
        body = self.serde.pack_buffers(
            [self.serde.serialize(fn), self.serde.serialize(args), self.serde.serialize(kwargs)]
        )
        packed = messagepack.pack(
            messagepack.message_types.Task(task_id=uuid.UUID(future.task_id), task_buffer=body)
        )
        engine_future = GCFuture(uuid.UUID(future.task_id))
        engine_future.add_done_callback(lambda f: self._deliver(f, future))
        future.set_running_or_notify_cancel()
        self.engine.submit(engine_future, packed, resource_specification={})
        self.submitted.append(future)
        return future

    def _deliver(self, engine_future, future) -> None:
        try:
            result = messagepack.unpack(engine_future.result())
            if result.is_error:
                future.set_exception(RuntimeError(result.data))
            else:
                future.set_result(self.serde.deserialize(result.data))
        except Exception as exc:  # the engine failed the task itself
            future.set_exception(exc)

    def shutdown(self, wait=True, *, cancel_futures=False) -> None:
        self.shut_down = True


def start_engine(kind: str, run_dir: str):
    """A real endpoint engine, started as the endpoint starts it."""
    from globus_compute_endpoint import engines

    engine = getattr(engines, kind)(max_workers=2)
    engine.start(endpoint_id=uuid.uuid4(), run_dir=run_dir)
    return engine
