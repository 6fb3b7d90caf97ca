"""Idle threads: a LiteRT interpreter's extra threads at idle priority (``app.core.runtime``), and
which models get them (``ServedModel.runner_threads``)."""

from __future__ import annotations

import gc
import os
import threading

import numpy as np
import pytest

from app.core import registry, runtime
from app.core.config import Settings
from app.core.registry import ServedModel
from app.core.runtime import IDLE_NICE, TFLiteRunner, _native_threads
from tests.support import REPO_ROOT

UNET = REPO_ROOT / "models" / "segmentation" / "1.3.0" / "model.tflite"
DIGITS = REPO_ROOT / "models" / "digits" / "1.1.0" / "model.tflite"


def niceness(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def test_an_idle_thread_is_a_new_native_thread_at_the_lowest_priority_and_changes_no_answer():
    before = _native_threads()
    runner = TFLiteRunner(UNET, 1, idle_threads=1)
    new = _native_threads() - before
    assert runner.idle_threads == 1 and len(new) == 1
    assert [niceness(tid) for tid in new] == [IDLE_NICE]
    assert niceness(threading.get_native_id()) == 0  # the calling thread keeps its priority
    tiles = np.random.default_rng(0).random((2, 272, 272, 1)).astype(np.float32)
    np.testing.assert_array_equal(runner.run(tiles), TFLiteRunner(UNET, 1).run(tiles))


def test_where_threads_cannot_be_lowered_the_interpreter_has_no_extra_thread(monkeypatch, caplog):
    def refuse(*args):
        raise PermissionError("not permitted")

    monkeypatch.setattr(runtime.os, "setpriority", refuse)
    before = _native_threads()
    runner = TFLiteRunner(UNET, 1, idle_threads=1)
    gc.collect()  # the first interpreter, made with the thread, is gone with its pool
    assert runner.idle_threads == 0 and _native_threads() == before
    assert "idle priority unavailable" in caplog.text
    tile = np.zeros((1, 272, 272, 1), np.float32)
    np.testing.assert_array_equal(runner.run(tile), TFLiteRunner(UNET, 1).run(tile))


@pytest.mark.parametrize(("cpu_max", "cpus"), [("max 100000\n", 8), ("100000 100000\n", 1),
                                               ("250000 100000\n", 2), ("50000 100000\n", 1),
                                               ("1600000 100000\n", 8), ("100000 0\n", 8), (None, 8)])
def test_usable_cpus_follow_the_cgroup_quota(cpu_max, cpus, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(8)))
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    monkeypatch.setattr(runtime, "CPU_MAX", path)
    monkeypatch.setattr(runtime, "CPU_CFS", (tmp_path / "cpu.cfs_quota_us", tmp_path / "cpu.cfs_period_us"))
    assert runtime.usable_cpus() == cpus


@pytest.mark.parametrize(("quota", "period", "cpus"), [("-1\n", "100000\n", 8), ("100000\n", "100000\n", 1),
                                                        ("250000\n", "100000\n", 2), ("50000", "100000", 1),
                                                        ("100000", "0", 8), ("100000", None, 8)])
def test_usable_cpus_follow_a_cgroup_v1_quota(quota, period, cpus, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(runtime, "CPU_MAX", tmp_path / "cpu.max")  # no cgroup v2 file
    files = (tmp_path / "cpu.cfs_quota_us", tmp_path / "cpu.cfs_period_us")
    files[0].write_text(quota)
    if period is not None:
        files[1].write_text(period)
    monkeypatch.setattr(runtime, "CPU_CFS", files)
    assert runtime.usable_cpus() == cpus


def test_without_idle_threads_the_interpreter_starts_no_thread():
    before = _native_threads()
    runner = TFLiteRunner(DIGITS, 1)
    assert runner.idle_threads == 0 and _native_threads() == before


class Heavy(ServedModel):
    task = "heavy"
    idle_threads = 1


class Light(ServedModel):
    task = "light"


def threads(model_class: type[ServedModel], cpus: int, monkeypatch, **settings) -> dict[str, int]:
    monkeypatch.setattr(registry, "usable_cpus", lambda: cpus)
    return model_class(REPO_ROOT, {}, None, Settings(**{"inference_threads": 1, "idle_threads": True,
                                                        **settings})).runner_threads()


def test_only_a_model_that_asks_gets_idle_threads_and_only_with_a_core_to_spare(monkeypatch):
    assert threads(Heavy, 2, monkeypatch) == {"num_threads": 1, "idle_threads": 1}
    assert threads(Heavy, 8, monkeypatch) == {"num_threads": 1, "idle_threads": 1}
    assert threads(Heavy, 1, monkeypatch) == {"num_threads": 1, "idle_threads": 0}
    assert threads(Light, 8, monkeypatch) == {"num_threads": 1, "idle_threads": 0}
    assert threads(Heavy, 8, monkeypatch, idle_threads=False) == {"num_threads": 1, "idle_threads": 0}
    # threads asked for at normal priority replace the idle ones
    assert threads(Heavy, 8, monkeypatch, inference_threads=2) == {"num_threads": 2, "idle_threads": 0}


def test_the_served_segmentation_model_runs_with_an_idle_thread_where_it_can(monkeypatch):
    from app.tasks.segmentation.model import SegmentationModel

    monkeypatch.setattr(registry, "usable_cpus", lambda: 2)
    model = SegmentationModel.load(UNET.parent, Settings(inference_threads=1, idle_threads=True))
    assert model.runner.idle_threads == 1


def test_idle_threads_are_off_unless_asked_for():
    assert Settings.model_fields["idle_threads"].default is False
