"""The dyno's places for big jobs: shared by processes through lock files, taken by a big body or by
a job's decoded size, never by small jobs, given back when the job ends or its process dies."""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from app.core import places as places_module
from app.core.errors import ProblemError
from app.core.execution import Execution, GateSpec, memory_budget
from app.core.limits import BIG_JOB_BYTES, DYNO_MIB_PER_BIG_JOB
from app.core.places import DynoPlaces, default_count, memory_limit_bytes
from tests.support import fake_cgroups, open_request


def test_the_count_follows_the_memory_limit(tmp_path: Path):
    assert default_count(512 * 2**20) == 512 // DYNO_MIB_PER_BIG_JOB == 2
    assert default_count(100 * 2**20) == 1  # at least one
    assert default_count(None) == 0  # no limit: places are not used
    cgroups = fake_cgroups(tmp_path)
    v2, v1 = cgroups[0].limit, cgroups[1].limit
    assert memory_limit_bytes(cgroups) is None  # no cgroup files: no limit
    v2.write_text("max\n")
    assert memory_limit_bytes(cgroups) is None
    v2.write_text("536870912\n")
    assert memory_limit_bytes(cgroups) == 512 * 2**20
    v2.unlink()
    v1.write_text(str(2**63 - 4096))  # cgroup v1 without a limit
    assert memory_limit_bytes(cgroups) is None
    v1.write_text("1073741824")
    assert memory_limit_bytes(cgroups) == 2**30


def test_places_are_shared_and_given_back(tmp_path: Path):
    one, other = DynoPlaces(2, tmp_path), DynoPlaces(2, tmp_path)  # two workers of one dyno
    first, second = one.try_take(), other.try_take()
    assert first is not None and second is not None
    assert one.try_take() is None and other.try_take() is None
    assert one.status() == {"places": 2, "held_here": 1, "refused": 0}
    first.release()
    third = other.try_take()
    assert third is not None and one.try_take() is None
    second.release()
    third.release()
    assert one.status()["held_here"] == 0 and other.status()["held_here"] == 0


def _hold_a_place(directory: str, ready) -> None:
    place = DynoPlaces(1, directory).try_take()
    assert place is not None
    ready.set()
    time.sleep(60)  # holding the place until the test kills this process


def test_a_killed_process_gives_its_place_back(tmp_path: Path):
    ready = multiprocessing.Event()
    holder = multiprocessing.get_context("fork").Process(target=_hold_a_place, args=(str(tmp_path), ready))
    holder.start()
    try:
        assert ready.wait(10)
        places = DynoPlaces(1, tmp_path)
        assert places.try_take() is None
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
        place = places.try_take()
        assert place is not None  # the kernel released the dead worker's lock
        place.release()
    finally:
        if holder.is_alive():
            holder.kill()


def run_at_once(execution: Execution, jobs: list[tuple], *, big: bool) -> list:
    """Each (fn, args) through its own heavy ticket at the same time; results or raised problems."""
    async def one(fn, args):
        async with execution.ticket(open_request(), "heavy") as ticket:
            return await ticket.run(fn, *args, big=big)

    async def scenario():
        return await asyncio.gather(*(one(fn, args) for fn, args in jobs), return_exceptions=True)

    try:
        return asyncio.run(scenario())
    finally:
        execution.shutdown()


def heavy_execution(places: DynoPlaces) -> Execution:
    return Execution([GateSpec("heavy", 4, 8, 0, "heavy work")], 25.0, places)


def spans_of(record: list, seconds: float, declare: int = 0):
    def job(name: str):
        if declare:
            memory_budget(declare)
        start = time.monotonic()
        time.sleep(seconds)  # the job's work: a span of time whose overlaps the test compares
        record.append((name, start, time.monotonic(), threading.get_ident()))
        return name
    return job


def overlapping(spans: list) -> bool:
    spans = sorted(spans, key=lambda s: s[1])
    return any(later[1] < earlier[2] for earlier, later in itertools.pairwise(spans))


def test_big_jobs_take_turns_for_one_place_and_small_ones_do_not_wait(tmp_path: Path):
    record: list = []
    job = spans_of(record, 0.3)
    results = run_at_once(heavy_execution(DynoPlaces(1, tmp_path)), [(job, ("a",)), (job, ("b",)), (job, ("c",))],
                          big=True)
    assert sorted(results) == ["a", "b", "c"]
    assert not overlapping(record)  # one at a time across the gate's four threads
    record.clear()
    run_at_once(heavy_execution(DynoPlaces(1, tmp_path)), [(job, ("a",)), (job, ("b",))], big=False)
    assert overlapping(record)  # small jobs run side by side
    record.clear()
    run_at_once(heavy_execution(DynoPlaces(0, tmp_path)), [(job, ("a",)), (job, ("b",))], big=True)
    assert overlapping(record)  # no places (no memory limit): not bounded


def test_a_job_that_declares_a_big_decode_takes_a_place_first(tmp_path: Path):
    record: list = []
    big = spans_of(record, 0.3, declare=BIG_JOB_BYTES)
    results = run_at_once(heavy_execution(DynoPlaces(1, tmp_path)), [(big, ("a",)), (big, ("b",))], big=False)
    assert sorted(results) == ["a", "b"] and not overlapping(record)
    record.clear()
    small = spans_of(record, 0.3, declare=BIG_JOB_BYTES // 4)
    run_at_once(heavy_execution(DynoPlaces(1, tmp_path)), [(small, ("a",)), (small, ("b",))], big=False)
    assert overlapping(record)


def test_a_big_job_that_finds_no_place_in_time_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(places_module, "QUEUE_MAX_WAIT_S", 0.3)
    held = DynoPlaces(1, tmp_path).try_take()  # another worker's long job
    try:
        places = DynoPlaces(1, tmp_path)
        for big, declare in ((True, 0), (False, BIG_JOB_BYTES)):
            record: list = []
            started = time.monotonic()
            [result] = run_at_once(heavy_execution(places), [(spans_of(record, 0.0, declare), ("a",))], big=big)
            assert isinstance(result, ProblemError), result
            assert result.status == 503 and result.code == "overloaded" and result.headers["Retry-After"]
            assert 0.3 <= time.monotonic() - started < 3.0 and record == []
        assert places.refused == 2 and places.held == 0
    finally:
        held.release()


def test_a_place_is_held_until_the_job_ends_and_then_given_back(tmp_path: Path):
    places = DynoPlaces(1, tmp_path)
    seen: list = []

    def job():
        memory_budget(BIG_JOB_BYTES)
        seen.append(places.held)
        return "done"

    assert run_at_once(heavy_execution(places), [(job, ())], big=False) == ["done"]
    assert seen == [1] and places.held == 0
    assert DynoPlaces(1, tmp_path).try_take() is not None


def test_memory_budget_outside_a_request_does_nothing():
    memory_budget(10 * BIG_JOB_BYTES)
