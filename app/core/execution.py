"""Where request work runs: a deadline per request, admission gates per kind of work, thread pools.

Every prediction runs through an :meth:`Execution.ticket` (see app.core.pipeline):

* **Admission.** Work belongs to a :class:`Gate` (``light``: digits and clustering rows; ``audio``:
  emotion; ``heavy``: segmentation, fits and palettes). A gate runs at most ``concurrency`` jobs at
  once on its own thread pool and lets at most ``queue`` more wait; beyond that a request is refused
  at once with a 503 problem and ``Retry-After``, instead of piling up towards the router's 30 s
  timeout. It is also refused at once when the jobs ahead of it would, at the gate's recent pace
  (a moving average of its job times), take longer than the request has left: waiting only to
  time out helps nobody. A heavy request therefore never takes the threads that light requests run on, and heavy
  threads run at a lower CPU priority (``nice``), so light requests keep their latency while one
  runs. ``/health/ready`` reports a gate whose queue is full as saturated.
* **Deadline.** Each request gets ``REQUEST_TIMEOUT_S`` (under gunicorn's timeout and Heroku's
  30 s). Long work calls :func:`checkpoint` between its steps (tiles, audio blocks, k-means fits);
  once the deadline has passed, or the client has gone away, the next checkpoint raises
  :class:`Cancelled`, the thread is free again within one step, and the client gets a 503.
  Waiting in a gate's queue counts against the same deadline.

The current deadline travels in a context variable, which the thread pools copy into their threads,
so code deep inside a task (a tile loop) reaches it without being passed anything.

* **Inline.** A job an endpoint marks ``inline`` (a digit) runs on the event loop itself, not on the
  gate's thread: for sub-millisecond work the two thread hand-offs cost more than the job. Once the
  job knows its size (the image headers), it calls :func:`inline_budget`; beyond
  ``INLINE_MAX_PIXELS`` / ``INLINE_MAX_INSTANCES`` that raises :class:`Offload` and the job starts
  again on the gate's thread, so a large photo or a batch never blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import Request

from app.core.errors import ProblemError
from app.core.limits import INLINE_MAX_INSTANCES, INLINE_MAX_PIXELS, QUEUE_MAX_WAIT_S

log = logging.getLogger("app.execution")
T = TypeVar("T")

_deadline: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("deadline", default=None)
_inline: contextvars.ContextVar[bool] = contextvars.ContextVar("inline", default=False)


class Cancelled(Exception):
    """Raised at a checkpoint once the request's deadline has passed or its client has gone."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Deadline:
    """When a request's work must stop; ``cancel`` stops it early (the client went away)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expires_at = time.monotonic() + seconds
        self.reason: str | None = None

    def remaining(self) -> float:
        return max(0.0, self.expires_at - time.monotonic())

    def cancel(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def check(self) -> None:
        if self.reason is None and time.monotonic() >= self.expires_at:
            self.reason = "deadline"
        if self.reason is not None:
            raise Cancelled(self.reason)


def checkpoint() -> None:
    """Stop here (raise :class:`Cancelled`) if the current request is past its deadline or gone."""
    deadline = _deadline.get()
    if deadline is not None:
        deadline.check()


class Offload(Exception):
    """Raised by :func:`inline_budget`: this job is too large for the event loop."""


def inline_budget(pixels: int = 0, instances: int = 1) -> None:
    """Call once a job's size is known, before the work that grows with it: running on the event
    loop (an ``inline`` endpoint) and over the inline budget, raise :class:`Offload` so the job
    starts again on its gate's thread. Anywhere else this does nothing."""
    if _inline.get() and (pixels > INLINE_MAX_PIXELS or instances > INLINE_MAX_INSTANCES):
        raise Offload()


def deadline_problem(seconds: float) -> ProblemError:
    return ProblemError(503, "deadline-exceeded",
                        f"The request did not finish within {seconds:g} s (REQUEST_TIMEOUT_S) and was "
                        "stopped; send less work per request or retry later.",
                        headers={"Retry-After": "5"}, timeout_s=seconds)


@dataclass(frozen=True)
class GateSpec:
    name: str
    concurrency: int
    queue: int
    nice: int  # CPU priority of the gate's threads: 0 normal, higher is lower priority
    description: str


def _lower_priority(nice: int) -> None:
    """Thread initializer: on Linux each thread has its own nice value."""
    if nice > 0 and hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError:  # not permitted here; the gate still bounds the work
            pass


class Gate:
    """At most ``concurrency`` jobs running and ``queue`` waiting; anything more is a 503 now."""

    def __init__(self, spec: GateSpec, deadline_s: float) -> None:
        self.spec = spec
        self.deadline_s = deadline_s  # a request's whole deadline (REQUEST_TIMEOUT_S)
        self.executor = ThreadPoolExecutor(max_workers=spec.concurrency,
                                           thread_name_prefix=f"gate-{spec.name}",
                                           initializer=_lower_priority, initargs=(spec.nice,))
        self._semaphore: asyncio.Semaphore | None = None
        self.running = 0
        self.waiting = 0
        self.refused = 0
        self.job_seconds = 0.0  # exponential moving average of recent job times
        self.started: dict[int, float] = {}  # start times of the running jobs

    def record(self, seconds: float) -> None:
        self.job_seconds = seconds if self.job_seconds == 0.0 else 0.7 * self.job_seconds + 0.3 * seconds

    def pace(self) -> float:
        """Seconds a job here takes, as far as we know: the recent average, or longer when a job
        still running has already taken longer (the first heavy jobs have no history)."""
        now = time.monotonic()
        return max([self.job_seconds, *(now - t for t in self.started.values())])

    def expected_wait(self) -> float:
        """Rough seconds before a new job would start: the queue ahead of it, then itself."""
        # ``waiting`` also counts requests still reading their bodies while a slot is free.
        ahead = self.running + self.waiting - self.spec.concurrency + 1
        return max(0, ahead) * self.pace() / self.spec.concurrency

    def refusal(self, remaining: float) -> str | None:
        """Why a new job with ``remaining`` seconds of deadline would be refused now, if it would."""
        if self.running < self.spec.concurrency and not self.waiting:
            return None
        if self.waiting >= self.spec.queue:
            return "the most this worker queues"
        wait = self.expected_wait()
        if wait > QUEUE_MAX_WAIT_S:
            return f"about {wait:.0f} s of work ahead, more than it keeps a client waiting"
        if wait + self.pace() > remaining:
            return f"about {wait:.0f} s of work ahead, more than the request's deadline"
        return None

    @property
    def saturated(self) -> bool:
        """A new job with a whole deadline ahead would be refused."""
        return self.refusal(self.deadline_s) is not None

    def _sem(self) -> asyncio.Semaphore:
        if self._semaphore is None:  # created on the worker's event loop, after the fork
            self._semaphore = asyncio.Semaphore(self.spec.concurrency)
        return self._semaphore

    def enter(self, deadline: Deadline) -> None:
        """Take a place in the queue, or refuse at once (503) when there is none worth having."""
        why = self.refusal(deadline.remaining())
        if why is not None:
            wait = self.expected_wait()
            self.refused += 1
            raise ProblemError(
                503, "overloaded",
                f"The server is busy with {self.spec.description} ({self.running} running, "
                f"{self.waiting} waiting: {why}); retry shortly.",
                headers={"Retry-After": str(max(1, min(30, round(wait or 2))))},
                gate=self.spec.name)
        self.waiting += 1

    def leave(self) -> None:
        """Give the queue place back without having run (the request failed before its work)."""
        self.waiting -= 1

    async def start(self, deadline: Deadline) -> None:
        """Wait for a free slot (holding a queue place from :meth:`enter`)."""
        semaphore = self._sem()
        try:
            if not semaphore.locked():  # a free slot: take it now (no timer, no task)
                await semaphore.acquire()
            else:
                await self._wait_for_slot(semaphore, deadline)
        finally:
            self.waiting -= 1
        self.running += 1

    async def _wait_for_slot(self, semaphore: asyncio.Semaphore, deadline: Deadline) -> None:
        """Wait in short steps: once the jobs ahead show that this one could not finish before its
        deadline, give up at once instead of waiting to fail."""
        while True:
            if self.pace() >= deadline.remaining():
                raise deadline_problem(deadline.seconds)
            try:
                await asyncio.wait_for(semaphore.acquire(), timeout=min(0.25, deadline.remaining()))
                return
            except TimeoutError:
                continue

    def release(self) -> None:
        self.running -= 1
        self._sem().release()

    def status(self) -> dict[str, Any]:
        return {"running": self.running, "waiting": self.waiting,
                "concurrency": self.spec.concurrency, "queue": self.spec.queue,
                "saturated": self.saturated}

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


async def _client_gone(request: Request) -> None:
    """Return once the client disconnects. Only called after the body has been read: from then on
    the server's ``receive`` has nothing to hand out but ``http.disconnect``."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class Execution:
    """The gates of one worker process (built in the lifespan, after the fork)."""

    def __init__(self, specs: list[GateSpec], timeout_s: float) -> None:
        self.gates = {spec.name: Gate(spec, timeout_s) for spec in specs}
        self.timeout_s = timeout_s

    def deadline(self, request: Request) -> Deadline:
        """The request's deadline, started when its first byte arrived (set by the middleware)."""
        state = request.scope.setdefault("state", {})
        deadline = state.get("deadline")
        if deadline is None:
            deadline = state["deadline"] = Deadline(self.timeout_s)
        return deadline

    def ticket(self, request: Request, gate_name: str) -> Ticket:
        """A place in the gate's queue, taken (or refused with a 503) before the request's body is
        read, so a full worker refuses without reading uploads it would never process."""
        return Ticket(self, request, self.gates[gate_name])

    def status(self) -> dict[str, dict[str, Any]]:
        return {name: gate.status() for name, gate in self.gates.items()}

    @property
    def saturated(self) -> list[str]:
        return sorted(name for name, gate in self.gates.items() if gate.saturated)

    def shutdown(self) -> None:
        for gate in self.gates.values():
            gate.shutdown()


class Ticket:
    """``async with execution.ticket(request, "heavy") as ticket: ... await ticket.run(fn, job)``"""

    def __init__(self, execution: Execution, request: Request, gate: Gate) -> None:
        self.request = request
        self.gate = gate
        self.deadline = execution.deadline(request)
        self._state = "new"

    async def __aenter__(self) -> Ticket:
        if self.deadline.remaining() <= 0:
            raise deadline_problem(self.deadline.seconds)
        self.gate.enter(self.deadline)
        self._state = "queued"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._state == "queued":
            self.gate.leave()
        elif self._state == "running":
            self.gate.release()
        self._state = "done"

    async def run(self, fn: Callable[..., T], *args: Any, inline: bool = False) -> T:
        """``fn(*args)`` on the gate's thread (or, ``inline``, on the event loop while it stays within
        :func:`inline_budget`) within the request's deadline; its result, or a 503 problem."""
        gate, deadline, request = self.gate, self.deadline, self.request
        self._state = "starting"
        try:
            await gate.start(deadline)
        except BaseException:
            self._state = "done"  # start() gave the queue place back
            raise
        self._state = "running"
        if gate.pace() >= deadline.remaining():
            # It waited its turn, but at the gate's recent pace it could not finish in time.
            raise deadline_problem(deadline.seconds)
        if inline:
            done, result = self._run_inline(fn, *args)
            if done:
                return result
        context = contextvars.copy_context()
        context.run(_deadline.set, deadline)
        loop = asyncio.get_running_loop()
        token = object()
        started = gate.started[id(token)] = time.monotonic()

        def finished(future: asyncio.Future) -> None:
            gate.started.pop(id(token), None)
            if not future.cancelled() and future.exception() is None:  # stopped or refused
                gate.record(time.monotonic() - started)  # jobs say nothing about the pace

        job = loop.run_in_executor(gate.executor, functools.partial(context.run, fn, *args))
        job.add_done_callback(finished)
        watcher = asyncio.ensure_future(_client_gone(request))
        try:
            done, _ = await asyncio.wait({job, watcher}, timeout=deadline.remaining(),
                                         return_when=asyncio.FIRST_COMPLETED)
            if job not in done:
                deadline.cancel("client-disconnected" if watcher in done else "deadline")
        finally:
            watcher.cancel()
        try:
            # The thread stops at its next checkpoint; the gate is only released once it has,
            # so the memory and CPU a gate bounds really are bounded.
            return await asyncio.shield(job)
        except Cancelled as exc:
            if exc.reason == "client-disconnected":
                log.info("request stopped: client went away",
                         extra={"request_id": request.scope.get("state", {}).get("request_id")})
            raise deadline_problem(deadline.seconds) from None

    def _run_inline(self, fn: Callable[..., T], *args: Any) -> tuple[bool, T | None]:
        """(True, result) when ``fn`` ran to the end on the event loop; (False, None) when it
        raised :class:`Offload` and must run on the gate's thread instead."""
        started = time.monotonic()
        deadline_token, inline_token = _deadline.set(self.deadline), _inline.set(True)
        try:
            result = fn(*args)
        except Offload:
            return False, None
        except Cancelled:
            raise deadline_problem(self.deadline.seconds) from None
        finally:
            _deadline.reset(deadline_token)
            _inline.reset(inline_token)
        self.gate.record(time.monotonic() - started)
        return True, result


def build_execution(settings: Any) -> Execution:
    """The gates of :data:`app.core.limits.GATES`, the heavy one sized by the settings."""
    from app.core.limits import GATES

    specs = []
    for name, (concurrency, queue, nice, description) in GATES.items():
        if name == "heavy":
            concurrency, queue = settings.heavy_concurrency, settings.heavy_queue
        specs.append(GateSpec(name, concurrency, queue, nice, description))
    return Execution(specs, settings.request_timeout_s)


def execution_of(request: Request) -> Execution:
    return request.app.state.execution
