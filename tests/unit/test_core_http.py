"""Foundation behaviour over HTTP (in-process): health, problem+json errors, request ids, limits."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.core.middleware import new_request_id, request_id_age_s
from app.main import create_app


@pytest.fixture
def empty_client(tmp_path) -> Iterator[TestClient]:
    """An app with no model artifacts at all and a 1 MiB body limit."""
    settings = Settings(models_dir=tmp_path / "models", max_upload_mb=1,
                        database_url=f"sqlite:///{tmp_path / 'log.db'}")
    with TestClient(create_app(settings)) as client:
        yield client


def test_live_answers_even_without_models(empty_client):
    response = empty_client.get("/health/live")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_ready_is_503_naming_every_missing_model(empty_client):
    response = empty_client.get("/health/ready")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == 503
    assert set(body["not_ready"]) == {"clustering", "digits", "segmentation", "emotion"}


def test_models_lists_unloaded_models_with_the_reason(empty_client):
    models = {m["task"]: m for m in empty_client.get("/v1/models").json()["models"]}
    assert models["digits"]["ready"] is False
    assert "no model versions" in models["digits"]["error"]


def test_predicting_on_an_unloaded_model_is_503_problem(empty_client):
    response = empty_client.post("/v1/clustering/predict", json={"instances": []})
    assert response.status_code == 503
    assert response.json()["code"] == "model-unavailable"


def test_unknown_route_is_404_problem_json(empty_client):
    response = empty_client.get("/v1/nope")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["title"] == "Not found"
    assert body["type"].endswith("/not-found")
    assert body["instance"] == "/v1/nope"
    assert body["request_id"] == response.headers["x-request-id"]


def test_wrong_method_is_405_problem_json(empty_client):
    response = empty_client.get("/v1/digits/predict")
    assert response.status_code == 405
    assert response.json()["code"] == "method-not-allowed"


def test_request_ids_are_issued_by_the_server_and_the_clients_id_is_a_correlation_id(empty_client):
    first = empty_client.get("/health/live", headers={"X-Request-ID": "abc-123"})
    second = empty_client.get("/health/live", headers={"X-Request-ID": "abc-123"})
    assert first.headers["x-correlation-id"] == second.headers["x-correlation-id"] == "abc-123"
    ids = {first.headers["x-request-id"], second.headers["x-request-id"]}
    assert len(ids) == 2 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_request_id_carries_its_time_and_80_random_bits():
    ids = [new_request_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(0 <= request_id_age_s(i) < 5 for i in ids)
    assert len({i[12:] for i in ids}) == 1000  # the random part alone never repeats
    assert request_id_age_s("user-42-upload-7") is None


def test_a_forked_worker_never_hands_out_its_parents_random_bits():
    """The random part is read from the OS in blocks; a child (a gunicorn worker is forked from the
    master) must not reuse what was left of the parent's block."""
    new_request_id()  # the parent holds a block, mostly unused
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then exit without running the test session's teardown
        os.write(write, ",".join(new_request_id()[12:] for _ in range(20)).encode())
        os._exit(0)
    os.close(write)
    child = set(os.read(read, 10_000).decode().split(","))
    os.waitpid(pid, 0)
    parent = {new_request_id()[12:] for _ in range(20)}
    assert len(child) == 20 and not child & parent


def test_unsafe_correlation_id_is_dropped(empty_client):
    response = empty_client.get("/health/live", headers={"X-Request-ID": "bad id\twith spaces"})
    assert "x-correlation-id" not in response.headers
    assert len(response.headers["x-request-id"]) == 32


def test_body_over_the_limit_is_413_from_content_length(empty_client):
    response = empty_client.post("/v1/clustering/predict", content=b"x" * (1024 * 1024 + 1),
                                 headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["code"] == "payload-too-large"


def test_streamed_body_over_the_limit_is_413(empty_client):
    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer
        for _ in range(40):
            yield b"x" * 65536

    response = empty_client.post("/v1/feedback", content=chunks(),
                                 headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_metrics_are_prometheus_text(empty_client):
    empty_client.get("/health/live")
    response = empty_client.get("/metrics")
    assert response.status_code == 200
    assert "http_requests_total" in response.text


def test_an_unexpected_error_is_one_json_log_line_with_the_request_id_and_a_500_problem(
        tmp_path, capsys):
    app = create_app(Settings(models_dir=tmp_path / "models", database_url=f"sqlite:///{tmp_path / 'l.db'}"))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug\nspanning lines")

    with TestClient(app, raise_server_exceptions=False) as client:
        capsys.readouterr()
        response = client.get("/boom")
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == "internal-error" and "a bug" not in json.dumps(problem)
    lines = [line for line in capsys.readouterr().out.splitlines() if "unhandled error" in line]
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["request_id"] == problem["request_id"] == response.headers["x-request-id"]
    assert "RuntimeError: a bug" in entry["exc"] and "Traceback" in entry["exc"]


def test_the_readme_shows_the_limits_the_code_enforces():
    from app.core.limits_table import limits_markdown
    from app.limits import table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    shown = readme.split("<!-- limits:start -->")[1].split("<!-- limits:end -->")[0].strip()
    assert shown == limits_markdown(table(Settings())), "run python -m app.limits and paste the table"


def run_context(app, chunks: list[bytes], timeout_s: float, more_at_end: bool) -> tuple[list[dict], float]:
    """``app`` behind the request context, its body sent as ``chunks``; then, if ``more_at_end``,
    the client stalls mid-body. The messages sent back, and how long it took."""
    import asyncio
    import time

    from app.core.middleware import RequestContext, RequestContextMiddleware

    middleware = RequestContextMiddleware(app, RequestContext(max_body_bytes=10_000, request_timeout_s=timeout_s,
                                                              max_in_flight=8))
    scope = {"type": "http", "method": "POST", "path": "/v1/digits/predict", "headers": [],
             "query_string": b"", "client": ("127.0.0.1", 1), "state": {}}
    pending = list(chunks)

    async def receive() -> dict:
        if pending:
            body = pending.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(pending) or more_at_end}
        await asyncio.sleep(3600)  # a client that stopped sending
        raise AssertionError("never")

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def main() -> float:
        started = time.monotonic()
        await asyncio.wait_for(middleware(scope, receive, send), 5)
        return time.monotonic() - started

    return sent, asyncio.run(main())


async def read_all_then_answer(scope, receive, send):
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"got %d" % len(body)})


def test_a_stalled_upload_is_cut_off_at_the_deadline_with_a_408():
    sent, took = run_context(read_all_then_answer, [b"x" * 10, b"y" * 10], 0.3, more_at_end=True)
    assert 0.3 <= took < 1.5
    assert sent[0]["status"] == 408
    assert json.loads(sent[1]["body"])["code"] == "upload-timeout"


def test_a_body_that_arrives_in_time_is_read_whole_and_the_timer_never_fires():
    sent, took = run_context(read_all_then_answer, [b"x" * 10, b"y" * 10, b"z"], 2.0, more_at_end=False)
    assert [m.get("status") for m in sent[:1]] == [200] and sent[1]["body"] == b"got 21"
    assert took < 2.0


def test_a_slow_app_after_the_body_is_not_an_upload_timeout():
    """The deadline only cuts the upload; an app still working when it passes is not cancelled."""
    import asyncio

    async def slow(scope, receive, send):
        await receive()
        await asyncio.sleep(0.5)  # an app still working when the upload deadline passes
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    sent, took = run_context(slow, [b"x"], 0.2, more_at_end=False)
    assert sent[0]["status"] == 200 and took >= 0.5
