"""A daemon thread that does some work every interval (drift gauges, purges, metrics pushes)."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("app.monitoring")


class Periodic:
    """A daemon thread calling ``work()`` every ``interval_s`` (first at start-up when
    ``run_at_start``). A failure (the database may be down; the log writer reports outages) is
    logged once until the work succeeds again."""

    name = "periodic"
    failure = "periodic work failed"
    run_at_start = False

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._failing = False

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def work(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        if not self.run_at_start and self._stop.wait(self.interval_s):
            return
        while True:
            try:
                self.work()
                self._failing = False
            except Exception as exc:
                if not self._failing:
                    log.warning(self.failure, extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
                self._failing = True
            if self._stop.wait(self.interval_s):
                return
