"""A fifth task defined only under tests/ (tests/fifth_task) is served by the unchanged app when it is
named in TASK_MODULES: its v1 endpoint, its V2 model, its OpenAPI operation, its rows of the limits
table, its prediction-log rows and its drift report, its panel on the web page and its evaluation
gate (training.compare), beside the four tasks of app/tasks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from playwright.sync_api import expect, sync_playwright

from app.core.config import Settings
from app.monitoring.reference import build_reference
from bench.liveserver import LiveServer, running_server
from tests.support import MODELS, REPO_ROOT, rows, wait_until

CHROMIUM = "/usr/bin/chromium"
TASK_MODULES = ",".join([*Settings().task_modules, "tests.fifth_task"])
READINGS = {"temperature": [20.0, 35.0, 80.0, 95.0], "vibration": [1.0, 2.0, 9.0, 12.0]}


def fault_model(root: Path) -> Path:
    """models/ with the four committed tasks (linked) and fault 1.0.0 (written here)."""
    models = root / "models"
    models.mkdir()
    for task in MODELS.iterdir():
        if task.is_dir():
            (models / task.name).symlink_to(task)
    version = models / "fault" / "1.0.0"
    version.mkdir(parents=True)
    (version / "model.json").write_text(json.dumps({
        "features": ["temperature", "vibration"], "weights": [0.08, 0.5], "bias": -8.0}))
    (version / "metadata.json").write_text(json.dumps({
        "name": "fault", "task": "fault", "version": "1.0.0", "labels": ["ok", "fault"]}))
    rng = np.random.default_rng(0)
    features = {"temperature": rng.normal(40, 10, 500).tolist(), "vibration": rng.gamma(2, 1.5, 500).tolist()}
    reference = build_reference(features, ["ok"] * 450 + ["fault"] * 50, ["ok", "fault"], source="synthetic")
    (version / "reference.json").write_text(json.dumps(reference))
    return models


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[LiveServer, str]]:
    root = tmp_path_factory.mktemp("fifth")
    url = f"sqlite:///{root / 'predictions.db'}"
    env = {"TASK_MODULES": TASK_MODULES, "MODELS_DIR": str(fault_model(root)), "DATABASE_URL": url,
           "LOG_FLUSH_INTERVAL_S": "0.1"}
    with running_server(env=env, workers=2) as live:
        yield live, url


@pytest.fixture
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0].base_url, timeout=30.0) as c:
        yield c


def readings(n: int) -> list[dict[str, float]]:
    return [{"temperature": READINGS["temperature"][i % 4], "vibration": READINGS["vibration"][i % 4]}
            for i in range(n)]


def test_its_v1_endpoint_answers_in_the_envelope(client):
    response = client.post("/v1/fault/predict", json={"instances": readings(4)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "fault" and body["version"] == "1.0.0" == response.headers["x-model-version"]
    assert [p["label"] for p in body["predictions"]] == ["ok", "ok", "fault", "fault"]
    bad = client.post("/v1/fault/predict", json={"instances": [{"temperature": 20}]})
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"


def test_its_v2_model_has_metadata_and_infers(client):
    metadata = client.get("/v2/models/fault").json()
    assert metadata["platform"] == "numpy" and metadata["inputs"][0]["name"] == "readings"
    assert metadata["parameters"]["labels"] == ["ok", "fault"]
    data = [v for r in readings(4) for v in (r["temperature"], r["vibration"])]
    answer = client.post("/v2/models/fault/infer", json={
        "inputs": [{"name": "readings", "shape": [4, 2], "datatype": "FP32", "data": data}]})
    assert answer.status_code == 200, answer.text
    v1 = client.post("/v1/fault/predict", json={"instances": readings(4)}).json()
    assert answer.json()["outputs"][0]["data"] == pytest.approx([p["probability"] for p in v1["predictions"]],
                                                                 rel=1e-6)


def test_its_operation_is_in_the_openapi_document_and_the_four_others_still_are(client):
    operations = {op["operationId"] for path in client.get("/openapi.json").json()["paths"].values()
                  for op in path.values()}
    assert {"fault_predict", "digits_predict", "emotion_predict", "segmentation_predict",
            "clustering_predict"} <= operations


def test_its_limits_are_in_the_table_and_in_its_model_description(client):
    limits = client.get("/v1/models/fault").json()["limits"]
    assert {"applies_to": "fault", "what": "readings per request", "value": "1-100",
            "refusal": "422 `too-many-instances`", "setting": ""} in limits
    table = subprocess.run([sys.executable, "-m", "app.limits"], cwd=REPO_ROOT, capture_output=True, text=True,
                           env={**os.environ, "TASK_MODULES": TASK_MODULES}, check=True).stdout
    assert "| fault | readings per request | 1-100 | 422 `too-many-instances` |  |" in table


def test_its_predictions_are_logged_and_its_drift_is_reported(server, client):
    _, url = server
    shifted = [{"temperature": t + 60.0, "vibration": v} for t, v in
               zip(np.random.default_rng(1).normal(40, 10, 60), np.random.default_rng(2).gamma(2, 1.5, 60))]
    response = client.post("/v1/fault/predict", json={"instances": shifted})
    assert response.status_code == 200, response.text
    request_id = response.json()["request_id"]

    sql = "SELECT COUNT(*) FROM predictions WHERE request_id = :r AND model = 'fault'"
    assert wait_until(lambda: rows(url, sql, r=request_id)[0][0] == 60)
    report = client.get("/v1/monitoring/drift", params={"model": "fault"})
    assert report.status_code == 200, report.text
    [fault] = report.json()["models"]
    assert fault["model"] == "fault" and fault["n"] >= 60 and fault["status"] == "drift", fault
    assert fault["features"]["temperature"]["status"] == "drift" and "vibration" in fault["features"], fault


def test_its_panel_is_on_the_web_page_and_answers(server):
    live, _ = server
    page = httpx.get(live.base_url + "/")
    assert page.status_code == 200
    modules = re.findall(r'<section [^>]*data-module="([^"]+)"', page.text)
    assert modules == [f"/static/tasks/{name}/panel.js"
                       for name in ("clustering", "digits", "segmentation", "emotion", "fault")]
    if not Path(CHROMIUM).exists() and os.environ.get("CI") != "true":
        pytest.skip("Debian's chromium is not installed (make test installs it under CI)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            tab = browser.new_page()
            errors: list[str] = []
            tab.on("pageerror", lambda e: errors.append(str(e)))
            tab.goto(live.base_url + "/")
            expect(tab.locator("#versions")).to_contain_text("fault 1.0.0")
            tab.get_by_test_id("fault-temperature").fill("95")
            tab.get_by_test_id("fault-vibration").fill("12")
            tab.get_by_test_id("fault-predict").click()
            expect(tab.get_by_test_id("fault-result")).to_contain_text("fault (probability of a fault")
            expect(tab.get_by_test_id("digits-canvas")).to_be_visible()  # the four panels still start
            assert errors == []
        finally:
            browser.close()


def test_the_evaluation_gate_scores_its_versions_and_fails_a_worse_one(tmp_path):
    models = fault_model(tmp_path)
    first = models / "fault" / "1.0.0"
    for version, weights in (("1.0.1", [0.08, 0.5]), ("1.0.2", [0.08, -0.5])):  # the same; vibration ignored
        copy = models / "fault" / version
        copy.mkdir()
        for name in ("metadata.json", "reference.json"):
            (copy / name).write_text((first / name).read_text())
        (copy / "model.json").write_text(json.dumps({"features": ["temperature", "vibration"],
                                                     "weights": weights, "bias": -8.0}))

    def gate(candidate: str) -> tuple[int, dict]:
        out = tmp_path / f"compare-{candidate}"
        done = subprocess.run([sys.executable, "-m", "training.compare", "fault", "--candidate", candidate,
                               "--baseline", "1.0.0", "--models-dir", str(models), "--out", str(out)],
                              cwd=REPO_ROOT, capture_output=True, text=True,
                              env={**os.environ, "TASK_MODULES": TASK_MODULES})
        assert (out / "compare.json").exists(), done.stderr
        return done.returncode, json.loads((out / "compare.json").read_text())

    same_code, same = gate("1.0.1")
    worse_code, worse = gate("1.0.2")
    assert same_code == 0 and same["passed"] and same["metric"] == "accuracy"
    [held] = same["sets"]
    assert held["set"] == "fault readings (held out)" and held["n"] == 2000
    assert held["baseline"] == held["candidate"] > 0.99
    assert worse_code == 1 and not worse["passed"] and "worse by" in worse["reasons"][0]
