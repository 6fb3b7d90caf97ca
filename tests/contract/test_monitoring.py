"""Monitoring against real gunicorn servers: the prediction log, drift on shifted digits, two
processes sharing one database, and a database outage in the middle of traffic.

Every test runs on SQLite and on PostgreSQL (tests/monitoring_db.py); the PostgreSQL servers reach
the database through a TCP proxy the outage test cuts and restores. Inputs are real MNIST test
digits (the data the digits reference was built on), as sent by clients: 28x28 0-255 pixels.
"""

from __future__ import annotations

import contextlib
import time

import httpx
import numpy as np
import pytest
from sqlalchemy import func, select

from app.monitoring.store import make_engine, predictions
from bench.liveserver import LiveServer, running_server
from tests import monitoring_db
from tests.monitoring_db import TcpProxy, pg_address, sqlite_locked
from tests.support import SHARED_DATA, wait_until

MNIST = SHARED_DATA / "mnist" / "mnist.npz"
TOKEN = "contract-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
N = 300  # digits per scenario: well above DRIFT_MIN_SAMPLES (30)


@pytest.fixture(scope="module")
def mnist_test_digits() -> np.ndarray:
    with np.load(MNIST) as data:
        images = data["x_test"]
    pick = np.random.default_rng(0).choice(len(images), size=N, replace=False)
    return images[pick].astype(np.uint8)


@pytest.fixture(scope="module", params=monitoring_db.BACKENDS)
def backend(request, tmp_path_factory):
    """(database URL the servers use, URL the test reads, cut(), restore())."""
    with monitoring_db.database_url(request.param, tmp_path_factory.mktemp("db")) as url:
        if request.param == "sqlite":
            locks: list[contextlib.ExitStack] = []

            def cut() -> None:
                stack = contextlib.ExitStack()
                stack.enter_context(sqlite_locked(url))
                locks.append(stack)

            def restore() -> None:
                locks.pop().close()

            yield url, url, cut, restore
            while locks:
                restore()
        else:
            proxy = TcpProxy(pg_address(url))
            proxy.start()
            try:
                yield proxy.url_for(url), url, proxy.stop, proxy.start
            finally:
                proxy.stop()


def server_env(database_url: str) -> dict[str, str]:
    """One deployment's settings: every server started with them is a dyno of it (one REQUEST_ID_SECRET,
    so each recognises the others' fresh request ids)."""
    return {"DATABASE_URL": database_url, "ADMIN_TOKEN": TOKEN, "LOG_FLUSH_INTERVAL_S": "0.1",
            "DRIFT_REFRESH_S": "1", "REQUEST_ID_SECRET": "monitoring-test-request-id-secret"}


@pytest.fixture(scope="module")
def server(backend):
    with running_server(env=server_env(backend[0]), workers=1, ready=False) as live:
        models = {m["task"]: m for m in httpx.get(live.base_url + "/v1/models").json()["models"]}
        assert models.get("digits", {}).get("ready"), f"the digits model must be loaded: {models.get('digits')}"
        yield live


def predict_digits(base_url: str, images: np.ndarray, issued: list[str] | None = None) -> httpx.Response:
    """POST the images; the request id the server issued is appended to ``issued``."""
    body = {"instances": [{"pixels": img.tolist()} for img in images]}
    response = httpx.post(base_url + "/v1/digits/predict", json=body, timeout=60)
    if issued is not None and response.status_code == 200:
        issued.append(response.json()["request_id"])
    return response


def predict_in_batches(base_url: str, images: np.ndarray, batch: int = 100) -> list[int]:
    """Status codes of sending ``images`` 100 per request (the digits API takes up to 256)."""
    return [predict_digits(base_url, images[i:i + batch]).status_code
            for i in range(0, len(images), batch)]


def drift_report(base_url: str, window: str) -> dict:
    response = httpx.get(base_url + "/v1/monitoring/drift", params={"model": "digits", "window": window},
                         headers=ADMIN, timeout=30)
    assert response.status_code == 200, response.text
    (report,) = response.json()["models"]
    return report


def count_rows(read_url: str, request_ids: list[str]) -> int:
    engine = make_engine(read_url)
    try:
        with engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(predictions)
                                .where(predictions.c.request_id.in_(request_ids))).scalar_one()
    finally:
        engine.dispose()


def wait_for_rows(read_url: str, request_ids: list[str], expected: int, timeout: float = 30.0) -> int:
    """How many rows ``request_ids`` have, once there are ``expected`` (or at timeout)."""
    counted = 0

    def enough() -> bool:
        nonlocal counted
        counted = count_rows(read_url, request_ids)
        return counted >= expected

    wait_until(enough, timeout, 0.2)
    return counted


def wait_for_write_failures(base_url: str, timeout: float = 20.0) -> float:
    """``prediction_log_write_failures_total`` from /metrics, once it is non-zero (or at timeout)."""
    value = 0.0

    def failed() -> bool:
        nonlocal value
        lines = [line for line in httpx.get(base_url + "/metrics").text.splitlines()
                 if line.startswith("prediction_log_write_failures_total")]
        value = float(lines[0].split()[-1]) if lines else 0.0
        return value >= 1

    wait_until(failed, timeout, 0.2)
    return value


def test_real_digits_are_not_flagged_and_inverted_or_noisy_digits_are(server: LiveServer, mnist_test_digits):
    assert predict_in_batches(server.base_url, mnist_test_digits) == [200, 200, 200]
    unshifted = drift_report(server.base_url, str(N))

    assert predict_in_batches(server.base_url, 255 - mnist_test_digits) == [200, 200, 200]
    after_inversion = drift_report(server.base_url, str(N))

    rng = np.random.default_rng(1)
    noisy_images = np.clip(mnist_test_digits + rng.normal(0, 60, mnist_test_digits.shape), 0, 255).astype(np.uint8)
    assert predict_in_batches(server.base_url, noisy_images) == [200, 200, 200]
    after_noise = drift_report(server.base_url, str(N))

    assert unshifted["n"] == N
    assert unshifted["status"] in ("ok", "warning"), unshifted
    assert all(f["status"] != "drift" for f in unshifted["features"].values()), unshifted["features"]
    assert (after_inversion["status"], after_inversion["features"]["inverted"]["status"],
            after_inversion["features"]["raw_mean"]["status"]) == ("drift", "drift", "drift")
    assert after_noise["status"] == "drift"
    assert after_noise["features"]["background_std"]["status"] == "drift"

    metrics = httpx.get(server.base_url + "/metrics").text
    assert 'model_drift_detected{model="digits"} 1.0' in metrics
    assert 'predictions_total{model="digits"' in metrics


def test_feedback_through_http_gives_live_accuracy(server: LiveServer, mnist_test_digits):
    with np.load(MNIST) as data:
        labels = data["y_test"][:20]
        images = data["x_test"][:20]
    response = predict_digits(server.base_url, images).json()
    served, request_id = response["predictions"], response["request_id"]
    for index, label in enumerate(labels):
        response = httpx.post(server.base_url + "/v1/feedback",
                              json={"request_id": request_id, "index": index, "label": str(label)})
        assert response.status_code == 201, response.text
    accuracy = httpx.get(server.base_url + "/v1/monitoring/accuracy", params={"model": "digits", "window": "20"},
                         headers=ADMIN).json()["models"][0]
    correct = sum(int(p["digit"] == label) for p, label in zip(served, labels))
    assert (accuracy["labelled"], accuracy["correct"]) == (20, correct)
    assert httpx.get(server.base_url + "/v1/monitoring/dashboard", headers=ADMIN).status_code == 200
    assert httpx.get(server.base_url + "/v1/monitoring/dashboard").status_code == 401


def test_two_server_processes_share_one_prediction_log(server: LiveServer, backend, mnist_test_digits):
    issued: list[str] = []
    with running_server(env=server_env(backend[0]), workers=1, ready=False) as second:
        assert predict_digits(server.base_url, mnist_test_digits[:40], issued).status_code == 200
        # Feedback sent to the other process finds the prediction (waiting for its buffer if needed),
        # sent while the id is fresh: a wait covers only ids issued within two flush intervals.
        cross = httpx.post(second.base_url + "/v1/feedback",
                           json={"request_id": issued[0], "index": 0, "label": "7"})
        assert cross.status_code == 201, cross.text
        assert predict_digits(second.base_url, mnist_test_digits[40:100], issued).status_code == 200
        assert wait_for_rows(backend[1], issued, 100) == 100
        from_first = drift_report(server.base_url, "100")
        from_second = drift_report(second.base_url, "100")
    assert from_first["n"] == from_second["n"] == 100
    assert from_first["features"] == from_second["features"]


def test_predictions_are_served_through_a_database_outage_and_logged_after_it(server: LiveServer, backend,
                                                                              mnist_test_digits):
    serve_url, read_url, cut, restore = backend
    issued: list[str] = []
    assert predict_digits(server.base_url, mnist_test_digits[:5], issued).status_code == 200
    assert wait_for_rows(read_url, issued, 5) == 5

    cut()
    try:
        statuses = []
        for i in range(10):
            started = time.perf_counter()
            statuses.append(predict_digits(server.base_url, mnist_test_digits[i * 5:(i + 1) * 5],
                                           issued).status_code)
            assert time.perf_counter() - started < 5.0
        failures = wait_for_write_failures(server.base_url)  # SQLite's writer waits out busy_timeout first
        down = httpx.get(server.base_url + "/v1/monitoring/drift", headers=ADMIN, timeout=30)
    finally:
        restore()

    assert statuses == [200] * 10
    if read_url.startswith("postgresql"):  # the reports need the database too: a clear 503, no 500
        assert (down.status_code, down.json()["code"]) == (503, "database-unavailable")
    else:  # a locked SQLite file still serves readers (WAL): only the writer has to wait
        assert down.status_code == 200
    assert failures >= 1
    assert wait_for_rows(read_url, issued, 55) == 55
    log = server.log_text()
    assert log.count("prediction log: database unavailable") == 1  # logged once, not per retry
    assert log.count("prediction log: database back") == 1
