"""A big job's independent steps shared with a helper thread while another CPU is idle.

A 2048 x 2048 segmentation is 64 tiles, each a model call of tens of milliseconds that releases the
GIL. :func:`in_order` runs such steps on the job's thread, in order, and lets a helper thread with
a model of its own take steps from the other end at the same time: on an idle second CPU the job
takes 0.55-0.65 of the time (``bench/spare_cpu.py``). The helper's results wait for their
turn: at most about half the steps' results are held at once. The helper leaves as soon as it sees
that its CPU is not idle (during ``CONTENDED_STEPS`` steps in a row it waited for a CPU for more than
``1 - CONTENDED_SHARE`` of each step's time: another worker's request, the load on the machine;
one such step alone is a moment's blip, which would otherwise cost the rest of the job its helper);
the job's own thread, which took steps from the front all along, finishes the rest alone. A job of
fewer than ``MIN_STEPS`` steps gets no helper.

Work is shared by step, not inside a model call: the job's thread never waits on the helper except
for the one step the helper is running when the two meet. Results come back in the steps' order,
each the result its step gives on either thread (the caller makes both models the same), so what
the job computes from them does not depend on who ran which step. The helper thread runs at normal
priority: a thread at idle priority that is preempted while it holds the GIL would stop every
thread of the worker, its event loop included, until it runs again. Under a memory limit (a dyno)
a helper starts only while the limit leaves room for its model (:func:`room_for_a_helper`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from app.core.limits import SPARE_CPU_MIN_ROOM_MIB
from app.core.places import give_back_heap, memory_room_bytes

log = logging.getLogger("app.spare")
T = TypeVar("T")
R = TypeVar("R")
CONTENDED_SHARE = 0.75  # a helper step that ran for less of its time than this: its CPU is busy
CONTENDED_STEPS = 2  # that many such steps in a row and the helper leaves
SCHEDSTAT = "/proc/thread-self/schedstat"  # Linux: time on a CPU, time waiting for one (ns), slices
JOIN_TIMEOUT_S = 5.0  # the helper ends after its current step; a step is tens of milliseconds
WAIT_STEP_S = 0.05  # how often the job's thread, waiting for the helper's step, checks it is alive
MIN_STEPS = 8  # fewer steps run on the job's thread alone: making the helper's model costs about one


class Helper:
    """The helper's side: which steps it took and why it stopped (for tests and logs)."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.stopped: str | None = None  # "done", "contended", "failed" or "job-ended"


def room_for_a_helper() -> bool:
    """Whether a helper's second interpreter fits: no memory limit, or ``SPARE_CPU_MIN_ROOM_MIB``
    left under it now (the workers of a dyno share its memory)."""
    room = memory_room_bytes()
    return room is None or room >= SPARE_CPU_MIN_ROOM_MIB * 1024 * 1024


def in_order(items: Sequence[T], run: Callable[[T], R],
             helper: Callable[[], Callable[[T], R]] | None = None,
             report: Helper | None = None) -> Iterator[R]:
    """``run(item)`` for each item, yielded in order. With ``helper`` (a function that makes, on
    the helper's thread, a ``run`` of its own: a second interpreter), a helper thread takes items
    from the end while the caller's thread takes them from the front; see the module. A step the
    helper failed is run again here. Closing the iterator early (an exception in the caller's
    loop) stops the helper after its current step and waits for it."""
    n = len(items)
    if helper is None or n < MIN_STEPS:
        for item in items:
            yield run(item)
        return
    report = report or Helper()
    lock = threading.Lock()
    back = [n - 1]  # the last item not yet claimed; the caller claims from the front
    results: dict[int, R] = {}
    finished = {i: threading.Event() for i in range(n)}
    stop = threading.Event()

    def claim_back() -> int | None:
        with lock:
            if stop.is_set() or back[0] < front[0]:
                return None
            back[0] -= 1
            return back[0] + 1

    def work() -> None:
        try:
            helper_run = helper()
            in_a_row = 0  # steps in a row whose CPU was busy
            while (i := claim_back()) is not None:
                try:
                    wall, waited = time.perf_counter(), _waited()
                    results[i] = helper_run(items[i])
                    in_a_row = in_a_row + 1 if _contended(wall, waited) else 0
                finally:
                    finished[i].set()  # with its result, or without: the job's thread runs it then
                report.steps.append(i)
                if in_a_row >= CONTENDED_STEPS:
                    report.stopped = "contended"
                    return
            report.stopped = "job-ended" if stop.is_set() else "done"
        except Exception:
            log.warning("helper thread failed; the job's own thread runs the rest", exc_info=True)
            report.stopped = "failed"

    front = [0]  # the next item the caller runs or collects
    thread = threading.Thread(target=work, name="spare-cpu", daemon=True)
    thread.start()
    complete = False
    try:
        while front[0] < n:
            i = front[0]
            with lock:
                mine = i <= back[0]
                front[0] = i + 1
            if mine:
                yield run(items[i])
                continue
            while not finished[i].wait(WAIT_STEP_S) and thread.is_alive():
                pass
            if i in results:
                yield results.pop(i)
            else:  # the helper failed on it, or is gone
                yield run(items[i])
        complete = True
    finally:
        if not complete:
            stop.set()  # the job stopped early: the helper too, after its step
        with lock:  # items nobody has claimed stay unrun
            back[0] = -1
        thread.join(JOIN_TIMEOUT_S)
        if thread.is_alive():
            log.warning("helper thread still running after the job", extra={"step_s": JOIN_TIMEOUT_S})
        give_back_heap()  # the helper's interpreter was freed in its thread's own malloc arena
        log.debug("helper thread", extra={"steps": len(report.steps), "of": n, "stopped": report.stopped})


def _waited() -> float:
    """Seconds this thread has spent ready to run but waiting for a CPU (Linux's schedstat
    ``run_delay``); where that is not readable, the seconds it has not run (waiting for the GIL
    counts then too, and makes the helper leave sooner)."""
    try:
        with open(SCHEDSTAT, "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - time.thread_time()


def _contended(wall_started: float, waited_started: float) -> bool:
    """Whether the step begun at these readings waited for a CPU more than a share of its time."""
    wall = time.perf_counter() - wall_started
    return wall > 0 and _waited() - waited_started > (1.0 - CONTENDED_SHARE) * wall
