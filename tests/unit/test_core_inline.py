"""Inline jobs: small light work runs on the event loop; past the inline budget it moves to the gate's
thread; deadlines and problems behave as on the thread."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.core.errors import ProblemError
from app.core.execution import (
    Deadline,
    Execution,
    GateSpec,
    _deadline,
    _inline,
    checkpoint,
    inline_budget,
)
from app.core.limits import INLINE_MAX_INSTANCES, INLINE_MAX_PIXELS
from tests.support import open_request


def run_job(fn, *, inline: bool, deadline_s: float = 25.0):
    """Run ``fn`` through a light gate's ticket; returns (result, event-loop thread id, execution)."""
    execution = Execution([GateSpec("light", 2, 32, 0, "light work")], deadline_s)

    async def scenario():
        req = open_request()
        async with execution.ticket(req, "light") as ticket:
            return await ticket.run(fn, inline=inline), threading.get_ident()

    try:
        result, loop_thread = asyncio.run(scenario())
    finally:
        execution.shutdown()
    return result, loop_thread, execution


def test_an_inline_job_runs_on_the_event_loop_and_a_plain_one_on_the_gate_thread():
    for inline in (True, False):
        ran_on, loop_thread, execution = run_job(lambda: threading.get_ident(), inline=inline)
        assert (ran_on == loop_thread) is inline
        gate = execution.gates["light"]
        assert gate.running == 0 and gate.waiting == 0  # the slot was given back
        assert gate.job_seconds > 0  # and the job's time recorded for the gate's pace


def test_a_job_past_the_inline_budget_starts_again_on_the_gate_thread():
    calls: list[tuple[int, str]] = []

    def job(pixels: int, instances: int) -> str:
        calls.append((threading.get_ident(), threading.current_thread().name))
        inline_budget(pixels=pixels, instances=instances)
        return "done"

    for pixels, instances, moved in [(INLINE_MAX_PIXELS, INLINE_MAX_INSTANCES, False),
                                     (INLINE_MAX_PIXELS + 1, 1, True),
                                     (0, INLINE_MAX_INSTANCES + 1, True)]:
        calls.clear()
        result, loop_thread, _ = run_job(lambda p=pixels, n=instances: job(p, n), inline=True)
        assert result == "done"
        assert calls[0][0] == loop_thread
        if moved:
            assert len(calls) == 2 and calls[1][0] != loop_thread and calls[1][1].startswith("gate-light")
        else:
            assert len(calls) == 1


def test_the_inline_budget_means_nothing_off_the_event_loop():
    inline_budget(pixels=10**9, instances=10**6)  # no job, no inline: nothing raised
    ran_on, loop_thread, _ = run_job(lambda: (inline_budget(pixels=10**9), threading.get_ident())[1],
                                     inline=False)
    assert ran_on != loop_thread


def test_an_inline_job_sees_its_deadline_and_leaves_none_behind():
    execution = Execution([GateSpec("light", 2, 32, 0, "light work")], 0.05)

    def job() -> None:
        time.sleep(0.06)  # work that outlasts the 50 ms deadline
        checkpoint()  # past the 50 ms deadline: stops here

    async def scenario() -> ProblemError:
        try:
            async with execution.ticket(open_request(), "light") as ticket:
                await ticket.run(job, inline=True)
        except ProblemError as exc:
            assert _deadline.get() is None and not _inline.get()  # the request's own context is clean
            return exc
        raise AssertionError("ran past its deadline")

    stopped = asyncio.run(scenario())
    execution.shutdown()
    assert stopped.status == 503 and stopped.code == "deadline-exceeded"


def test_a_problem_raised_inline_reaches_the_client_and_frees_the_slot():
    execution = Execution([GateSpec("light", 1, 4, 0, "light work")], 25.0)

    def bad() -> None:
        raise ProblemError(422, "blank-image", "no ink")

    async def scenario() -> str:
        for _ in range(3):  # one slot: a leaked slot would make the next wait forever
            with pytest.raises(ProblemError):
                async with execution.ticket(open_request(), "light") as ticket:
                    await ticket.run(bad, inline=True)
        async with execution.ticket(open_request(), "light") as ticket:
            return await asyncio.wait_for(ticket.run(lambda: "ok", inline=True), 1.0)

    assert asyncio.run(scenario()) == "ok"
    assert execution.gates["light"].running == 0
    execution.shutdown()


def test_a_busy_gate_still_queues_in_turn():
    """The fast path takes a free slot at once; a full gate still makes the next job wait."""
    execution = Execution([GateSpec("light", 1, 4, 0, "light work")], 25.0)
    order: list[str] = []

    async def scenario() -> None:
        release, taken = asyncio.Event(), asyncio.Event()
        gate = execution.gates["light"]

        async def first() -> None:
            async with execution.ticket(open_request(), "light") as ticket:
                await ticket.gate.start(Deadline(25.0))
                ticket._state = "running"
                order.append("first")
                taken.set()
                await release.wait()

        async def second() -> None:
            async with execution.ticket(open_request(), "light") as ticket:
                await ticket.run(lambda: order.append("second"), inline=True)

        async def queued_or_ran() -> None:
            while not gate.waiting and order == ["first"]:
                await asyncio.sleep(0.001)  # polled: the gate has no event for a job joining its queue

        task = asyncio.ensure_future(first())
        await asyncio.wait_for(taken.wait(), 2.0)
        waiting = asyncio.ensure_future(second())
        await asyncio.wait_for(queued_or_ran(), 2.0)  # the second has queued at the full gate (or run)
        assert order == ["first"]  # the slot is taken: the second waits
        release.set()
        await asyncio.wait_for(asyncio.gather(task, waiting), 2.0)

    asyncio.run(scenario())
    assert order == ["first", "second"]
    execution.shutdown()
