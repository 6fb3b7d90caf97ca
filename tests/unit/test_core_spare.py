"""A big job's steps shared with a helper thread while another CPU is idle (``app.core.spare``), which
jobs get the helper (``ServedModel.spare_runner``, ``big_job``), and a big segmentation through it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from app.core import execution, registry, spare
from app.core.config import Settings
from app.core.execution import JobPlace, big_job, memory_budget
from app.core.limits import BIG_JOB_BYTES
from app.core.places import DynoPlaces
from app.core.runtime import TFLiteRunner
from app.core.spare import Helper, in_order
from tests.support import REPO_ROOT, SHARED_DATA, fake_cgroups

UNET_DIR = REPO_ROOT / "models" / "segmentation" / "1.3.0"
DATA = b"\x5a" * (4 << 20)


def busy(x: int) -> int:
    """A step that keeps a CPU busy without the GIL, as a model call does (hashlib releases it)."""
    return int.from_bytes(hashlib.sha256(DATA + bytes([x % 256])).digest()[:4], "big") + x


def helper_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "spare-cpu"]


def test_without_a_helper_the_steps_run_here_in_order():
    seen = []
    assert list(in_order(range(5), lambda x: seen.append(x) or x * 2)) == [0, 2, 4, 6, 8]
    assert seen == [0, 1, 2, 3, 4] and not helper_threads()


def test_the_helper_takes_steps_from_the_end_and_the_answers_come_in_order():
    items = list(range(24))
    report = Helper()
    here = []

    def run(x):
        here.append(x)
        return busy(x)

    assert list(in_order(items, run, lambda: busy, report)) == [busy(x) for x in items]
    # "contended" where something else on the machine took the helper's CPU for a moment
    assert report.stopped in ("done", "contended") and report.steps, report.stopped
    # the helper's steps are the last ones, from the end backwards; every step ran once
    assert report.steps == list(range(23, 23 - len(report.steps), -1))
    assert sorted(here + report.steps) == items
    assert not helper_threads()


@pytest.fixture
def one_busy_cpu():
    """This thread (and so the helper it starts) and another process busy on one CPU, as on a
    machine whose other work keeps every CPU busy. The busy process ends on its own after 30 s."""
    cpu = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    hog = subprocess.Popen([sys.executable, "-c", ("import time\nend = time.time() + 30\n"
                                                   "while time.time() < end: pass")])
    try:
        os.sched_setaffinity(hog.pid, {cpu})
        time.sleep(0.1)
        yield
    finally:
        hog.kill()
        hog.wait()
        os.sched_setaffinity(0, before)


def tile_like(x: int) -> int:
    """A step as long as a tile (tens of milliseconds), longer than the scheduler's time slices."""
    return int.from_bytes(hashlib.sha256(DATA * 8 + bytes([x % 256])).digest()[:4], "big") + x


def test_a_helper_whose_cpu_is_busy_leaves_after_two_steps(one_busy_cpu):
    report = Helper()
    answers = list(in_order(list(range(12)), tile_like, lambda: tile_like, report))
    assert answers == [tile_like(x) for x in range(12)]
    assert report.stopped == "contended" and report.steps in ([11, 10], [11, 10, 9]), report.steps


def test_waiting_for_the_gil_or_sleeping_is_not_waiting_for_a_cpu(monkeypatch):
    started = spare._waited()
    time.sleep(0.05)
    if os.path.exists(spare.SCHEDSTAT):  # schedstat: a sleeping thread is not waiting for a CPU
        assert spare._waited() - started < 0.02
    monkeypatch.setattr(spare, "SCHEDSTAT", "/nonexistent/schedstat")
    started = spare._waited()  # without schedstat: every moment the thread does not run counts
    time.sleep(0.05)
    assert spare._waited() - started >= 0.04


def test_a_helper_that_cannot_start_leaves_the_job_to_its_own_thread(caplog):
    def broken():
        raise RuntimeError("no memory for a second interpreter")

    report = Helper()
    assert list(in_order(list(range(12)), busy, broken, report)) == [busy(x) for x in range(12)]
    assert report.stopped == "failed" and report.steps == []
    assert "helper thread failed" in caplog.text


def test_a_step_the_helper_fails_runs_again_here():
    def flaky(x):
        if x == 9:
            raise ValueError("bad step")
        return busy(x)

    report = Helper()
    assert list(in_order(list(range(10)), busy, lambda: flaky, report)) == [busy(x) for x in range(10)]
    assert report.stopped == "failed" and report.steps == []  # it failed on its first, step 9


def test_when_the_job_stops_the_helper_stops_after_its_step_and_is_waited_for():
    report = Helper()

    def run(x):
        if x == 2:
            raise TimeoutError("the deadline passed")
        return busy(x)

    steps = in_order(list(range(200)), run, lambda: busy, report)
    with pytest.raises(TimeoutError):
        list(steps)
    assert not helper_threads()
    # "contended" where something else on the machine took the helper's CPU for a moment
    assert report.stopped in ("job-ended", "contended") and len(report.steps) < 150


def test_a_job_of_few_steps_starts_no_helper():
    made = []
    items = list(range(spare.MIN_STEPS - 1))
    assert list(in_order(items, busy, lambda: made.append(1) or busy)) == [busy(x) for x in items]
    assert made == [] and not helper_threads() and spare.MIN_STEPS == 8


@pytest.mark.parametrize(("contended", "steps"), [(False, "several"), (True, "two")])
def test_the_helper_stays_while_its_cpu_is_idle_and_leaves_when_it_is_busy(contended, steps, monkeypatch):
    monkeypatch.setattr(spare, "_contended", lambda wall, waited: contended)
    report = Helper()
    items = list(range(40))
    assert list(in_order(items, tile_like, lambda: tile_like, report)) == [tile_like(x) for x in items]
    if steps == "two":
        assert report.stopped == "contended" and report.steps == [39, 38]
    else:
        assert report.stopped == "done" and len(report.steps) >= 5, report.steps


def test_one_busy_step_between_idle_ones_does_not_send_the_helper_away(monkeypatch):
    """A moment's blip (one step that waited for a CPU) is not a busy CPU: the helper stays; two
    such steps in a row are, wherever they fall."""
    def blips(*contended_calls):
        calls = iter(range(10_000))
        monkeypatch.setattr(spare, "_contended", lambda wall, waited: next(calls) in contended_calls)
        report = Helper()
        items = list(range(40))
        assert list(in_order(items, tile_like, lambda: tile_like, report)) == [tile_like(x) for x in items]
        return report

    report = blips(0, 2, 4)  # every other step, never two in a row
    assert report.stopped == "done" and len(report.steps) >= 6, report.steps
    report = blips(3, 4)  # the fourth and fifth steps
    assert report.stopped == "contended" and report.steps == [39, 38, 37, 36, 35], report.steps


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_helper_that_dies_mid_step_leaves_no_job_waiting():
    gate = threading.Event()

    def stuck_then_gone(x):
        gate.wait(1)
        raise KeyboardInterrupt  # not an Exception: the thread ends without the usual handling

    report = Helper()
    items = list(range(10))
    assert list(in_order(items, busy, lambda: stuck_then_gone, report)) == [busy(x) for x in items]
    assert not helper_threads()


def job(places: int = 0) -> JobPlace:
    holder = JobPlace(DynoPlaces(places), execution.Deadline(10))
    execution._job_place.set(holder)
    return holder


def test_a_job_is_big_once_it_declares_big_job_bytes_with_or_without_dyno_places():
    assert not big_job()  # outside a request
    token = execution._job_place.set(None)
    try:
        job(places=0)
        memory_budget(BIG_JOB_BYTES - 1)
        assert not big_job()
        memory_budget(1)
        assert big_job()
        holder = job(places=1)
        memory_budget(BIG_JOB_BYTES)  # takes a place
        assert holder.place is not None and big_job()
        holder.release()
    finally:
        execution._job_place.reset(token)


def spare_runner(monkeypatch, cpus: int = 2, big: bool = True, room: bool = True, **settings):
    from app.tasks.segmentation.model import SegmentationModel

    monkeypatch.setattr(registry, "usable_cpus", lambda: cpus)
    monkeypatch.setattr(registry, "big_job", lambda: big)
    monkeypatch.setattr(registry, "room_for_a_helper", lambda: room)
    model = SegmentationModel.load(UNET_DIR, Settings(**{"inference_threads": 1, **settings}))
    return model.spare_runner()


def test_only_a_big_job_on_one_thread_with_another_cpu_gets_a_helper(monkeypatch):
    make = spare_runner(monkeypatch)
    assert make is not None
    tile = np.random.default_rng(1).random((1, 272, 272, 1)).astype(np.float32)
    np.testing.assert_array_equal(make()(tile), TFLiteRunner(UNET_DIR / "model.tflite").run(tile))
    assert spare_runner(monkeypatch, big=False) is None
    assert spare_runner(monkeypatch, cpus=1) is None
    assert spare_runner(monkeypatch, spare_cpu=False) is None
    assert spare_runner(monkeypatch, inference_threads=2) is None
    assert spare_runner(monkeypatch, idle_threads=True) is None  # its idle thread helps already


def test_a_big_segmentation_with_the_helper_is_the_same_to_the_bit(monkeypatch):
    from app.tasks.segmentation.model import SegmentationModel

    monkeypatch.setattr(registry, "usable_cpus", lambda: 2)
    monkeypatch.setattr(registry, "big_job", lambda: True)
    monkeypatch.setattr(registry, "room_for_a_helper", lambda: True)
    model = SegmentationModel.load(UNET_DIR, Settings(inference_threads=1))
    slice_ = Image.open(SHARED_DATA / "membrane" / "train" / "image" / "22.png").convert("L")
    gray = np.asarray(slice_.resize((1100, 1000), Image.BILINEAR))
    report = Helper()
    helped = model.segment(gray, model.threshold, keep_probability=True, report=report)
    monkeypatch.setattr(registry, "big_job", lambda: False)
    alone = model.segment(gray, model.threshold, keep_probability=True)
    assert report.steps  # the helper ran tiles
    np.testing.assert_array_equal(helped.mask, alone.mask)
    np.testing.assert_array_equal(helped.probability, alone.probability)
    assert helped.features == alone.features


def test_the_spare_cpu_is_used_unless_switched_off():
    assert Settings.model_fields["spare_cpu"].default is True


def test_the_room_under_a_memory_limit_is_the_limit_less_the_usage(tmp_path):
    from app.core.places import memory_room_bytes

    cgroups = fake_cgroups(tmp_path)
    v2, v1 = cgroups
    assert memory_room_bytes(cgroups) is None  # no cgroup files: no limit
    v2.limit.write_text("max\n")
    assert memory_room_bytes(cgroups) is None
    v2.limit.write_text(str(512 << 20))
    assert memory_room_bytes(cgroups) == 0  # a limit, but no usage to read: no room
    v2.usage.write_text(str(400 << 20))
    assert memory_room_bytes(cgroups) == 112 << 20  # no memory.stat: all the usage counts
    v2.stat.write_text(f"anon {300 << 20}\nfile {100 << 20}\nactive_file {60 << 20}\ninactive_file {40 << 20}\n")
    assert memory_room_bytes(cgroups) == 152 << 20  # page cache the kernel drops first is room
    v2.limit.unlink()
    v1.limit.write_text(str(256 << 20))
    v1.usage.write_text(str(100 << 20))
    assert memory_room_bytes(cgroups) == 156 << 20
    v1.stat.write_text(f"cache {30 << 20}\ninactive_file {9 << 20}\ntotal_inactive_file {20 << 20}\n")
    assert memory_room_bytes(cgroups) == 176 << 20  # v1: total_inactive_file, children counted as in the usage


@pytest.mark.parametrize(("room_mib", "helper"), [(None, True), (128, True), (127, False), (0, False)])
def test_a_helper_starts_only_with_room_for_its_model_under_a_memory_limit(room_mib, helper, monkeypatch):
    monkeypatch.setattr(spare, "memory_room_bytes", lambda: None if room_mib is None else room_mib << 20)
    assert spare.SPARE_CPU_MIN_ROOM_MIB == 128 and spare.room_for_a_helper() is helper
    assert (spare_runner(monkeypatch, room=spare.room_for_a_helper()) is not None) is helper
