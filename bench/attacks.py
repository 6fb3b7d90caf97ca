"""Attacks on a running server and an honest client measuring what it gets meanwhile: shared by the
abuse contract tests (tests/contract/test_abuse.py) and bench/abuse.py."""

from __future__ import annotations

import concurrent.futures
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx

from bench.common import mnist_digit_png

HONEST_ADDRESS = "198.51.100.7"  # the honest client's address, as a trusted proxy reports it


@dataclass
class HonestClient:
    """Light requests at a steady pace, each on a new connection, from ``address`` (sent as the
    proxy's X-Forwarded-For; the test server trusts loopback as its proxy), in a thread."""

    base_url: str
    address: str = HONEST_ADDRESS
    interval_s: float = 0.05
    latencies_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._png = mnist_digit_png()

    def _one(self, client: httpx.Client, turn: int) -> None:
        headers = {"X-Forwarded-For": self.address, "Connection": "close"}
        started = time.perf_counter()
        try:
            if turn % 3 == 0:
                response = client.get("/health/live", headers=headers)
            elif turn % 3 == 1:
                response = client.post("/v1/digits/predict", content=self._png,
                                       headers={**headers, "Content-Type": "image/png"})
            else:
                response = client.post("/v1/clustering/predict", headers=headers,
                                       json={"instances": [{"annual_income": 60, "spending_score": 50}]})
        except httpx.HTTPError as exc:
            self.failures.append(f"{type(exc).__name__}: {exc}")
            self.latencies_s.append(time.perf_counter() - started)
            return
        self.latencies_s.append(time.perf_counter() - started)
        if response.status_code != 200:
            self.failures.append(f"{response.status_code} {response.text[:200]}")

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=30.0,
                          limits=httpx.Limits(max_keepalive_connections=0)) as client:
            turn = 0
            while not self._stop.is_set():
                self._one(client, turn)
                turn += 1
                self._stop.wait(self.interval_s)

    def __enter__(self) -> HonestClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def p99_s(self) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]

    def assert_served(self) -> None:
        """Every request answered 200, and the slowest 1 % within 1 s: two orders of magnitude above
        a light request's time on an idle worker, so only a starved worker fails it."""
        assert len(self.latencies_s) >= 10, f"only {len(self.latencies_s)} honest requests were made"
        assert not self.failures, f"{len(self.failures)} of {len(self.latencies_s)} failed: {self.failures[:3]}"
        assert self.p99_s < 1.0, f"honest p99 {self.p99_s:.2f} s"


def post_many(base_url: str, path: str, body: bytes, content_type: str, count: int, clients: int) -> list[int]:
    """``count`` POSTs of ``body`` to ``path`` from ``clients`` threads at once; their statuses, in order."""
    def post(_: int) -> int:
        return httpx.post(base_url + path, content=body, timeout=60, headers={"Content-Type": content_type}).status_code

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return list(pool.map(post, range(count)))


def host_port(base_url: str) -> tuple[str, int]:
    address = httpx.URL(base_url)
    return address.host, address.port or 80


@contextlib.contextmanager
def open_sockets(base_url: str, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections that send nothing."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.create_connection(host_port(base_url), timeout=5)
            sockets.append(s)
        yield sockets
    finally:
        for s in sockets:
            s.close()


def closed_by_peer(s: socket.socket) -> bool:
    """Whether the server has closed this connection (EOF or reset); never blocks."""
    s.setblocking(False)
    try:
        while True:
            if s.recv(1 << 16) == b"":
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        s.setblocking(True)


def request_head(path: str, host: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Trickle:
    """Connections that each send a request head declaring a body, then one byte every
    ``every_s``: uploads that never finish within a test."""

    def __init__(self, base_url: str, path: str, count: int, *, address: str, every_s: float = 2.0,
                 content_type: str = "image/png", length: int = 4096) -> None:
        self.base_url, self.path, self.count, self.every_s = base_url, path, count, every_s
        self.head = request_head(path, host_port(base_url)[0], {
            "Content-Type": content_type, "Content-Length": str(length), "X-Forwarded-For": address})
        self.sockets: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            for s in self.sockets:
                with contextlib.suppress(OSError):
                    s.send(b"\x00")

    def __enter__(self) -> Trickle:
        for _ in range(self.count):
            s = socket.create_connection(host_port(self.base_url), timeout=5)
            s.sendall(self.head + b"\x00")
            self.sockets.append(s)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for s in self.sockets:
            s.close()

    def answered(self, timeout_s: float = 0.5) -> list[bytes]:
        """The status lines the server has sent on these connections so far."""
        lines = []
        for s in self.sockets:
            s.settimeout(timeout_s)
            with contextlib.suppress(OSError):
                data = s.recv(4096)
                if data:
                    lines.append(data.split(b"\r\n", 1)[0])
        return lines
