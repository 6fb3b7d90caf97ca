"""A receiver of the Prometheus Pushgateway protocol (PUT /metrics/job/<job>/<label>/<value> with the
text format), recording every push: what the metrics pusher's tests send their pushes to."""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Push:
    method: str
    path: str
    authorization: str
    body: str
    at: float = field(default_factory=time.monotonic)

    def sample(self, name: str, **labels: str) -> float | None:
        for family in text_string_to_metric_families(self.body):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return None


class Receiver(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        self.pushes: list[Push] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
                receiver.pushes.append(Push(self.command, self.path, self.headers.get("authorization", ""), body))
                self.send_response(200)
                self.end_headers()

            do_POST = do_PUT

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://pusher:s3cret@127.0.0.1:{self.server_address[1]}"

    def wait_for(self, condition, timeout: float = 20.0) -> Push:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for push in reversed(self.pushes):
                if condition(push):
                    return push
            time.sleep(0.1)
        raise AssertionError(f"no such push in {len(self.pushes)}: {[p.path for p in self.pushes[-3:]]}")


@contextlib.contextmanager
def receiving() -> Iterator[Receiver]:
    """A :class:`Receiver` answering on a free loopback port while the block runs."""
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
