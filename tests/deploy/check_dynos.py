"""Two dynos of the service behind a round-robin router, sharing one PostgreSQL database and one Redis
(`make dynos-test`), as on Heroku with `heroku ps:scale web=2`.

Each dyno is the Procfile's command with two workers and its own DYNO name; the router is HAProxy
from Debian (round robin, the dyno's name in an X-Served-By response header, a dead dyno's
connections retried on the other as Heroku's router does); Redis speaks TLS with a self-signed
certificate, as Heroku Key-Value Store does. Through the router: a rate limit holds across both
dynos; feedback, consent (a stored input in the export) and erasure work on the dyno that did not
make the prediction; drift, accuracy, shadow and the export count the predictions of both; each
dyno's metrics name it, and both push them; after ``kill -9`` of one whole dyno the router sends
everything to the other and the prediction log still holds everything acknowledged (the dynos run
with LOG_DURABLE, as app.json sets it). Run on its own file
(``pytest tests/deploy/check_dynos.py``); not part of ``make test``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text

from bench.common import SHARED_DATA, png_bytes
from bench.liveserver import LiveServer, free_port, running_server
from tests.deploy.pushgateway import Receiver, receiving
from tests.monitoring_db import database_url

pytestmark = pytest.mark.timeout(600)

DYNOS = ("web.1", "web.2")
ADMIN_TOKEN = "dynos-check-admin-token"
RATE_LIMIT = 20  # per minute and API key
NOTICE_S = 0.5  # after a dyno dies, how long the router may still send it a request (its health check: 500 ms)
FLUSH_S = 0.5  # LOG_FLUSH_INTERVAL_S: how long a prediction-log row may wait in its worker's buffer
SHADOW = {"digits": "1.0.0"}  # a second version predicting every digit after the answer
# Every prediction but the rate limit's own carries a key of its own, so only that test meets the limit.
KEYS = [f"dynos-check-client-{i}" for i in range(600)]
LIMITED_KEY = "dynos-check-limited"


@dataclass
class Prediction:
    request_id: str
    dyno: str
    label: str
    consented: bool
    acknowledged_at: float = 0.0
    erased: bool = False


@dataclass
class Router:
    """HAProxy in front of the dynos; remembers which dyno answered last, to aim the next request."""

    base_url: str
    process: subprocess.Popen
    last: str | None = None
    keys: Iterator[str] = field(default_factory=lambda: iter(KEYS))
    ledger: list[Prediction] = field(default_factory=list)

    def send(self, method: str, path: str, *, on: str | None = None, **kwargs) -> httpx.Response:
        """``method path`` through the router; with ``on``, to that dyno (round robin alternates: a
        health check first when the last request went to the other)."""
        for _ in range(3):
            if on is None or self.last == DYNOS[1 - DYNOS.index(on)]:
                break
            self.send("GET", "/health/live")
        response = httpx.request(method, self.base_url + path, timeout=60.0, **kwargs)
        self.last = response.headers.get("x-served-by")
        if on is not None:
            assert self.last == on, f"round robin sent {method} {path} to {self.last}, not {on}"
        return response

    def predict_digit(self, image: bytes, label: str, *, on: str | None = None, consent: bool = False,
                      key: str | None = None) -> httpx.Response:
        headers = {"X-API-Key": key or next(self.keys), "X-Data-Consent": "granted" if consent else "denied"}
        response = self.send("POST", "/v1/digits/predict", on=on, headers=headers,
                             files={"image": ("digit.png", image, "image/png")})
        if response.status_code == 200:
            self.ledger.append(Prediction(response.json()["request_id"], self.last, label, consent,
                                          time.monotonic()))
        return response

    def admin(self, path: str, *, on: str | None = None, **params) -> httpx.Response:
        response = self.send("GET", path, on=on, params=params,
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert response.status_code == 200, response.text
        return response

    def logged(self) -> list[Prediction]:
        """The acknowledged digit predictions not erased since."""
        return [p for p in self.ledger if not p.erased]


# ---- the stack -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits() -> list[tuple[bytes, str]]:
    """MNIST test digits as PNG with their labels (a client's traffic; never trained on)."""
    with np.load(SHARED_DATA / "mnist" / "mnist.npz") as data:
        return [(png_bytes(image), str(label)) for image, label in zip(data["x_test"][:60], data["y_test"][:60])]


@pytest.fixture(scope="module")
def postgres(tmp_path_factory) -> Iterator[str]:
    with database_url("postgresql", tmp_path_factory.mktemp("pg")) as url:
        yield url


@pytest.fixture(scope="module")
def redis_tls() -> Iterator[str]:
    """A Redis of its own speaking only TLS, with a self-signed certificate (Heroku Key-Value Store's)."""
    redis_server = shutil.which("redis-server")
    assert redis_server, "redis-server not found: `make dynos-test` installs it"
    workdir = Path(tempfile.mkdtemp(prefix="dynos-redis-"))
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=key-value-store", "-keyout", str(workdir / "key.pem"),
                    "-out", str(workdir / "cert.pem")], check=True, capture_output=True)
    port = free_port()
    process = subprocess.Popen([redis_server, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                                "--tls-cert-file", str(workdir / "cert.pem"), "--tls-key-file",
                                str(workdir / "key.pem"), "--tls-auth-clients", "no", "--save", "",
                                "--appendonly", "no", "--dir", str(workdir)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process)
        yield f"rediss://127.0.0.1:{port}/0"
    finally:
        stop_by_pid(process)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def pushgateway() -> Iterator[Receiver]:
    with receiving() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def dynos(postgres: str, redis_tls: str, pushgateway: Receiver) -> Iterator[dict[str, LiveServer]]:
    env = {
        "DATABASE_URL": postgres, "REDIS_URL": redis_tls, "REDIS_TLS_VERIFY": "false",
        "RATE_LIMIT": f"{RATE_LIMIT}/minute",
        "API_KEYS": ",".join(hashlib.sha256(k.encode()).hexdigest() for k in [*KEYS, LIMITED_KEY]),
        "ADMIN_TOKEN": ADMIN_TOKEN, "REQUEST_ID_SECRET": "dynos-check-request-id-secret",
        "SHADOW_VERSIONS": json.dumps(SHADOW),
        "LOG_FLUSH_INTERVAL_S": str(FLUSH_S), "LOG_DURABLE": "true", "DRIFT_MIN_SAMPLES": "10",
        "METRICS_PUSH_URL": pushgateway.url, "METRICS_PUSH_INTERVAL_S": "1",
    }
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(running_server({**env, "DYNO": name}, workers=2)) for name in DYNOS}
        yield servers


@pytest.fixture(scope="module")
def router(dynos: dict[str, LiveServer]) -> Iterator[Router]:
    haproxy = shutil.which("haproxy")
    assert haproxy, "haproxy not found: `make dynos-test` installs it"
    port = free_port()
    servers = "\n".join(f"    server {name} {server.base_url.removeprefix('http://')} check"
                        for name, server in dynos.items())
    config = f"""
global
    maxconn 512
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    option forwardfor
    option http-server-close
    # A request that could not reach a dyno (refused: it is dead) goes to the other one; a request
    # a dyno was answering when it died is not replayed (a 502), as on Heroku.
    retries 3
    option redispatch
    retry-on conn-failure
frontend web
    bind 127.0.0.1:{port}
    default_backend dynos
backend dynos
    balance roundrobin
    option httpchk GET /health/live
    default-server inter 500ms fall 2 rise 1
    http-response set-header X-Served-By %s
{servers}
"""
    workdir = Path(tempfile.mkdtemp(prefix="dynos-router-"))
    (workdir / "haproxy.cfg").write_text(config)
    subprocess.run([haproxy, "-c", "-q", "-f", str(workdir / "haproxy.cfg")], check=True)
    process = subprocess.Popen([haproxy, "-db", "-f", str(workdir / "haproxy.cfg")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process)
        router = Router(f"http://127.0.0.1:{port}", process)
        deadline = time.monotonic() + 10  # until both dynos pass their first health check
        while {router.send("GET", "/health/live").headers.get("x-served-by") for _ in range(4)} != set(DYNOS):
            assert time.monotonic() < deadline, "the router does not reach both dynos"
        yield router
    finally:
        stop_by_pid(process)
        shutil.rmtree(workdir, ignore_errors=True)


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 15.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"{process.args[0]} exited with {process.returncode}"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        assert time.monotonic() < deadline, f"nothing listens on {port}"
        time.sleep(0.05)


def stop_by_pid(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()


def wait_for_other_buffers() -> None:
    """Each worker writes its buffered rows every LOG_FLUSH_INTERVAL_S: a report on one dyno sees
    the other dyno's latest predictions once they are written."""
    # A sleep: a dyno does not say when its buffer is written; two flush intervals and a margin bound it.
    time.sleep(2 * FLUSH_S + 0.5)


def export_manifest(router: Router, on: str) -> dict[str, dict]:
    with zipfile.ZipFile(io.BytesIO(router.admin("/v1/monitoring/dataset", on=on).content)) as archive:
        lines = [json.loads(line) for line in archive.read("manifest.jsonl").decode().splitlines()]
        return {line["request_id"]: {**line, "bytes": archive.read(line["file"])} for line in lines}


def rows_of(postgres: str, request_id: str) -> dict[str, int]:
    engine = create_engine(postgres)
    try:
        with engine.connect() as conn:
            return {table: conn.execute(text(f"SELECT count(*) FROM {table} WHERE request_id = :r"),
                                        {"r": request_id}).scalar()
                    for table in ("predictions", "shadow_predictions", "feedback")}
    finally:
        engine.dispose()


# ---- the checks ------------------------------------------------------------------------------------

def test_the_router_sends_requests_to_each_dyno_in_turn(router):
    served = [router.send("GET", "/health/live").headers["x-served-by"] for _ in range(6)]
    assert served[0::2] == [served[0]] * 3 and served[1::2] == [served[1]] * 3
    assert set(served) == set(DYNOS)


def test_each_dyno_names_itself_in_its_metrics_and_pushes_them(router, pushgateway):
    for dyno in DYNOS:
        metrics = router.send("GET", "/metrics", on=dyno).text
        labels = {s.labels.get("dyno") for f in text_string_to_metric_families(metrics) for s in f.samples}
        assert labels == {dyno}
        pushgateway.wait_for(lambda p, d=dyno: p.path == f"/metrics/job/ml-inference-service/dyno/{d}"
                             and p.sample("http_requests_total", route="/metrics", dyno=d) is not None)


def test_a_rate_limit_holds_across_both_dynos(router, digits):
    image, label = digits[0]
    answers = [router.predict_digit(image, label, key=LIMITED_KEY) for _ in range(RATE_LIMIT + 6)]
    served = [(a.status_code, a.headers.get("x-served-by")) for a in answers]
    assert [status for status, _ in served] == [200] * RATE_LIMIT + [429] * 6
    assert {dyno for status, dyno in served if status == 200} == set(DYNOS)
    assert {dyno for status, dyno in served if status == 429} == set(DYNOS)
    assert answers[-1].json()["code"] == "rate-limited" and int(answers[-1].headers["retry-after"]) >= 1


@pytest.mark.parametrize("made_on", DYNOS)
def test_feedback_consent_and_erasure_work_on_the_other_dyno(router, digits, postgres, made_on):
    other = DYNOS[1 - DYNOS.index(made_on)]
    image, label = digits[1]
    prediction = router.predict_digit(image, label, on=made_on, consent=True)
    assert prediction.status_code == 200 and prediction.headers["x-inputs-stored"] == "true"
    request_id = prediction.json()["request_id"]
    feedback = router.send("POST", "/v1/feedback", on=other, json={"request_id": request_id, "label": label})
    assert feedback.status_code == 201, feedback.text
    assert feedback.json()["prediction"] == prediction.json()["predictions"][0]["label"]
    stored = export_manifest(router, on=other)[request_id]
    assert stored["bytes"] == image and stored["label"] == label and stored["model"] == "digits"
    assert router.send("DELETE", f"/v1/predictions/{request_id}", on=other).status_code == 204
    next(p for p in router.ledger if p.request_id == request_id).erased = True
    assert request_id not in export_manifest(router, on=made_on)
    again = router.send("POST", "/v1/feedback", on=made_on, json={"request_id": request_id, "label": label})
    assert again.status_code == 404 and again.json()["code"] == "unknown-request"
    # A sleep, not a wait: a shadow prediction dropped instead of written leaves no trace to wait for.
    time.sleep(1.0)  # the shadow prediction arrives after the answer: it must be dropped, not written
    assert rows_of(postgres, request_id) == {"predictions": 0, "shadow_predictions": 0, "feedback": 0}


def test_drift_accuracy_shadow_and_the_export_count_the_predictions_of_both_dynos(router, digits):
    made = [router.predict_digit(image, label, consent=True) for image, label in digits[2:42]]
    assert [r.status_code for r in made] == [200] * len(made)
    mine = router.ledger[-len(made):]
    assert {p.dyno for p in mine} == set(DYNOS)
    for p in mine[::2]:  # feedback for half of them, each sent wherever round robin puts it
        answer = router.send("POST", "/v1/feedback", json={"request_id": p.request_id, "label": p.label})
        assert answer.status_code == 201, answer.text
    labelled = {p.request_id for p in mine[::2]}
    wait_for_other_buffers()
    logged = router.logged()
    for dyno in DYNOS:  # each dyno's reports count every prediction, its own and the other's
        drift = router.admin("/v1/monitoring/drift", on=dyno, model="digits", window="1h").json()
        assert drift["models"][0]["n"] == len(logged)
        accuracy = router.admin("/v1/monitoring/accuracy", on=dyno, model="digits", window="1h").json()
        assert accuracy["models"][0]["labelled"] == len(labelled)
        shadow = router.admin("/v1/monitoring/shadow", on=dyno, model="digits", window="1h").json()
        assert shadow["shadow"]["version"] == SHADOW["digits"]
        assert shadow["n"] == len(logged) and shadow["primary"]["labelled"] == len(labelled)
        manifest = export_manifest(router, on=dyno)
        assert {p.request_id for p in logged if p.consented} == set(manifest)
        assert {r for r, line in manifest.items() if line["label"] is not None} == labelled


def test_kill_9_of_a_dyno_fails_over_and_the_log_keeps_what_was_acknowledged(router, dynos, digits, postgres):
    victim, survivor = DYNOS[1], DYNOS[0]
    outcomes: list[dict] = []
    stop = threading.Event()
    images = itertools.cycle(digits)
    lock = threading.Lock()

    def client() -> None:
        while not stop.is_set():
            with lock:
                image, label = next(images)
                key = next(router.keys)
            started = time.monotonic()
            try:
                response = httpx.post(router.base_url + "/v1/digits/predict", timeout=30.0,
                                      headers={"X-API-Key": key}, files={"image": ("d.png", image, "image/png")})
                outcome = {"status": response.status_code, "dyno": response.headers.get("x-served-by"),
                           "request_id": response.json().get("request_id") if response.status_code == 200 else None}
            except httpx.TransportError as exc:
                outcome = {"status": None, "dyno": None, "request_id": None, "error": repr(exc)}
            outcomes.append({**outcome, "started": started, "ended": time.monotonic()})
            time.sleep(0.02)  # pacing the client

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        clients = [pool.submit(client) for _ in range(2)]
        time.sleep(2.0)  # a window of traffic before the kill, not an event
        killed_at = time.monotonic()
        os.killpg(dynos[victim].pid, signal.SIGKILL)  # the master and its workers at once
        time.sleep(4.0)  # a window of traffic after the kill: the failover is what is measured
        stop.set()
        for c in clients:
            c.result()
    before = [o for o in outcomes if o["ended"] < killed_at]
    # The router learns of the death from the next connection that fails: a request that reached
    # the dead dyno's accept queue in that moment fails (never acknowledged), as on Heroku.
    noticed = killed_at + NOTICE_S
    after = [o for o in outcomes if o["started"] > noticed]
    during = [o for o in outcomes if o["started"] <= noticed and o["ended"] >= killed_at]
    assert {o["dyno"] for o in before} == set(DYNOS) and all(o["status"] == 200 for o in before)
    # Failover: every request sent once the router knows is answered, by the survivor.
    assert len(after) > 20 and all(o["status"] == 200 and o["dyno"] == survivor for o in after), after[:5]
    assert len([o for o in during if o["status"] != 200]) <= 2
    acknowledged = [o for o in outcomes if o["status"] == 200]
    engine = create_engine(postgres)
    try:
        with engine.connect() as conn:
            found = set(conn.execute(text("SELECT request_id FROM predictions WHERE request_id = ANY(:ids)"),
                                     {"ids": [o["request_id"] for o in acknowledged]}).scalars())
    finally:
        engine.dispose()
    lost = [o for o in acknowledged if o["request_id"] not in found]
    print(f"\nkill -9 of {victim}: {len(acknowledged)} predictions acknowledged, {len(after)} after the kill "
          f"(all by {survivor}); {len(lost)} of them not in the log (LOG_DURABLE)", flush=True)
    # LOG_DURABLE: a prediction is answered only once its row is written, so a dyno killed at any
    # moment has acknowledged nothing the log does not hold.
    assert lost == []
