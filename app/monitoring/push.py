"""Each dyno pushes its metrics to a Prometheus Pushgateway (or a receiver that speaks its protocol,
such as VictoriaMetrics), when ``METRICS_PUSH_URL`` is set.

On Heroku a scrape of ``/metrics`` reaches one dyno chosen by the router, and no dyno can be
addressed on its own, so a scraper cannot collect them all; each dyno sends its own instead. Every
``METRICS_PUSH_INTERVAL_S`` one worker per dyno, the one holding a lock file in the dyno's
``PROMETHEUS_MULTIPROC_DIR``, PUTs the dyno's metrics (every worker's, as ``/metrics`` serves them)
to ``<url>/metrics/job/<METRICS_PUSH_JOB>/dyno/<DYNO>``, replacing what that dyno pushed before. If
that worker exits, the kernel releases its lock and another worker takes over within an interval.
Credentials in the URL (``https://user:password@host``) are sent as HTTP basic auth. A failed push is
logged once until one succeeds again; serving is never affected.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from prometheus_client.exposition import basic_auth_handler, default_handler, push_to_gateway

from app.monitoring.metrics import exposition_registry
from app.monitoring.periodic import Periodic

log = logging.getLogger("app.monitoring.push")

LOCK_NAME = "metrics-push.lock"
PUSH_TIMEOUT_S = 5.0


def dyno_name() -> str:
    """The grouping key's value: Heroku's ``DYNO`` (``web.1``), else the host name (a container id)."""
    return os.environ.get("DYNO", "").strip() or socket.gethostname()


def split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """The URL without its user information, and that user and password (if any)."""
    parts = urlsplit(url)
    if parts.username is None:
        return url, None
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc)), (parts.username, parts.password or "")


class MetricsPusher(Periodic):
    name = "metrics-pusher"
    failure = "metrics not pushed"
    run_at_start = True

    def __init__(self, url: str, job: str, interval_s: float, lock_dir: str | None = None) -> None:
        super().__init__(interval_s)
        self.gateway, credentials = split_credentials(url)
        self.job = job
        self.grouping_key = {"dyno": dyno_name()}
        self.handler = default_handler
        if credentials is not None:
            user, password = credentials

            def handler(url: str, method: str, timeout: float | None, headers: list, data: bytes) -> Any:
                return basic_auth_handler(url, method, timeout, headers, data, user, password)

            self.handler = handler
        lock_dir = lock_dir if lock_dir is not None else os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self.lock_path = Path(lock_dir) / LOCK_NAME if lock_dir else None
        self._lock: IO[str] | None = None
        self.pushes = 0

    def holds_lock(self) -> bool:
        """Whether this process is the dyno's pusher, taking the lock if it is free. Without a
        multiprocess directory this process is the only one, and always pushes."""
        if self.lock_path is None or self._lock is not None:
            return True
        handle = open(self.lock_path, "a")  # noqa: SIM115 (kept open while the lock is held)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._lock = handle
        log.info("this worker pushes the dyno's metrics",
                 extra={"gateway": self.gateway, "job": self.job, "dyno": self.grouping_key["dyno"]})
        return True

    def push(self) -> None:
        push_to_gateway(self.gateway, job=self.job, registry=exposition_registry(),
                        grouping_key=self.grouping_key, timeout=PUSH_TIMEOUT_S, handler=self.handler)
        self.pushes += 1

    def work(self) -> None:
        if self.holds_lock():
            self.push()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop, with a last push of what this dyno served since the previous one."""
        super().stop(timeout)
        if self._lock is not None:
            with contextlib.suppress(Exception):
                self.push()
            self._lock.close()
            self._lock = None
