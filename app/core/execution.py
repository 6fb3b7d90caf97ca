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

* **Model calls in groups.** A job's ``run`` may be a generator that yields its model call as
  ``(function, argument)`` and receives the result (see :class:`ModelCalls`). On a thread the call is
  made at once. On the event loop the calls of every inline job that reached its call in the same
  turn of the loop are made together, after all those jobs' preparation and before any of their
  answers: under load each phase's code and the model's weights stay in the CPU's caches across
  several requests instead of being pushed out by the next request's work. A model whose method is
  marked :func:`batchable` (rows in, rows out, each row's result its own) gets the group's arguments
  as one batch: one call instead of several, the weights read once. Its model must answer a row the
  same in any batch (the task's tests check it on its data), so the answers are the same to the bit
  as alone. A ``big`` job (a body of ``BIG_JOB_BYTES`` or more) makes its calls at once, so its
  memory is freed without waiting.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from starlette.requests import Request

from app.core.errors import ProblemError
from app.core.limits import (
    BIG_JOB_BYTES,
    INLINE_MAX_INSTANCES,
    INLINE_MAX_PIXELS,
    QUEUE_MAX_WAIT_S,
)
from app.core.places import (
    DynoPlaces,
    Place,
    default_count,
    give_back_heap,
    memory_limit_bytes,
)

log = logging.getLogger("app.execution")
T = TypeVar("T")

_deadline: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("deadline", default=None)
_inline: contextvars.ContextVar[bool] = contextvars.ContextVar("inline", default=False)
_job_place: contextvars.ContextVar[JobPlace | None] = contextvars.ContextVar("job_place", default=None)


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


Call = tuple[Callable[[Any], Any], Any]  # a model call a job's steps ask for: (function, argument)
F = TypeVar("F", bound=Callable[..., Any])


def batchable(fn: F) -> F:
    """Mark a model's method as taking a batch of rows (an array, first axis) and answering one
    array with a row per row, each row's answer depending on that row alone and the same in any
    batch: on the event loop, the calls of one turn with arrays of the same row shape and type are
    then made as one call (:class:`ModelCalls`). That call runs in the first request's context, so
    the method must not use the request's (no :func:`checkpoint`, no :func:`memory_budget`)."""
    fn.batchable = True  # type: ignore[attr-defined]
    return fn


def run_to_end(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` to its result here: a generator's model calls are made at once, in turn (a
    call's exception is raised inside the generator, where the call was asked for)."""
    steps = fn(*args)
    if not isinstance(steps, Generator):
        return steps
    try:
        call = next(steps)
        while True:
            try:
                value = call[0](call[1])
            except Exception as exc:
                call = steps.throw(exc)
            else:
                call = steps.send(value)
    except StopIteration as stop:
        return stop.value
    finally:
        steps.close()


_Waiting = tuple[Callable[[Any], Any], Any, asyncio.Future, contextvars.Context]


class ModelCalls:
    """The model calls of the inline jobs of one event loop, made together once per turn.

    :meth:`submit` queues a call and returns a future for its result; the first call of a turn
    schedules :meth:`run`, which the loop runs after the callbacks already due, so every job that
    reaches its call in the same turn joins the group. The calls run in the order they came,
    grouped by function (and, for a :func:`batchable` one, by the row shape and type of their
    arrays), each in its own request's context (its deadline included); a call whose job has gone
    (its future cancelled) is skipped, and an exception fails only its own call. The calls of such
    a subgroup are made as one call on their arrays joined, in the context of the first of them,
    and each gets its own rows of the answer; should that call fail, or answer anything but an
    array with a row per row, each is made alone (and the first such failure of a function is
    logged)."""

    def __init__(self) -> None:
        self._waiting: list[_Waiting] = []
        self.groups = 0  # groups run, and calls made in them: their ratio is the mean group size
        self.calls = 0
        self.batched = 0  # calls answered by a batch they shared with others
        self._unbatchable: set[Any] = set()  # functions whose joined call failed (logged once)

    def submit(self, fn: Callable[[Any], Any], arg: Any, context: contextvars.Context | None = None) -> asyncio.Future:
        """Queue ``fn(arg)``, to be made in ``context`` (a copy of the caller's by default)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append((fn, arg, future, context or contextvars.copy_context()))
        if len(self._waiting) == 1:
            loop.call_soon(self.run)
        return future

    def run(self) -> None:
        waiting, self._waiting = self._waiting, []
        try:
            self.groups += 1
            by_function: dict[Any, list[_Waiting]] = {}
            for item in waiting:  # a model's bound methods are equal, not identical
                by_function.setdefault(_function_key(item[0], item[1]), []).append(item)
            for key, calls in by_function.items():
                live = [call for call in calls if not call[2].done()]
                if len(live) > 1 and isinstance(key, _RowsKey) and self._batch(live):
                    continue
                for call in live:
                    self._one(*call)
        finally:  # whatever stopped the group, no job waits for a call that will not be made
            for _, _, future, _ in waiting:
                if not future.done():
                    future.set_exception(RuntimeError("the model call was not made"))

    def _one(self, fn: Callable[[Any], Any], arg: Any, future: asyncio.Future,
             context: contextvars.Context) -> None:
        self.calls += 1
        try:
            result = context.run(fn, arg)
        except StopIteration as exc:  # a future cannot hold one
            future.set_exception(RuntimeError(f"the model call raised {exc!r}"))
        except Exception as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def _batch(self, calls: list[_Waiting]) -> bool:
        """The calls (arrays of rows of one shape and type: one :class:`_RowsKey`) made as one,
        each answered with its rows; False (nothing answered) when the joined call failed or did
        not answer an array with a row per row."""
        fn, _, _, context = calls[0]
        args = [arg for _, arg, _, _ in calls]
        ends = np.cumsum([len(arg) for arg in args]).tolist()
        try:
            result = context.run(fn, np.concatenate(args))
            if not isinstance(result, np.ndarray) or not result.ndim or len(result) != ends[-1]:
                raise TypeError(f"a batchable call answered {type(result).__name__} "
                                f"{getattr(result, 'shape', '')} for {ends[-1]} rows")
        except Exception:
            key = _function_key(fn, None)
            if key not in self._unbatchable:
                self._unbatchable.add(key)
                log.warning("a batchable model call failed on rows joined; its calls are made alone",
                            exc_info=True, extra={"function": getattr(fn, "__qualname__", repr(fn))})
            return False
        for (_, _, future, _), start, end in zip(calls, [0, *ends], ends, strict=False):
            future.set_result(result[start:end])
        self.calls += len(calls)
        self.batched += len(calls)
        return True

    def status(self) -> dict[str, int]:
        return {"groups": self.groups, "calls": self.calls, "batched": self.batched}


class _RowsKey(tuple):
    """The group of a :func:`batchable` function's calls on arrays of rows of one shape and type:
    the calls that can be joined."""


def _function_key(fn: Callable[[Any], Any], arg: Any) -> Any:
    """What calls group by: the function and, for a :func:`batchable` one given an array of rows,
    the rows' shape and type (a :class:`_RowsKey`: only such calls are joined)."""
    try:
        hash(fn)
    except TypeError:  # an unhashable callable object groups with itself only
        return id(fn)
    if getattr(fn, "batchable", False) and isinstance(arg, np.ndarray) and arg.ndim:
        return _RowsKey((fn, arg.shape[1:], arg.dtype))
    return fn


class JobPlace:
    """The dyno place (:mod:`app.core.places`) one job holds, if any, until the job ends."""

    def __init__(self, places: DynoPlaces, deadline: Deadline) -> None:
        self.places = places
        self.deadline = deadline
        self.place: Place | None = None
        self.declared = 0  # bytes the job has said it decodes

    def release(self) -> None:
        if self.place is not None:
            self.place.release()
            self.place = None

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the job's thread; after a big job, the heap's free pages go back."""
        try:
            return fn(*args)
        finally:
            if self.place is not None:
                give_back_heap()


def memory_budget(nbytes: int) -> None:
    """Call as a job learns how much more it decodes (an image's pixels from its header, a clip's
    samples as they come), before decoding it: once the job's total reaches ``BIG_JOB_BYTES``, it
    takes one of the dyno's places for big jobs, waiting for one like a queued job (503
    ``overloaded`` when none comes free in time). On the event loop (an ``inline`` job) it raises
    :class:`Offload` instead; outside a request it does nothing."""
    holder = _job_place.get()
    if holder is None or holder.place is not None:
        return
    holder.declared += nbytes
    if holder.declared < BIG_JOB_BYTES or not holder.places.count:
        return
    if _inline.get():
        raise Offload()
    holder.place = holder.places.take_blocking(holder.deadline.remaining(), holder.deadline.check)


def big_job() -> bool:
    """Whether the current job is big: it holds one of the dyno's places for big jobs, or has said
    (:func:`memory_budget`) that it decodes ``BIG_JOB_BYTES`` or more (where the dyno has no places,
    a developer's machine). A big job may also use another CPU while it is idle
    (:mod:`app.core.spare`); outside a request, no job is big."""
    holder = _job_place.get()
    return holder is not None and (holder.place is not None or holder.declared >= BIG_JOB_BYTES)


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


def lower_priority(nice: int) -> None:
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
                                           initializer=lower_priority, initargs=(spec.nice,))
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

    def check(self, deadline: Deadline) -> None:
        """Refuse at once (503) when there is no place worth having; take none."""
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

    def enter(self, deadline: Deadline) -> None:
        """Take a place in the queue, or refuse at once (503) when there is none worth having."""
        self.check(deadline)
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

    def __init__(self, specs: list[GateSpec], timeout_s: float, places: DynoPlaces | None = None) -> None:
        self.gates = {spec.name: Gate(spec, timeout_s) for spec in specs}
        self.timeout_s = timeout_s
        self.places = places if places is not None else DynoPlaces(0)
        self.model_calls = ModelCalls()

    def deadline(self, request: Request) -> Deadline:
        """The request's deadline, started when its first byte arrived (set by the middleware)."""
        state = request.scope.setdefault("state", {})
        deadline = state.get("deadline")
        if deadline is None:
            deadline = state["deadline"] = Deadline(self.timeout_s)
        return deadline

    def admissible(self, request: Request, gate_name: str) -> None:
        """Refuse now (503) when the gate would refuse this request, before its body is read: a full
        worker does not read uploads it would never process. Takes no place."""
        gate, deadline = self.gates[gate_name], self.deadline(request)
        if deadline.remaining() <= 0:
            raise deadline_problem(deadline.seconds)
        gate.check(deadline)

    def ticket(self, request: Request, gate_name: str) -> Ticket:
        """A place in the gate's queue (or a 503 at once), taken once the request's body is in: a
        client still sending its body holds no place."""
        return Ticket(self, request, self.gates[gate_name])

    def status(self) -> dict[str, dict[str, Any]]:
        return {name: gate.status() for name, gate in self.gates.items()}

    def places_status(self) -> dict[str, int]:
        return self.places.status()

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
        self.places = execution.places
        self.model_calls = execution.model_calls
        self.deadline = execution.deadline(request)
        self._state = "new"
        self._place = JobPlace(self.places, self.deadline)

    async def __aenter__(self) -> Ticket:
        if self.deadline.remaining() <= 0:
            raise deadline_problem(self.deadline.seconds)
        self.gate.enter(self.deadline)
        self._state = "queued"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._place.release()  # after the job's thread has stopped, like the gate's slot
        if self._state == "queued":
            self.gate.leave()
        elif self._state == "running":
            self.gate.release()
        self._state = "done"

    async def run(self, fn: Callable[..., T], *args: Any, inline: bool = False, big: bool = False) -> T:
        """``fn(*args)`` on the gate's thread (or, ``inline``, on the event loop while it stays within
        :func:`inline_budget`) within the request's deadline; its result, or a 503 problem. A ``big``
        job first takes one of the dyno's places for big jobs (:mod:`app.core.places`). ``fn`` may
        be a generator that yields model calls (:class:`ModelCalls`); its return value is the result."""
        gate, deadline, request = self.gate, self.deadline, self.request
        self._state = "starting"
        try:
            await gate.start(deadline)
        except BaseException:
            self._state = "done"  # start() gave the queue place back
            raise
        self._state = "running"
        if big:
            self._place.place = await self.places.take(deadline.remaining())
        if gate.pace() >= deadline.remaining():
            # It waited its turn, but at the gate's recent pace it could not finish in time.
            raise deadline_problem(deadline.seconds)
        if inline:
            # A big upload makes its calls at once: its body is freed as soon as it can be.
            done, result = self._run_inline(run_to_end, fn, *args) if big else self._run_inline(fn, *args)
            if done:
                if isinstance(result, _Suspended):
                    return await self._finish_inline(result.steps, result.call)
                return result
        context = self._job_context()
        loop = asyncio.get_running_loop()
        token = object()
        started = gate.started[id(token)] = time.monotonic()

        def finished(future: asyncio.Future) -> None:
            gate.started.pop(id(token), None)
            if not future.cancelled() and future.exception() is None:  # stopped or refused
                gate.record(time.monotonic() - started)  # jobs say nothing about the pace

        job = loop.run_in_executor(gate.executor, functools.partial(context.run, self._place.run,
                                                                    run_to_end, fn, *args))
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

    def _job_context(self) -> contextvars.Context:
        """A copy of the current context holding the job's deadline and place, for its work elsewhere
        (the gate's thread, a grouped model call)."""
        context = contextvars.copy_context()
        context.run(_deadline.set, self.deadline)
        context.run(_job_place.set, self._place)
        return context

    def _run_inline(self, fn: Callable[..., T], *args: Any) -> tuple[bool, T | None]:
        """(True, result) when ``fn`` ran to the end on the event loop; (False, None) when it
        raised :class:`Offload` and must run on the gate's thread instead."""
        started = time.monotonic()
        with _OnTheLoop(self):
            try:
                result = fn(*args)
                if isinstance(result, Generator):
                    try:
                        result = _Suspended(result, next(result))
                    except StopIteration as stop:
                        result = stop.value
            except Offload:
                self._place.declared = 0  # declared again on the thread
                return False, None
        self.gate.record(time.monotonic() - started)
        return True, result

    async def _finish_inline(self, steps: Generator[Call, Any, T], call: Call) -> T:
        """An inline job's model calls, made with the other jobs' calls of the same turn
        (:class:`ModelCalls`), and its steps after them, on the event loop. The job's work on the
        loop is done when it asks for its first call: its gate slot is free from then on."""
        self.gate.release()
        self._state = "done"
        context = self._job_context()
        try:
            while True:
                try:
                    value = await self.model_calls.submit(call[0], call[1], context)
                except Exception as exc:
                    call, done, result = self._step(steps.throw, exc)
                else:
                    call, done, result = self._step(steps.send, value)
                if done:
                    return result
        finally:
            steps.close()  # a request cancelled while it waited: its steps end now, not when collected

    def _step(self, resume: Callable[[Any], Call], value: Any) -> tuple[Call, bool, Any]:
        """Resume the job's steps with a call's result (or its exception): (the next call, False,
        None), or (None, True, the job's result) once they return. They run on the event loop, as
        the first step did, but can no longer move to a thread."""
        with _OnTheLoop(self):
            try:
                return resume(value), False, None
            except StopIteration as stop:
                return None, True, stop.value  # type: ignore[return-value]
            except Offload:
                raise RuntimeError("a job's steps asked to leave the event loop after its first model "
                                   "call; call inline_budget before it") from None


class _OnTheLoop:
    """While a ticket's job runs on the event loop: its deadline, its place and the inline flag set
    (and reset after), and a passed deadline (:class:`Cancelled`) turned into the 503 problem."""

    __slots__ = ("ticket", "tokens")

    def __init__(self, ticket: Ticket) -> None:
        self.ticket = ticket

    def __enter__(self) -> None:
        self.tokens = (_deadline.set(self.ticket.deadline), _inline.set(True), _job_place.set(self.ticket._place))

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        deadline_token, inline_token, place_token = self.tokens
        _deadline.reset(deadline_token)
        _inline.reset(inline_token)
        _job_place.reset(place_token)
        if kind is not None and issubclass(kind, Cancelled):
            raise deadline_problem(self.ticket.deadline.seconds) from None


@dataclass
class _Suspended:
    """An inline job's steps, stopped at their first model call."""

    steps: Generator[Call, Any, Any]
    call: Call


class BlockingCalls:
    """Blocking calls (a database) on a few threads of their own, each bounded in time.

    At most ``threads`` run and ``queue`` wait; beyond that a call is refused at once. A caller
    waits at most ``timeout_s`` and never past its request's deadline, then gets ``unavailable()``
    while the thread finishes on its own; a thread stuck on a hung server keeps its place, so a hang
    fills the pool and further calls are refused at once rather than piling up."""

    def __init__(self, threads: int, queue: int, timeout_s: float, name: str) -> None:
        self.threads, self.queue, self.timeout_s = threads, queue, timeout_s
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self.pending = 0  # running or waiting for a thread

    async def run(self, deadline: Deadline | None, unavailable: Callable[[str], Exception],
                  fn: Callable[..., T], *args: Any) -> T:
        if self.pending >= self.threads + self.queue:
            raise unavailable("busy")
        timeout = self.timeout_s if deadline is None else min(self.timeout_s, deadline.remaining())
        self.pending += 1
        future = asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args))
        future.add_done_callback(self._done)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            raise unavailable("timeout") from None

    def _done(self, future: asyncio.Future) -> None:
        self.pending -= 1
        if not future.cancelled():
            future.exception()  # retrieved: a caller that gave up must not leave it unreported

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def build_execution(settings: Any) -> Execution:
    """The gates of :data:`app.core.limits.GATES`, the heavy one sized by the settings."""
    from app.core.limits import GATES

    specs = []
    for name, (concurrency, queue, nice, description) in GATES.items():
        if name == "heavy":
            concurrency, queue = settings.heavy_concurrency, settings.heavy_queue
        specs.append(GateSpec(name, concurrency, queue, nice, description))
    count = settings.big_jobs_per_dyno
    places = DynoPlaces(default_count(memory_limit_bytes()) if count is None else count)
    return Execution(specs, settings.request_timeout_s, places)


def execution_of(request: Request) -> Execution:
    return request.app.state.execution
