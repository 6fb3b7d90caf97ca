"""Contract tests talk to a real gunicorn server (the Procfile command) with httpx."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from bench.liveserver import LiveServer, running_server


@pytest.fixture(scope="session")
def server() -> Iterator[LiveServer]:
    """One server on the committed models, two workers, a throw-away SQLite prediction log."""
    with running_server(workers=2) as live:
        yield live


@pytest.fixture(scope="session")
def live_server(server: LiveServer) -> str:
    return server.base_url


@pytest.fixture
def client(live_server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server, timeout=30.0) as c:
        yield c
