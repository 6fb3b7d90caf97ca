"""README promises that had no test: the inference and log-buffer metrics, the release-phase
migration the Procfile runs (SQLite and PostgreSQL, and failing the release when the database is
unreachable), and the prediction log's retry backoff capped at 10 s."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import create_engine, inspect

from bench.common import REPO_ROOT
from bench.liveserver import free_port, running_server, stop
from tests.monitoring_db import database_url
from tests.support import SHARED_DATA, wait_until


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
def test_the_release_phase_creates_the_schema_on_postgresql(tmp_path: Path):
    with database_url("postgresql", tmp_path) as url:  # a fresh schema, dropped afterwards
        result = run_release(url)
        assert result.returncode == 0, result.stderr
        engine = create_engine(url)
        inspector = inspect(engine)
        assert inspector.default_schema_name != "public"  # the fresh schema, not a shared one
        assert {"predictions", "feedback"} <= set(inspector.get_table_names())
        engine.dispose()


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


# ---- drift gauges refreshed in the background, and the dashboard's history ----------------------

def test_drift_gauges_refresh_on_their_own_and_the_dashboard_takes_a_history(tmp_path):
    with np.load(SHARED_DATA / "mnist" / "mnist.npz") as data:
        inverted = 255 - data["x_test"][:120]
    env = {"DRIFT_REFRESH_S": "1", "ADMIN_TOKEN": "promise-token", "LOG_FLUSH_INTERVAL_S": "0.1",
           "DATABASE_URL": f"sqlite:///{tmp_path / 'log.db'}"}
    with running_server(workers=1, env=env) as live, httpx.Client(base_url=live.base_url, timeout=60) as client:
        assert client.post("/v1/digits/predict", json={"instances": [
            {"pixels": im.tolist()} for im in inverted]}).status_code == 200
        # No one asks for a drift report: the worker's refresh (every DRIFT_REFRESH_S) sets the gauge.
        wait_until(lambda: metric(client.get("/metrics").text, "model_drift_detected", model="digits") == 1.0,
                   20, 0.2, what="model_drift_detected to be refreshed")
        admin = {"Authorization": "Bearer promise-token"}
        day = client.get("/v1/monitoring/dashboard?history=24h", headers=admin)
        hour = client.get("/v1/monitoring/dashboard?history=1h", headers=admin)
        assert day.status_code == hour.status_code == 200 and "<svg" in day.text
        assert "1h" in hour.text and day.text != hour.text
        bad = client.get("/v1/monitoring/dashboard?history=soon", headers=admin)
        assert (bad.status_code, bad.json()["code"], bad.json()["field"]) == (422, "invalid-window", "history")


# ---- an animated GIF is read from its first frame -----------------------------------------------

def test_an_animated_gif_is_classified_by_its_first_frame(client):
    with np.load(SHARED_DATA / "mnist" / "mnist.npz") as data:
        seven, two = data["x_test"][0], data["x_test"][1]
        data_labels = (int(data["y_test"][0]), int(data["y_test"][1]))  # a 7, then a 2

    def gif(first: np.ndarray, second: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(first).save(buffer, format="GIF", save_all=True,
                                    append_images=[Image.fromarray(second)], duration=100, loop=0)
        return buffer.getvalue()

    for frames, digit in (((seven, two), data_labels[0]), ((two, seven), data_labels[1])):
        response = client.post("/v1/digits/predict", files={"image": ("a.gif", gif(*frames), "image/gif")})
        assert response.status_code == 200 and response.json()["predictions"][0]["digit"] == digit


# ---- the Docker image's files and settings serve -----------------------------------------------

def dockerfile() -> dict:
    """ENV, COPY sources, CMD and HEALTHCHECK of the Dockerfile (the daemon is not available here,
    so the image is emulated: its files only, its environment, its command)."""
    text_ = (REPO_ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    env, copies, cmd, health = {}, [], None, None
    for line in text_.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "FROM":  # each stage has its own settings: the last stage's are the image's
            env = {}
        if words[0] == "ENV":
            env.update({k: os.path.expandvars(v) for k, v in (w.split("=", 1) for w in shlex.split(line)[1:])})
        elif words[0] == "COPY" and not any(w.startswith("--from") for w in words):  # the repo's files only
            copies += [w for w in words[1:-1] if not w.startswith("--")]
        elif words[0] == "CMD":
            cmd = json.loads(line.split(None, 1)[1])
        elif words[0] == "HEALTHCHECK":
            health = shlex.split(line.split(" CMD ", 1)[1])
        elif words[0] == "USER":
            env["__user"] = words[1]
    return {"env": env, "copies": copies, "cmd": cmd, "health": health}


def test_the_docker_image_file_set_serves_with_its_command_and_health_check(tmp_path):
    spec = dockerfile()
    assert spec["env"].pop("__user") != "root"
    assert spec["cmd"][0] == "gunicorn" and spec["cmd"][1:] == procfile_web()[1:]
    assert "requirements.txt" in spec["copies"] and "requirements-train.txt" not in spec["copies"]
    root = tmp_path / "image"
    for source in spec["copies"]:
        target = root / source
        if (REPO_ROOT / source).is_dir():
            shutil.copytree(REPO_ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO_ROOT / source, target)
    port = free_port()
    env = {"PATH": os.environ["PATH"], **spec["env"], "PORT": str(port),
           "DATABASE_URL": f"sqlite:///{tmp_path / 'predictions.db'}",
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    process = subprocess.Popen([gunicorn, *spec["cmd"][1:]], cwd=root, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"

        def serving() -> bool:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(base + "/health/ready", timeout=2).status_code == 200:
                    return True
            assert process.poll() is None, "the image's command did not serve"
            return False

        wait_until(serving, 90, 0.2, what="the image's command to serve")
        digit = (REPO_ROOT / "examples" / "digit-7.png").read_bytes()
        answer = httpx.post(base + "/v1/digits/predict", files={"image": ("7.png", digit, "image/png")})
        assert answer.status_code == 200 and answer.json()["predictions"][0]["digit"] == 7
        health = spec["health"]
        assert health[0] == "python"
        check = subprocess.run([sys.executable, *health[1:]], env=env, timeout=10)
        assert check.returncode == 0
    finally:
        stop(process)


def procfile_web() -> list[str]:
    line = next(x for x in (REPO_ROOT / "Procfile").read_text().splitlines() if x.startswith("web:"))
    return line.split(":", 1)[1].split()
