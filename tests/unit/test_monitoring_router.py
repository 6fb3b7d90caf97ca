"""Feedback, accuracy, drift and dashboard endpoints over a toy model, on SQLite and PostgreSQL.

The toy task predicts "pos" for x > 0 and "neg" otherwise and logs ``x`` as its summary feature;
its reference is x ~ N(0, 1). The app is the real stack (middleware, error handlers, registry,
monitoring lifespan) with only the task swapped for the toy.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from pydantic import BaseModel

from app.core.config import Settings
from app.core.errors import install_error_handlers
from app.core.middleware import RequestContext, RequestContextMiddleware, new_request_id
from app.core.registry import ModelRegistry, ServedModel, model_dependency
from app.monitoring import setup_monitoring, shutdown_monitoring
from app.monitoring.observer import MonitoringObserver
from app.monitoring.reference import build_reference
from app.monitoring.router import router as monitoring_router
from tests import monitoring_db

TOKEN = "s3cret-admin-token"


class ToyModel(ServedModel):
    task = "toy"

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(batch, dtype=np.float64)


class ToyIn(BaseModel):
    x: list[float]


def make_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = ModelRegistry(settings, {"toy": ToyModel})
        registry.load_all()
        app.state.registry = registry
        setup_monitoring(app, settings)
        yield
        shutdown_monitoring(app)

    app = FastAPI(lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, context=RequestContext(
        max_body_bytes=settings.max_upload_bytes, request_timeout_s=settings.request_timeout_s, max_in_flight=64))

    @app.post("/v1/toy/predict")
    def predict(body: ToyIn, request: Request, model: ToyModel = Depends(model_dependency("toy"))) -> dict:
        xs = model.predict(np.array(body.x))
        rows = [{"prediction": "pos" if x > 0 else "neg", "confidence": 0.9, "features": {"x": float(x)}}
                for x in xs]
        MonitoringObserver(request.app.state).on_predictions(request.state.request_id, model.task, model.version,
                                                             rows, 1.5, None)
        return {"request_id": request.state.request_id, "predictions": [r["prediction"] for r in rows]}

    app.include_router(monitoring_router)
    return app


@pytest.fixture(params=monitoring_db.BACKENDS)
def db_url(request, tmp_path):
    with monitoring_db.database_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def models_dir(tmp_path):
    version = tmp_path / "models" / "toy" / "1.0.0"
    version.mkdir(parents=True)
    xs = np.random.default_rng(0).normal(0, 1, 4000)
    labels = ["neg", "pos"]
    (version / "metadata.json").write_text(json.dumps({"name": "toy", "version": "1.0.0", "labels": labels}))
    reference = build_reference({"x": xs}, ["pos" if x > 0 else "neg" for x in xs], labels)
    (version / "reference.json").write_text(json.dumps(reference))
    return tmp_path / "models"


def settings_for(db_url, models_dir, **overrides) -> Settings:
    values = {"database_url": db_url, "models_dir": models_dir, "drift_min_samples": 30,
              "log_flush_interval_s": 0.05, **overrides}
    return Settings(**values)


@pytest.fixture
def client(db_url, models_dir):
    # A long flush interval: feedback must find predictions that are still in the write buffer.
    with TestClient(make_app(settings_for(db_url, models_dir, log_flush_interval_s=30))) as c:
        yield c


@pytest.fixture
def admin_client(db_url, models_dir):
    with TestClient(make_app(settings_for(db_url, models_dir, admin_token=TOKEN))) as c:
        c.headers["Authorization"] = f"Bearer {TOKEN}"
        yield c


@pytest.fixture
def patient_admin_client(db_url, models_dir):
    # Flushes every 2 s, so a wait for other workers' buffers would last 5 s: far from "at once"
    # even on a machine busy enough to make one in-process request take most of a second.
    settings = settings_for(db_url, models_dir, admin_token=TOKEN, log_flush_interval_s=2.0)
    with TestClient(make_app(settings)) as c:
        c.headers["Authorization"] = f"Bearer {TOKEN}"
        yield c


def predict(c: TestClient, xs) -> dict:
    response = c.post("/v1/toy/predict", json={"x": [float(x) for x in xs]})
    assert response.status_code == 200, response.text
    return response.json()


def test_feedback_is_recorded_even_while_the_prediction_is_still_buffered(client):
    served = predict(client, [1.0, -2.0])

    first = client.post("/v1/feedback", json={"request_id": served["request_id"], "label": "neg", "index": 1})
    again = client.post("/v1/feedback", json={"request_id": served["request_id"], "label": "pos", "index": 1})

    assert first.status_code == 201
    assert first.json() == {"request_id": served["request_id"], "index": 1, "label": "neg", "model": "toy",
                            "version": "1.0.0", "prediction": "neg", "correct": True, "replaced": False}
    assert again.status_code == 200
    # The label it replaced is not shown: only the holder of the request id can label, and even
    # they learn nothing about what was there before.
    assert (again.json()["correct"], again.json()["replaced"]) == (False, True)
    assert "neg" not in json.dumps({k: v for k, v in again.json().items() if k != "prediction"})


@pytest.mark.parametrize("request_id", [
    "never-seen", "user-42-upload-7",  # client-chosen ids are never keys
    "00000000000a" + "0" * 20,  # one of ours in form, from 1970
    f"{(time.time_ns() // 1_000_000) - 60_000:012x}" + "ab" * 10,  # made a minute ago: long written
])
def test_feedback_for_an_unknown_request_is_a_404_problem_at_once(patient_admin_client, request_id):
    started = time.perf_counter()
    response = patient_admin_client.post("/v1/feedback", json={"request_id": request_id, "label": "pos"})
    assert time.perf_counter() - started < 2.5  # no waiting (a wait lasts 5 s here), no thread held
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert (response.json()["code"], response.json()["field"]) == ("unknown-request", "request_id")


def test_feedback_for_a_just_issued_id_waits_for_the_other_workers_buffers_then_404s(admin_client):
    unknown_but_fresh = new_request_id()  # as if another worker had just served it
    started = time.perf_counter()
    response = admin_client.post("/v1/feedback", json={"request_id": unknown_but_fresh, "label": "pos"})
    waited = time.perf_counter() - started
    assert response.status_code == 404
    assert 1.0 <= waited < 4.0  # two flush intervals (0.05 s here) plus the 1 s allowance; no longer


def test_feedback_for_a_missing_instance_or_an_unknown_label_is_refused(client):
    served = predict(client, [1.0])
    no_instance = client.post("/v1/feedback", json={"request_id": served["request_id"], "label": "pos", "index": 3})
    bad_label = client.post("/v1/feedback", json={"request_id": served["request_id"], "label": "maybe"})
    assert (no_instance.status_code, no_instance.json()["field"]) == (404, "index")
    assert (bad_label.status_code, bad_label.json()["code"], bad_label.json()["field"]) == \
        (422, "unknown-label", "label")


def test_admin_endpoints_need_the_bearer_token_when_one_is_set(admin_client):
    paths = ["/v1/feedback", "/v1/monitoring/accuracy", "/v1/monitoring/drift", "/v1/monitoring/dashboard"]
    for path in paths:
        missing = admin_client.get(path, headers={"Authorization": ""})
        wrong = admin_client.get(path, headers={"Authorization": "Bearer nope"})
        right = admin_client.get(path)
        assert missing.status_code == 401, path
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert missing.json()["code"] == "admin-token-required"
        assert (wrong.status_code, wrong.json()["code"]) == (403, "admin-token-invalid"), path
        assert right.status_code == 200, path
    served = predict(admin_client, [1.0])  # sending feedback stays open to clients
    open_feedback = admin_client.post("/v1/feedback", headers={"Authorization": ""},
                                      json={"request_id": served["request_id"], "label": "pos"})
    assert open_feedback.status_code == 201


def test_live_accuracy_counts_labelled_predictions(admin_client):
    client = admin_client
    served = [predict(client, [x]) for x in (1.0, 2.0, -1.0, -2.0)]
    for s, label in zip(served, ["pos", "neg", "neg", "neg"]):  # 3 of 4 right
        assert client.post("/v1/feedback", json={"request_id": s["request_id"], "label": label}).status_code == 201

    report = client.get("/v1/monitoring/accuracy", params={"model": "toy"}).json()["models"][0]
    last_two = client.get("/v1/monitoring/accuracy", params={"model": "toy", "window": "2"}).json()["models"][0]

    assert (report["labelled"], report["correct"], report["accuracy"]) == (4, 3, 0.75)
    assert report["per_class"]["neg"] == {"labelled": 3, "correct": 2, "accuracy": pytest.approx(2 / 3, abs=1e-6)}
    assert (last_two["labelled"], last_two["accuracy"]) == (2, 1.0)


def test_drift_report_flags_a_shifted_window_and_not_an_unshifted_one(admin_client):
    rng = np.random.default_rng(7)
    predict(admin_client, rng.normal(0, 1, 200))
    unshifted = admin_client.get("/v1/monitoring/drift", params={"model": "toy", "window": "200"}).json()
    predict(admin_client, rng.normal(2, 1, 200))
    shifted = admin_client.get("/v1/monitoring/drift", params={"model": "toy", "window": "200"}).json()
    tiny = admin_client.get("/v1/monitoring/drift", params={"model": "toy", "window": "10"}).json()

    (u,), (s,), (t,) = unshifted["models"], shifted["models"], tiny["models"]
    assert (u["n"], u["status"]) == (200, "ok"), u
    assert (s["n"], s["status"], s["features"]["x"]["status"], s["prediction"]["status"]) == \
        (200, "drift", "drift", "drift")
    assert t["status"] == "insufficient_data"
    assert shifted["thresholds"]["psi"] == {"warning": 0.1, "drift": 0.2}
    gauge = REGISTRY.get_sample_value("model_drift_detected", {"model": "toy"})
    assert gauge == 0.0  # the last report computed (window=10) is not 'drift'
    admin_client.get("/v1/monitoring/drift", params={"window": "200"})
    assert REGISTRY.get_sample_value("model_drift_detected", {"model": "toy"}) == 1.0
    assert REGISTRY.get_sample_value("model_drift_score", {"model": "toy"}) == s["drift_score"]


def test_drift_by_time_window_and_bad_windows(admin_client):
    predict(admin_client, np.random.default_rng(3).normal(0, 1, 50))
    by_time = admin_client.get("/v1/monitoring/drift", params={"window": "1h"}).json()
    bad = admin_client.get("/v1/monitoring/drift", params={"window": "soon"})
    unknown = admin_client.get("/v1/monitoring/drift", params={"model": "nope"})
    assert by_time["window"] == {"kind": "time", "seconds": 3600.0}
    assert by_time["models"][0]["n"] == 50
    assert (bad.status_code, bad.json()["code"], bad.json()["field"]) == (422, "invalid-window", "window")
    assert (unknown.status_code, unknown.json()["code"]) == (404, "unknown-model")


def test_dashboard_is_one_self_contained_html_page_with_svg_plots(admin_client):
    rng = np.random.default_rng(5)
    predict(admin_client, rng.normal(0, 1, 60))
    predict(admin_client, rng.normal(3, 1, 60))
    admin_client.app.state.prediction_log.flush(5)
    response = admin_client.get("/v1/monitoring/dashboard", params={"window": "60"})
    html = response.text
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "<h2 id='toy'>toy 1.0.0" in html and ">drift</span>" in html
    for title in ("predicted class", "drift score over time", "latency p50", "throughput", 'aria-label="x"'):
        assert title in html
    assert html.count("<svg") == 6  # x histogram, classes, drift, p50, p95, throughput
    assert "<script" not in html and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_feedback_listing_shows_the_prediction_it_labels(admin_client):
    served = predict(admin_client, [4.0])
    admin_client.post("/v1/feedback", json={"request_id": served["request_id"], "label": "pos"})
    listing = admin_client.get("/v1/feedback", params={"model": "toy", "limit": 5}).json()["feedback"]
    assert [(f["request_id"], f["prediction"], f["label"], f["correct"]) for f in listing] == \
        [(served["request_id"], "pos", "pos", True)]
