"""LiteRT (TFLite) runtime: one interpreter per worker process, guarded by a lock.

TensorFlow is for training only; serving loads the ``.tflite`` (fp32, or int8 with float32 edges)
exported by ``training/`` with ``ai-edge-litert`` (~100 MiB RSS and a fraction of a second to load,
against ~590 MiB for TF).
An interpreter is not thread-safe, and FastAPI runs blocking work on a thread pool, so ``run`` holds
a lock for the resize/set/invoke/get sequence.

Idle threads: an interpreter of one thread may be given threads at idle priority (Linux nice 19).
XNNPACK splits each operator between all its threads, so on an idle machine a model with one idle
thread runs as on two threads. When other work keeps the cores busy, the idle thread gets almost
no time, and the operator it holds a part of waits for it: a lone 512x512 segmentation takes 0.58
of the time, but beside other requests the model's rate varies, from half to nearly twice the
one-thread rate (docs/performance.md#segmentation-versions). Where the threads cannot be lowered
(no /proc, or not permitted), the interpreter is made again without them and a warning is logged. Interpreters
are made one at a time in a process: an interpreter's new threads are told apart as those that
appeared meanwhile and are not Python's.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter

log = logging.getLogger("app.runtime")


class TFLiteRunner:
    """A ``.tflite`` model with one float32 input and one float32 output, any batch size.

    Batches larger than ``max_batch`` run in slices of ``max_batch``: the interpreter's activation
    arena is sized for the largest batch it has seen and kept, so one request with many windows or
    tiles would otherwise leave the worker that much larger for good. A model exported for a batch
    of exactly one (segmentation 1.2.0 and 1.3.0: constant shapes, so XNNPACK runs every operator) takes its
    rows one at a time.

    Every call starts from the model's initial state: LiteRT keeps a recurrent layer's state (the
    emotion model's LSTMs) in variable tensors that would otherwise carry one call's end into the
    next, making an answer depend on the request before it. Resetting them costs 0.3 us."""

    def __init__(self, path: Path, num_threads: int = 1, max_batch: int = 32, idle_threads: int = 0) -> None:
        self.path = Path(path)
        self.threads = num_threads  # at normal priority
        with _CREATING:  # one interpreter at a time: the threads that appear meanwhile are its own
            known = _native_threads() if idle_threads else set()
            self._interpreter = self._create(num_threads + idle_threads)
            # The thread pool starts with the delegate, by now: its threads are the new native
            # threads that are not Python's. They all go to idle priority; the calling thread
            # keeps its own, so the work a request needs is done at normal priority.
            python = {t.native_id for t in threading.enumerate()}
            pool = _native_threads() - known - python if idle_threads else set()
            self.idle_threads = _to_idle_priority(pool)  # the threads at idle priority it has
        if self.idle_threads != idle_threads:  # no /proc, or not permitted: no extra threads
            log.warning("LiteRT threads at idle priority unavailable; one thread of its own",
                        extra={"model_file": str(self.path), "asked": idle_threads,
                               "lowered": self.idle_threads, "pool_threads": len(pool)})
            self.idle_threads = 0
            with _CREATING:
                self._interpreter = self._create(num_threads)
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        self.max_batch = 1 if int(self._input["shape_signature"][0]) == 1 else max_batch
        self._shape = tuple(int(d) for d in self._input["shape"])
        self._lock = threading.Lock()

    def _create(self, threads: int) -> Interpreter:
        interpreter = Interpreter(model_path=str(self.path), num_threads=threads)
        interpreter.allocate_tensors()
        return interpreter

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Declared input shape, batch dimension first (-1 where the model accepts any size)."""
        return tuple(int(d) for d in self._input["shape_signature"])

    @property
    def output_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self._output["shape_signature"])

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on ``batch`` (batch dimension first) and return a copy of the output."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.shape[0] > self.max_batch:
            return np.concatenate([self._run(batch[i:i + self.max_batch])
                                   for i in range(0, batch.shape[0], self.max_batch)])
        return self._run(batch)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            if batch.shape != self._shape:
                self._interpreter.resize_tensor_input(self._input["index"], list(batch.shape))
                self._interpreter.allocate_tensors()
                self._shape = batch.shape
            self._interpreter.reset_all_variables()
            self._interpreter.set_tensor(self._input["index"], batch)
            self._interpreter.invoke()
            return np.array(self._interpreter.get_tensor(self._output["index"]))


IDLE_NICE = 19  # the lowest priority: a weight of 15 against a normal thread's 1024
CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"
CPU_CFS = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),  # cgroup v1: "<quota>" (-1: none)
           Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))  # and "<period>"
_CREATING = threading.Lock()


def _native_threads() -> set[int]:
    """This process's thread ids (Linux; empty where /proc is missing)."""
    try:
        return {int(tid) for tid in os.listdir("/proc/self/task")}
    except OSError:
        return set()


def _to_idle_priority(threads: set[int]) -> int:
    """Lower each of ``threads`` (native thread ids) to idle priority; how many were lowered."""
    lowered = 0
    for tid in sorted(threads):
        try:
            os.setpriority(os.PRIO_PROCESS, tid, IDLE_NICE)  # on Linux: that thread only
            lowered += 1
        except OSError:  # gone already, or not permitted: it keeps the normal priority
            pass
    return lowered


def usable_cpus() -> int:
    """The CPUs this process may use: those it may run on, fewer under a cgroup CPU quota
    (``docker --cpus``, a dyno's share), rounded down, at least one."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, int(quota)))
    return cpus


def _cpu_quota() -> float | None:
    """The cgroup's CPU quota in CPUs (quota over period; cgroup v2, else v1), None without one."""
    try:
        quota, period = CPU_MAX.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        pass
    try:
        quota, period = (int(path.read_text()) for path in CPU_CFS)
        return None if quota < 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None
