"""README promises that had no test: the inference and log-buffer metrics, the release-phase
migration the Procfile runs (SQLite and PostgreSQL, and failing the release when the database is
unreachable), and the prediction log's retry backoff capped at 10 s."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, inspect, text

from bench.common import REPO_ROOT
from tests.monitoring_db import PG_URL, require_pg, with_search_path


def metric(text_: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0.0 when absent)."""
    for line in text_.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_inference_duration_and_buffered_rows_are_exported(client, live_server):
    before = httpx.get(live_server + "/metrics").text
    count = metric(before, "inference_duration_seconds_count", model="clustering")
    for _ in range(3):
        assert client.post("/v1/clustering/predict", json={"instances": [
            {"annual_income": 15, "spending_score": 39}]}).status_code == 200
    after = httpx.get(live_server + "/metrics").text
    assert metric(after, "inference_duration_seconds_count", model="clustering") >= count + 3
    assert metric(after, "inference_duration_seconds_sum", model="clustering") > 0
    assert re.search(r"^prediction_log_buffered_rows(\{[^}]*\})? \d", after, re.M), \
        "prediction_log_buffered_rows is not exported"


def procfile_release() -> list[str]:
    line = next(x for x in (REPO_ROOT / "Procfile").read_text().splitlines() if x.startswith("release:"))
    command = line.split(":", 1)[1].split()
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


def run_release(database_url: str) -> subprocess.CompletedProcess:
    return subprocess.run(procfile_release(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DATABASE_URL": database_url})


def test_the_release_phase_creates_the_schema_on_sqlite(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    result = run_release(url)
    assert result.returncode == 0, result.stderr
    tables = inspect(create_engine(url)).get_table_names()
    assert {"predictions", "feedback"} <= set(tables), tables
    assert run_release(url).returncode == 0  # idempotent: every deploy runs it again


@pytest.mark.postgres
def test_the_release_phase_creates_the_schema_on_postgresql():
    require_pg()
    schema = f"release_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = with_search_path(PG_URL, schema)
        result = run_release(url)
        assert result.returncode == 0, result.stderr
        assert "predictions" in inspect(create_engine(url)).get_table_names(schema=schema)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def test_the_release_phase_fails_when_the_database_is_unreachable():
    result = run_release("postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=2")
    assert result.returncode != 0  # Heroku then keeps the previous release


def test_the_log_writer_backs_off_to_at_most_10_s(monkeypatch):
    """During an outage the writer retries at 0.5, 1, 2, 4, 8, then every 10 s (never more)."""
    from app.monitoring.store import PredictionLog

    waits: list[float] = []
    log = PredictionLog.__new__(PredictionLog)  # only the writer loop's timing is exercised
    log.flush_interval_s, log.max_backoff_s = 0.5, 10.0
    log._outage_since = time.monotonic()
    log._size = 1

    class Wake:
        def wait(self, seconds: float) -> None:
            waits.append(seconds)
            if len(waits) >= 9:
                log._stop.set()

        def clear(self) -> None:
            pass

    import threading

    log._wake, log._stop = Wake(), threading.Event()
    log._write_once = lambda: False  # the database stays down
    log._run()
    assert waits[:8] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
