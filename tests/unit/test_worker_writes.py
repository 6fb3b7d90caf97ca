"""The worker's HTTP protocol writes a small answer's head and body in one write, and never holds
a head back from a client: a stream's head goes out before its first part, a 100 Continue at once.

A real uvicorn server (the worker's httptools protocol, on uvloop) in a thread; a raw socket client;
the server's writes counted on its transport."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from app.core import worker

pytestmark = pytest.mark.skipif(worker.PROTOCOL is worker.GuardedH11Protocol, reason="httptools is a serving requirement")

SMALL = b"x" * 600
LARGE = b"y" * (worker.HeadWithBody.JOIN_MAX + 1)
writes: list[bytes] = []


class CountedTransport:
    """The connection's transport, each write recorded."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CountingProtocol(worker.PROTOCOL):  # type: ignore[misc, valid-type]
    def connection_made(self, transport: Any) -> None:
        super().connection_made(CountedTransport(transport))


async def app(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    path = scope["path"]
    body = LARGE if path == "/large" else SMALL
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    if path == "/stream":  # a stream whose first part takes a while
        await asyncio.sleep(2.0)
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free, http=CountingProtocol, loop="auto",
                                          lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    yield free
    server.should_exit = True
    thread.join(10)


def read_response(sock: socket.socket, length: int) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < length:
        chunk = sock.recv(1 << 20)
        assert chunk, f"connection closed after {len(data)} bytes"
        data += chunk
    return data


def request(path: str, body: bytes = b"", extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def test_a_small_answer_is_one_write_holding_head_and_body(port):
    writes.clear()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for _ in range(3):  # keep-alive: each answer on its own
            sock.sendall(request("/small", b"digit"))
            answer = read_response(sock, len(SMALL))
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(SMALL)
    assert len(writes) == 3
    assert all(w.startswith(b"HTTP/1.1 200 OK\r\n") and w.endswith(SMALL) for w in writes)


def test_a_large_body_is_not_copied_onto_its_head(port):
    writes.clear()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request("/large"))
        assert read_response(sock, len(LARGE)).endswith(LARGE)
    assert [w[:9] for w in writes] == [b"HTTP/1.1 ", LARGE[:9]]
    assert writes[1] == LARGE


def test_a_streams_head_is_not_held_until_its_first_part(port):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(request("/stream"))
        head = sock.recv(1 << 16)
        head_after = time.monotonic() - started
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
        assert head_after < 1.0, f"head arrived after {head_after:.2f} s, with the body"
        body = b""
        while len(body) < len(SMALL):
            body += sock.recv(1 << 16)
        assert body == SMALL


def test_100_continue_is_sent_before_the_body_arrives(port):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request("/small", extra="Expect: 100-continue\r\n").replace(b"Content-Length: 0",
                                                                                 b"Content-Length: 5"))
        assert sock.recv(1 << 16) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"digit")
        assert read_response(sock, len(SMALL)).endswith(SMALL)


def test_the_head_of_an_answer_to_head_is_written_at_once(port):
    writes.clear()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"HEAD /small HTTP/1.1\r\nHost: t\r\n\r\n")
        head = sock.recv(1 << 16)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
        sock.sendall(request("/small"))  # the connection goes on
        assert read_response(sock, len(SMALL)).endswith(SMALL)


class FakeCycle:
    def __init__(self, method: str) -> None:
        self.scope = {"method": method}
        self.response_started = False
        self.transport: object = None


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False


class FakeLoop:
    def __init__(self) -> None:
        self.soon: list = []

    def call_soon(self, callback) -> None:
        self.soon.append(callback)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_only_a_head_that_a_body_follows_is_held(method):
    transport, cycle, loop = FakeTransport(), FakeCycle(method), FakeLoop()
    wrapper = worker.HeadWithBody(transport, cycle, loop)
    wrapper.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # before the response starts: at once
    assert transport.written == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    cycle.response_started = True
    wrapper.write(b"head")
    if method == "HEAD":  # no body follows: nothing to wait for
        assert transport.written[1:] == [b"head"] and not loop.soon
    else:
        assert transport.written[1:] == [] and len(loop.soon) == 1
        wrapper.write(b"body")
        loop.soon[0]()  # the end of the turn: nothing left to send
        assert transport.written[1:] == [b"headbody"]


def test_a_cycle_and_its_transport_make_no_reference_cycle():
    cycle = FakeCycle("GET")
    cycle.transport = worker.HeadWithBody(FakeTransport(), cycle, FakeLoop())
    gone = weakref.ref(cycle)
    del cycle
    assert gone() is None  # freed at once, not left to the cyclic garbage collector
