"""Shadow versions: a second version of a model predicts every request after its response has gone.

``SHADOW_VERSIONS='{"digits": "1.1.0"}'`` loads that version beside the primary one (the registry's
``shadows``). Once a prediction's response is sent, its job (the decoded request, the parameters)
goes to a bounded queue; one low-priority thread per worker runs the endpoint's own ``run`` with the
shadow model and tells the observers (the monitoring logs the result in ``shadow_predictions``;
``GET /v1/monitoring/shadow`` compares the two versions).

Clients never see it, and it only takes time the worker would otherwise spend idle: a shadow job
starts only when no prediction has been in progress in this worker for ``SHADOW_QUIET_S``. Running
it beside the requests instead cost them 1.7x their median latency on two cores (the shadow doubles
the CPU work, and the GIL is shared; ``bench/shadow.py``). Under sustained load the queue fills and
further requests are not shadowed; the drops are counted (``shadow_dropped_total``), so the shadow
report is a sample of the quieter moments then. The queue is bounded in requests (``SHADOW_QUEUE``)
and in the bytes of their inputs (``SHADOW_QUEUE_BYTES``): a few large uploads fill it as surely as
many small ones.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

from app.core.events import Observers
from app.core.execution import lower_priority, run_to_end
from app.core.limits import SHADOW_QUEUE, SHADOW_QUEUE_BYTES

if TYPE_CHECKING:
    from app.core.pipeline import Endpoint, Job
    from app.core.registry import ModelRegistry

log = logging.getLogger("app.shadow")
SHADOW_NICE = 5  # below every request gate: the shadow only takes CPU that requests leave
SHADOW_QUIET_S = 0.005  # no prediction in progress for this long: the worker is idle, the shadow may run


JSON_MEMORY_FACTOR = 8  # memory of parsed JSON values, per byte of the JSON text, roughly


def job_bytes(job: Job) -> int:
    """The memory a queued job keeps, roughly: its uploaded files, or its parsed JSON values."""
    files = sum(len(i.data) for i in job.instances if i.data is not None)
    parsed = any(i.data is None for i in job.instances)
    return files + (JSON_MEMORY_FACTOR * job.body_bytes if parsed else 0)


class ShadowRunner:
    def __init__(self, registry: ModelRegistry, observers: Observers, *, queue_size: int = SHADOW_QUEUE,
                 queue_bytes: int = SHADOW_QUEUE_BYTES) -> None:
        self.registry = registry
        self.observers = observers
        self._queue: queue.Queue[tuple[Endpoint, Job, str, int] | None] = queue.Queue(queue_size)
        self.queue_bytes = queue_bytes
        self._bytes = 0  # inputs of the queued jobs
        self._bytes_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._quiet = threading.Condition()
        self._in_progress = 0  # predictions being served by this worker
        self._last_activity = 0.0
        self.done = 0

    @property
    def active(self) -> bool:
        return bool(getattr(self.registry, "shadows", None))

    def start(self) -> None:
        if self.active and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        if self._thread is None:
            return
        try:
            self._queue.put_nowait(None)
        except queue.Full:  # the thread is a daemon: what it has not done is lost with the process
            pass
        self._thread.join(timeout)
        self._thread = None

    def request_started(self) -> None:
        with self._quiet:
            self._in_progress += 1

    def request_finished(self) -> None:
        with self._quiet:
            self._in_progress -= 1
            self._last_activity = time.monotonic()
            if self._in_progress == 0:
                self._quiet.notify_all()

    def _wait_until_idle(self) -> None:
        with self._quiet:
            while True:
                if self._in_progress == 0:
                    quiet_for = time.monotonic() - self._last_activity
                    if quiet_for >= SHADOW_QUIET_S:
                        return
                    self._quiet.wait(SHADOW_QUIET_S - quiet_for)
                else:
                    self._quiet.wait(0.1)

    def submit(self, endpoint: Endpoint, job: Job, request_id: str) -> None:
        """Queue a served request for the shadow version of its model, if there is one."""
        if endpoint.model is None or self.registry.shadow(endpoint.model) is None or self._thread is None:
            return
        size = job_bytes(job)
        with self._bytes_lock:
            if self._bytes + size > self.queue_bytes:
                self.observers.shadow_dropped(endpoint.model, "queue-full")
                return
            self._bytes += size
        try:
            self._queue.put_nowait((endpoint, job, request_id, size))
        except queue.Full:
            self._release(size)
            self.observers.shadow_dropped(endpoint.model, "queue-full")

    def _release(self, size: int) -> None:
        with self._bytes_lock:
            self._bytes -= size

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every queued request has been shadowed (tests and benches)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def _run(self) -> None:
        from app.core.pipeline import Timing

        lower_priority(SHADOW_NICE)
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                endpoint, job, request_id, size = item
                self._wait_until_idle()
                model = self.registry.shadow(endpoint.model or "")
                if model is None:
                    continue
                # The same decoded request, the shadow model; the arrays, not encoded files
                # (a segmentation's mask PNG), since nobody reads the answer.
                shadow_job = dataclasses.replace(job, model=model, timing=Timing(),
                                                 tensors=frozenset({"mask"}), store_inputs=False)
                started = time.perf_counter()
                try:
                    outcome = run_to_end(endpoint.run, shadow_job)
                except Exception as exc:  # the shadow version refusing an input is worth knowing
                    self.observers.shadow_dropped(model.task, "error")
                    log.warning("shadow prediction failed", extra={
                        "model": model.task, "version": model.version, "request_id": request_id,
                        "error": f"{type(exc).__name__}: {exc}"[:300]})
                    continue
                latency_ms = (time.perf_counter() - started) * 1000.0
                self.observers.shadow(request_id, model.task, model.version, outcome.log_rows, latency_ms)
                self.done += 1
            finally:
                if item is not None:
                    self._release(item[3])
                self._queue.task_done()
