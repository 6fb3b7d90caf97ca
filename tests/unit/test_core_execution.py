"""Admission gates: when a heavy request is queued, refused at once, or refused at its deadline."""

from __future__ import annotations

import asyncio
import time

import pytest

from app.core.errors import ProblemError
from app.core.execution import Deadline, Gate, GateSpec


def gate(concurrency: int = 1, queue: int = 8, deadline_s: float = 25.0) -> Gate:
    return Gate(GateSpec("heavy", concurrency, queue, 0, "segmentations"), deadline_s)


def test_a_free_gate_admits_and_is_not_saturated():
    g = gate()
    assert g.refusal(25.0) is None and not g.saturated
    g.enter(Deadline(25.0))
    assert g.waiting == 1


def test_the_queue_bound_refuses_with_retry_after():
    g = gate(queue=2)
    g.running = 1
    g.enter(Deadline(25.0))
    g.enter(Deadline(25.0))
    with pytest.raises(ProblemError) as refused:
        g.enter(Deadline(25.0))
    assert refused.value.status == 503 and refused.value.code == "overloaded"
    assert int(refused.value.headers["Retry-After"]) >= 1
    assert "the most this worker queues" in refused.value.detail
    assert g.saturated and g.refused == 1


def test_long_jobs_are_not_queued_past_the_longest_wait():
    g = gate(queue=8)
    g.running = 1
    g.record(11.0)  # 2048 x 2048 segmentations: 11 s each
    with pytest.raises(ProblemError) as refused:
        g.enter(Deadline(25.0))
    assert "about 11 s of work ahead" in refused.value.detail and g.saturated
    assert refused.value.headers["Retry-After"] == "11"
    g.record(1.0)
    g.record(1.0)
    g.record(1.0)  # 4.4 s each by the moving average
    g.enter(Deadline(25.0))  # 4.4 s ahead: queued
    with pytest.raises(ProblemError):
        g.enter(Deadline(25.0))  # 8.8 s ahead: more than QUEUE_MAX_WAIT_S


def test_a_queue_that_would_outlast_the_deadline_is_refused():
    g = gate(queue=8)
    g.running = 1
    g.record(2.0)
    with pytest.raises(ProblemError) as refused:
        g.enter(Deadline(3.0))  # 2 s ahead + 2 s of its own > 3 s left
    assert "more than the request's deadline" in refused.value.detail
    g.enter(Deadline(25.0))
    assert g.waiting == 1


def test_short_jobs_queue_up_to_the_bound():
    g = gate(queue=8)
    g.running = 1
    g.record(0.4)  # 512 x 512 segmentations
    for _ in range(8):
        g.enter(Deadline(25.0))
    assert g.waiting == 8 and g.saturated
    g.leave()
    assert not g.saturated


def test_a_running_job_longer_than_its_history_slows_admission():
    g = gate(queue=8)
    g.record(0.4)
    g.running = 1
    g.started[1] = time.monotonic() - 20.0  # this one has run 20 s already
    assert g.pace() >= 20.0
    with pytest.raises(ProblemError):
        g.enter(Deadline(25.0))


def test_a_queued_job_gives_up_at_once_when_the_jobs_ahead_show_it_cannot_finish():
    async def scenario() -> ProblemError:
        g = gate(queue=8)
        g.enter(Deadline(25.0))
        await g.start(Deadline(25.0))  # runs
        short = Deadline(2.0)
        g.enter(short)  # admitted: nothing says yet how long the running job takes
        g.started[1] = time.monotonic() - 3.0  # and then it has run 3 s
        try:
            await g.start(short)
        except ProblemError as exc:
            return exc
        raise AssertionError("queued past its deadline")

    started = time.monotonic()
    problem = asyncio.run(scenario())
    assert problem.code == "deadline-exceeded" and time.monotonic() - started < 0.5
