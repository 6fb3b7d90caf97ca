"""Databases for the monitoring tests: the same suite runs on SQLite and on PostgreSQL.

PostgreSQL is ``TEST_DATABASE_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``,
trust auth, as in CI). Every test gets its own schema (``search_path`` in the URL), dropped
afterwards, so concurrent runs never see each other's rows. When PostgreSQL is unreachable the
PostgreSQL cases are skipped locally but FAIL under ``CI=true``: CI must test both.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from app.core.config import Settings

PG_URL = Settings(database_url=os.environ.get(
    "TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")).database_url
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def pg_address(url: str = PG_URL) -> tuple[str, int]:
    """Host and port of the PostgreSQL server ``url`` names (what an outage proxy relays to)."""
    parsed = make_url(url)
    return parsed.host or "127.0.0.1", parsed.port or 5432


def pg_unreachable_reason() -> str | None:
    url = make_url(PG_URL)
    try:
        engine = create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable" here
        return f"PostgreSQL at {url.render_as_string(hide_password=True)} unreachable: {type(exc).__name__}: {exc}"


def require_pg() -> None:
    reason = pg_unreachable_reason()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " (CI=true: the PostgreSQL suite must run)")
    pytest.skip(reason)


def with_search_path(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}options={quote(f'-csearch_path={schema}')}"


@contextlib.contextmanager
def database_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database URL for ``backend`` (``sqlite`` or ``postgresql``)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'predictions.db'}"
        return
    require_pg()
    schema = f"mon_test_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield with_search_path(PG_URL, schema)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


class TcpProxy:
    """A TCP relay to PostgreSQL that a test can cut (``stop``) and restore (``start``) on the same
    port: from the app's side, exactly a database server going away and coming back. ``hang``
    keeps every connection open and accepts new ones but relays nothing until ``resume``: a server
    that has stopped answering."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._relaying = threading.Event()
        self._relaying.set()

    def hang(self) -> None:
        self._relaying.clear()

    def resume(self) -> None:
        self._relaying.set()

    def url_for(self, url: str) -> str:
        parsed = make_url(url)
        return parsed.set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Refuse new connections and cut every open one."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=3)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self._relaying.wait()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def sqlite_locked(url: str) -> Iterator[None]:
    """Hold an exclusive lock on a SQLite database: every writer gets 'database is locked'."""
    import sqlite3

    conn = sqlite3.connect(make_url(url).database, timeout=5, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()
