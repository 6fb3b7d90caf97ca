"""Start the real server (the Procfile's gunicorn command) on a free loopback port.

Used by the contract tests' ``live_server`` fixture and by the bench scripts, so both measure what
Heroku and Docker run. The server's output goes to a log file that is printed if it fails to start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    base_url: str
    process: subprocess.Popen
    log_path: Path
    boot_seconds: float
    database_url: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def access_entries(self, needle: str, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The access-log entries (parsed) whose line contains ``needle``, once at least ``count``
        are written: a worker writes a request's line after its answer is sent, so a client that
        has its answer may not see the line yet. Raises AssertionError after ``timeout`` s."""
        import json

        deadline = time.monotonic() + timeout
        while True:
            found = [json.loads(line) for line in self.log_text().splitlines()
                     if needle in line and '"logger":"app.access"' in line]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(found)} of {count} access-log lines with {needle!r} "
                                     f"after {timeout:.0f} s")
            time.sleep(0.05)

    def worker_pids(self) -> list[int]:
        import psutil

        return [c.pid for c in psutil.Process(self.pid).children()]

    def rss_mib(self) -> dict[int, float]:
        """RSS of each worker process, MiB."""
        import psutil

        out = {}
        for pid in self.worker_pids():
            with contextlib.suppress(psutil.Error):
                out[pid] = psutil.Process(pid).memory_info().rss / 1048576
        return out

    def pss_mib(self) -> float:
        """PSS of the master and its workers together, MiB: what the processes cost the machine."""
        import psutil

        total = 0.0
        for proc in [psutil.Process(self.pid), *psutil.Process(self.pid).children()]:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_full_info().pss / 1048576
        return total


class MemorySampler:
    """Samples the workers' RSS (and optionally the total PSS) in a thread while a block runs.

    ``peak_growth_mib``: the largest rise of any one worker's RSS over its value at the start.
    """

    def __init__(self, server: LiveServer, interval: float = 0.02, pss: bool = False) -> None:
        import threading

        self.server = server
        self.interval = interval
        self.pss = pss
        self.start_rss: dict[int, float] = {}
        self.peak_rss: dict[int, float] = {}
        self.peak_pss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for pid, rss in self.server.rss_mib().items():
            self.peak_rss[pid] = max(self.peak_rss.get(pid, 0.0), rss)
            self.start_rss.setdefault(pid, rss)
        if self.pss:
            self.peak_pss = max(self.peak_pss, self.server.pss_mib())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> MemorySampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def peak_growth_mib(self) -> float:
        return max((self.peak_rss[p] - self.start_rss[p] for p in self.peak_rss), default=0.0)


def _file_limit(files: int | None) -> Any:
    if files is None:
        return None

    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))

    return limit


@contextlib.contextmanager
def running_server(env: dict[str, str] | None = None, *, workers: int = 1, ready: bool = True,
                   timeout: float = 90.0, python: str | None = None,
                   cwd: Path = REPO_ROOT, max_open_files: int | None = None) -> Iterator[LiveServer]:
    """Yield a :class:`LiveServer` once its master has forked ``workers`` workers and one answers:
    ``ready=True`` waits for /health/ready 200, else /health/live.
    ``cwd``: the checkout to serve (another one than this, e.g. an earlier commit, to compare).
    ``max_open_files``: the server's file limit (soft and hard), as a small dyno might have."""
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="liveserver-"))
    server_env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "WEB_CONCURRENCY": str(workers),
        "DATABASE_URL": f"sqlite:///{tmp / 'predictions.db'}",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp / "prometheus"),
        "LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
        # As `make serve` does: the admin endpoints open without a token. A caller that sets
        # ADMIN_TOKEN (or ADMIN_OPEN=false) gets the production behaviour.
        "ADMIN_OPEN": "true",
        **(env or {}),
    }
    bin_dir = Path(python or sys.executable).parent
    log_path = tmp / "server.log"
    started = time.perf_counter()
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [str(bin_dir / "gunicorn"), "-c", "gunicorn.conf.py", "app.main:app"],
            cwd=cwd, env=server_env, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_file_limit(max_open_files))
    base_url = f"http://127.0.0.1:{port}"
    server = LiveServer(base_url, process, log_path, 0.0, server_env["DATABASE_URL"])
    try:
        path = "/health/ready" if ready else "/health/live"
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_text()[-5000:]}")
            try:
                # One worker answering is not all of them: the master forks them one after another.
                if httpx.get(base_url + path, timeout=2.0).status_code == 200 \
                        and len(server.worker_pids()) >= workers:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not answering {path} within {timeout:.0f}s:\n"
                                   f"{server.log_text()[-5000:]}")
            time.sleep(0.1)
        server.boot_seconds = time.perf_counter() - started
        yield server
    finally:
        stop(process)
        shutil.rmtree(tmp, ignore_errors=True)


def stop(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM the process's group (started with ``start_new_session``), then SIGKILL past
    ``timeout``. The group is signalled even when its leader has already exited: a server that
    runs children (LitServe's inference worker) may have left them behind."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    if process.poll() is not None:
        return
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def serving_version(task: str, version: str, python: str | None = None) -> Iterator[httpx.Client]:
    """A client of a real server that serves ``version`` of ``task`` (``MODEL_VERSIONS``), once that
    model is loaded; exits if the server serves another version."""
    import json

    from bench.common import wait_for_model

    with running_server({"MODEL_VERSIONS": json.dumps({task: version})}, python=python, ready=False) as server, \
            httpx.Client(base_url=server.base_url, timeout=120.0) as client:
        served = wait_for_model(client, task)
        if served != version:
            raise SystemExit(f"asked for {task} {version}, the server serves {served}")
        yield client
