"""The foundation, against the real gunicorn server started with the Procfile command."""

from __future__ import annotations


import httpx

TASKS = {"clustering", "digits", "segmentation", "emotion"}


def test_ready_with_every_committed_model(client):
    response = client.get("/health/ready")
    assert response.status_code == 200
    assert set(response.json()["models"]) == TASKS
    assert all(m["ready"] for m in response.json()["models"].values())


def test_models_describe_version_specs_and_training_metrics(client):
    models = {m["task"]: m for m in client.get("/v1/models").json()["models"]}
    assert set(models) == TASKS
    for model in models.values():
        assert model["ready"] is True
        assert model["version"]
        assert model["created"]
        assert model["input"] and model["output"]
        assert model["metrics"]


def test_unknown_route_and_bad_body_are_problem_json(client):
    missing = client.get("/v1/does-not-exist")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    malformed = client.post("/v1/clustering/predict", content=b"{not json",
                            headers={"content-type": "application/json"})
    assert malformed.status_code == 400
    assert malformed.headers["content-type"] == "application/problem+json"
    assert malformed.json()["field"] == "body"


def test_body_over_max_upload_is_413(client):
    response = client.post("/v1/digits/predict", content=b"\0" * (11 * 1024 * 1024),
                           headers={"content-type": "application/octet-stream"})
    assert response.status_code == 413
    assert response.json()["code"] == "payload-too-large"


def test_request_id_is_echoed_and_logged_as_one_json_line(client, server):
    response = client.get("/v1/models", headers={"X-Request-ID": "contract-log-check-1"})
    assert response.headers["x-correlation-id"] == "contract-log-check-1"
    request_id = response.headers["x-request-id"]
    lines = server.access_entries("contract-log-check-1")
    assert len(lines) == 1
    entry = lines[0]
    assert (entry["request_id"], entry["correlation_id"]) == (request_id, "contract-log-check-1")
    assert entry["route"] == "/v1/models"
    assert entry["status"] == 200
    assert entry["latency_ms"] >= 0
    assert {"request_bytes", "response_bytes", "model", "model_version"} <= set(entry)


def test_access_log_names_the_model_and_never_the_payload(client, server):
    secret = 73.123456
    client.post("/v1/clustering/predict", headers={"X-Request-ID": "contract-log-check-2"},
                json={"instances": [{"annual_income": secret, "spending_score": 50}]})
    line = server.access_entries("contract-log-check-2")[0]  # written after the answer: waits for it
    assert line["model"] == "clustering" and line["model_version"]
    assert str(secret) not in server.log_text()  # the request's line is there: nothing else to wait for


def test_metrics_sum_requests_over_both_workers(client, live_server):
    for _ in range(20):  # new connections, so both workers get some
        httpx.get(live_server + "/health/live")
    text = client.get("/metrics").text
    total = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("http_requests_total{") and 'route="/health/live"' in line)
    assert total >= 20


def test_pathologically_nested_json_is_a_4xx_on_every_json_route(client):
    deep = b"[" * 100_000 + b"]" * 100_000
    for route in ("/v1/digits/predict", "/v1/clustering/predict", "/v1/clustering/fit", "/v1/feedback"):
        response = client.post(route, content=deep, headers={"content-type": "application/json"})
        assert 400 <= response.status_code < 500, (route, response.status_code)
        assert response.headers["content-type"] == "application/problem+json"
    assert client.get("/health/ready").status_code == 200
