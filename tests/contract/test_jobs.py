"""Asynchronous jobs (``Prefer: respond-async``) on the real server and real job-worker processes:
the embedded worker (JOBS=embedded, SQLite queue) and separate workers (JOBS=worker) over SQLite
and over Redis + PostgreSQL."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from bench.liveserver import REPO_ROOT, LiveServer, running_server
from tests.monitoring_db import database_url
from tests.support import rows, wait_until

EXAMPLES = REPO_ROOT / "examples"
ASYNC = {"Prefer": "respond-async"}
REDIS_URL = "redis://127.0.0.1:6379/5"  # a database of its own: the queue starts empty


def digit_files(*names: str) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", (name, (EXAMPLES / name).read_bytes(), "image/png")) for name in names]


def big_membrane_png(side: int = 2048) -> bytes:
    image = Image.open(EXAMPLES / "membrane-slice3-crop.png").convert("L").resize((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def finished(live: LiveServer, location: str, timeout: float = 60, **headers: str) -> dict:
    """The job at ``location`` once it has finished (polled as a client would)."""
    seen: dict = {}

    def done() -> bool:
        seen.update(httpx.get(live.base_url + location, headers=headers).json())
        return seen["status"] in ("done", "failed", "cancelled")

    assert wait_until(done, timeout, 0.2), f"the job is still {seen.get('status')}"
    return seen


def logged(live: LiveServer, request_id: str) -> int:
    return len(rows(live.database_url, "SELECT instance FROM predictions WHERE request_id = :r", r=request_id))


@contextlib.contextmanager
def job_worker(live: LiveServer, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """A separate job worker (the Procfile's `worker` process) with the server's settings."""
    process = subprocess.Popen([sys.executable, "-m", "app.jobs.worker"], cwd=REPO_ROOT,
                               env={**os.environ, "DATABASE_URL": live.database_url, **env},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> Iterator[LiveServer]:
    queue = tmp_path_factory.mktemp("jobs") / "queue.db"
    with running_server(workers=2, env={"JOBS": "embedded", "JOBS_QUEUE_PATH": str(queue)}) as live:
        yield live


def test_a_job_answers_202_then_the_envelope_the_synchronous_call_gives(embedded):
    files = digit_files("digit-7.png", "digit-7-drawn.png")
    submitted = httpx.post(embedded.base_url + "/v1/digits/predict", files=files,
                           headers={**ASYNC, "X-Data-Consent": "granted", "X-Client-Version": "ios/4.2.0"})
    assert submitted.status_code == 202, submitted.text
    assert submitted.headers["preference-applied"] == "respond-async"
    assert submitted.headers["retry-after"].isdigit()
    job = submitted.json()
    location = submitted.headers["location"]
    assert location == f"/v1/jobs/{job['id']}" and len(job["id"]) == 32
    assert job["status"] in ("queued", "running", "done")
    assert job["request_id"] == submitted.headers["x-request-id"]

    done = finished(embedded, location)
    synchronous = httpx.post(embedded.base_url + "/v1/digits/predict", files=files).json()
    assert done["status"] == "done" and done["progress"] == 1.0 and done["problem"] is None
    assert done["result"]["request_id"] == job["request_id"]  # the job's prediction is that request
    assert {**done["result"], "request_id": None} == {**synchronous, "request_id": None}
    assert wait_until(lambda: logged(embedded, job["request_id"]) == 2, 10)  # both images, once each
    kept = rows(embedded.database_url, "SELECT input IS NOT NULL AS kept, client_version FROM predictions "
                "WHERE request_id = :r", r=job["request_id"])
    assert [(bool(r.kept), r.client_version) for r in kept] == [(True, "ios/4.2.0")] * 2  # consent went with it


def test_a_v2_request_and_a_json_request_run_as_jobs_too(embedded):
    body = {"id": "v2-job", "inputs": [{"name": "features", "shape": [2, 2], "datatype": "FP32",
                                        "data": [15, 39, 120, 80]}]}
    v2 = httpx.post(embedded.base_url + "/v2/models/clustering/infer", json=body, headers=ASYNC)
    v1 = httpx.post(embedded.base_url + "/v1/clustering/predict", headers=ASYNC,
                    json={"instances": [{"annual_income": 15, "spending_score": 39}]})
    assert (v2.status_code, v1.status_code) == (202, 202)
    v2_done, v1_done = finished(embedded, v2.headers["location"]), finished(embedded, v1.headers["location"])
    assert v2_done["result"] == httpx.post(embedded.base_url + "/v2/models/clustering/infer", json=body).json()
    assert v1_done["result"]["predictions"][0]["segment"]


def test_a_binary_answer_is_fetched_from_result_url(embedded):
    crop = (EXAMPLES / "membrane-slice3-crop.png").read_bytes()
    files = {"image": ("crop.png", crop, "image/png")}
    submitted = httpx.post(embedded.base_url + "/v1/segmentation/predict", files=files, headers=ASYNC)
    done = finished(embedded, submitted.headers["location"])
    assert done["result"] is None and done["result_url"] == submitted.headers["location"] + "/result"
    mask = httpx.get(embedded.base_url + done["result_url"])
    assert mask.headers["content-type"] == "image/png"
    assert mask.content == httpx.post(embedded.base_url + "/v1/segmentation/predict", files=files).content


def test_a_job_whose_request_is_bad_fails_with_the_synchronous_problem(embedded):
    files = {"image": ("x.png", b"not an image at all", "image/png")}
    submitted = httpx.post(embedded.base_url + "/v1/digits/predict", files=files, headers=ASYNC)
    assert submitted.status_code == 202
    done = finished(embedded, submitted.headers["location"])
    synchronous = httpx.post(embedded.base_url + "/v1/digits/predict", files=files)
    assert done["status"] == "failed" and done["result"] is None
    assert done["problem"]["code"] == synchronous.json()["code"]
    assert done["problem"]["status"] == synchronous.status_code and 400 <= synchronous.status_code < 500
    unfinished = httpx.get(embedded.base_url + submitted.headers["location"] + "/result")
    assert unfinished.status_code == 409 and unfinished.json()["code"] == "job-not-done"


def test_without_prefer_nothing_changes_and_unknown_jobs_are_404(embedded):
    plain = httpx.post(embedded.base_url + "/v1/digits/predict", files=digit_files("digit-7.png"))
    assert plain.status_code == 200 and "preference-applied" not in plain.headers
    other = httpx.post(embedded.base_url + "/v1/digits/predict", files=digit_files("digit-7.png"),
                       headers={"Prefer": "return=minimal"})
    assert other.status_code == 200
    missing = httpx.get(embedded.base_url + "/v1/jobs/" + "0" * 32)
    assert (missing.status_code, missing.json()["code"]) == (404, "unknown-job")
    assert httpx.get(embedded.base_url + "/v1/jobs/not-an-id").status_code in (404, 422)


def test_a_retried_submission_with_an_idempotency_key_gets_the_same_job(embedded):
    key = {"Idempotency-Key": str(uuid.uuid4()), **ASYNC}
    first = httpx.post(embedded.base_url + "/v1/digits/predict", files=digit_files("digit-7.png"), headers=key)
    again = httpx.post(embedded.base_url + "/v1/digits/predict", files=digit_files("digit-7.png"), headers=key)
    assert first.status_code == again.status_code == 202
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["idempotent-replayed"] == "true"
    done = finished(embedded, first.headers["location"])
    assert wait_until(lambda: logged(embedded, done["request_id"]) == 1, 10)


def test_with_jobs_off_the_preference_is_ignored():
    with running_server(workers=1) as live:
        response = httpx.post(live.base_url + "/v1/digits/predict", files=digit_files("digit-7.png"), headers=ASYNC)
        assert response.status_code == 200 and "preference-applied" not in response.headers
        assert response.json()["predictions"][0]["digit"] == 7
        assert httpx.get(live.base_url + "/v1/jobs/" + "0" * 32).status_code == 404


def test_a_job_belongs_to_its_api_key_and_the_admin_reads_any(tmp_path):
    keys = {"alice": "a" * 32, "bob": "b" * 32}
    import hashlib
    digests = ",".join(hashlib.sha256(k.encode()).hexdigest() for k in keys.values())
    env = {"JOBS": "embedded", "JOBS_QUEUE_PATH": str(tmp_path / "q.db"), "API_KEYS": digests,
           "ADMIN_TOKEN": "admin-secret", "ADMIN_OPEN": "false"}
    with running_server(workers=1, env=env) as live:
        anonymous = httpx.post(live.base_url + "/v1/digits/predict", files=digit_files("digit-7.png"), headers=ASYNC)
        assert anonymous.status_code == 401  # checked at the door: nothing is queued
        submitted = httpx.post(live.base_url + "/v1/digits/predict", files=digit_files("digit-7.png"),
                               headers={**ASYNC, "X-API-Key": keys["alice"]})
        assert submitted.status_code == 202
        location = submitted.headers["location"]
        done = finished(live, location, **{"X-API-Key": keys["alice"]})
        assert done["status"] == "done"
        assert httpx.get(live.base_url + location, headers={"X-API-Key": keys["bob"]}).status_code == 404
        assert httpx.get(live.base_url + location).status_code == 404
        admin = httpx.get(live.base_url + location, headers={"Authorization": "Bearer admin-secret"})
        assert admin.status_code == 200 and admin.json()["id"] == done["id"]


@pytest.fixture(params=["sqlite", "redis+postgresql"])
def separate(request, tmp_path) -> Iterator[tuple[LiveServer, dict[str, str]]]:
    """A server with JOBS=worker (web dynos never run jobs) and the settings its workers need."""
    backend = "postgresql" if request.param.endswith("postgresql") else "sqlite"
    with database_url(backend, tmp_path) as url:
        env = {"JOBS": "worker", "JOB_LEASE_S": "2", "DATABASE_URL": url}
        if request.param.startswith("redis"):
            env["REDIS_URL"] = REDIS_URL
            _flush_queue()
        else:
            env["JOBS_QUEUE_PATH"] = str(tmp_path / "queue.db")
        with running_server(workers=1, env=env) as live:
            yield live, env


def _flush_queue() -> None:
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()


def test_web_dynos_never_run_jobs_and_a_cancelled_job_never_runs(separate):
    live, env = separate
    files = digit_files("digit-7.png")
    queued = httpx.post(live.base_url + "/v1/digits/predict", files=files, headers=ASYNC)
    kept = httpx.post(live.base_url + "/v1/digits/predict", files=files, headers=ASYNC)
    assert queued.status_code == kept.status_code == 202
    assert not wait_until(lambda: httpx.get(live.base_url + kept.headers["location"]).json()["status"] != "queued",
                          2)  # no worker yet: nothing runs it
    cancelled = httpx.delete(live.base_url + queued.headers["location"])
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    with job_worker(live, env):
        done = finished(live, kept.headers["location"], timeout=90)
        assert done["status"] == "done"
    assert httpx.get(live.base_url + queued.headers["location"]).json()["status"] == "cancelled"
    assert logged(live, cancelled.json()["request_id"]) == 0
    again = httpx.delete(live.base_url + queued.headers["location"])
    assert (again.status_code, again.json()["code"]) == (409, "job-finished")


def test_a_worker_killed_mid_job_loses_nothing_and_logs_it_once(separate):
    live, env = separate
    files = {"image": ("big.png", big_membrane_png(), "image/png")}
    submitted = httpx.post(live.base_url + "/v1/segmentation/predict", files=files, headers=ASYNC,
                           params={"format": "json"}, timeout=30)
    assert submitted.status_code == 202, submitted.text
    location = submitted.headers["location"]
    with job_worker(live, env) as first:
        assert wait_until(lambda: httpx.get(live.base_url + location).json()["status"] == "running", 90, 0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert httpx.get(live.base_url + location).json()["status"] == "running"  # its worker is gone
    with job_worker(live, env):
        done = finished(live, location, timeout=120)
    assert done["status"] == "done", done
    assert done["result"]["predictions"][0]["mask_png_b64"]
    assert wait_until(lambda: logged(live, done["request_id"]) == 1, 10)


def test_wait_answers_synchronously_when_the_work_fits_and_makes_a_job_behind_a_busy_queue(tmp_path):
    import concurrent.futures

    env = {"JOBS": "embedded", "JOBS_QUEUE_PATH": str(tmp_path / "q.db"), "HEAVY_QUEUE": "2"}
    big = {"image": ("big.png", big_membrane_png(), "image/png")}
    with running_server(workers=1, env=env) as live:
        quick = httpx.post(live.base_url + "/v1/digits/predict", files=digit_files("digit-7.png"),
                           headers={"Prefer": "respond-async, wait=5"})
        assert quick.status_code == 200 and "preference-applied" not in quick.headers
        assert quick.json()["predictions"][0]["digit"] == 7

        def segment(_: int) -> int:
            return httpx.post(live.base_url + "/v1/segmentation/predict", files=big, params={"format": "json"},
                              timeout=60).status_code

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            busy = [pool.submit(segment, i) for i in range(2)]  # one runs, one waits: seconds of work ahead
            assert wait_until(lambda: httpx.get(live.base_url + "/health/ready").json()["gates"]["heavy"]
                              ["running"] >= 1, 30)
            deferred = httpx.post(live.base_url + "/v1/segmentation/predict", files=big, params={"format": "json"},
                                  headers={"Prefer": "respond-async, wait=1"}, timeout=30)
            assert deferred.status_code == 202, deferred.text
            assert deferred.headers["preference-applied"] == "respond-async"
            assert [f.result() for f in busy] == [200, 200]
        done = finished(live, deferred.headers["location"], timeout=120)
    assert done["status"] == "done" and done["result"]["predictions"][0]["width"] == 2048


def _progress_seen(live: LiveServer, location: str) -> tuple[dict, list[float]]:
    seen: list[float] = []

    def done() -> bool:
        job = httpx.get(live.base_url + location).json()
        seen.append(job["progress"])
        return job["status"] in ("done", "failed", "cancelled")

    assert wait_until(done, 240, 0.05), "the batch job did not finish"
    return httpx.get(live.base_url + location).json(), seen


def test_batches_beyond_the_synchronous_limits_run_as_jobs_and_equal_the_synchronous_answers(embedded):
    import numpy as np

    from tests.support import SHARED_DATA

    with np.load(SHARED_DATA / "mnist" / "mnist.npz") as data:
        digits = data["x_test"][:5000]
    pngs = []
    for pixels in digits:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    files = [("image", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs)]
    too_many = httpx.post(embedded.base_url + "/v1/digits/predict", files=files[:300])
    assert too_many.status_code in (400, 422)  # the synchronous limit stays
    submitted = httpx.post(embedded.base_url + "/v1/digits/predict", files=files, headers=ASYNC, timeout=60)
    assert submitted.status_code == 202, submitted.text

    rng = np.random.default_rng(7)
    table = np.column_stack([rng.integers(15, 140, 100_000), rng.integers(1, 100, 100_000)])
    csv_body = "annual_income,spending_score\n" + "".join(f"{a},{b}\n" for a, b in table)
    rows_job = httpx.post(embedded.base_url + "/v1/clustering/predict", content=csv_body.encode(), timeout=60,
                          headers={**ASYNC, "Content-Type": "text/csv"})
    assert rows_job.status_code == 202, rows_job.text

    digits_done, digits_progress = _progress_seen(embedded, submitted.headers["location"])
    rows_done, rows_progress = _progress_seen(embedded, rows_job.headers["location"])
    assert digits_done["status"] == rows_done["status"] == "done", (digits_done["problem"], rows_done["problem"])
    assert any(0 < p < 1 for p in digits_progress + rows_progress), "progress never moved between 0 and 1"

    synchronous = []
    for start in range(0, 5000, 250):
        answer = httpx.post(embedded.base_url + "/v1/digits/predict", files=files[start:start + 250], timeout=60)
        synchronous += answer.json()["predictions"]
    assert digits_done["result"]["predictions"] == synchronous
    clustered = []
    for start in range(0, 100_000, 10_000):
        instances = [{"annual_income": int(a), "spending_score": int(b)} for a, b in table[start:start + 10_000]]
        answer = httpx.post(embedded.base_url + "/v1/clustering/predict", json={"instances": instances}, timeout=60)
        clustered += answer.json()["predictions"]
    assert rows_done["result"]["predictions"] == clustered

    for job, count in ((digits_done, 5000), (rows_done, 100_000)):
        logged_rows = rows(embedded.database_url, "SELECT COUNT(*) AS n, COUNT(DISTINCT instance) AS d, "
                           "MIN(instance) AS lo, MAX(instance) AS hi FROM predictions WHERE request_id = :r",
                           r=job["request_id"])[0]
        assert tuple(logged_rows) == (count, count, 0, count - 1)  # each input once, numbered as sent


def test_a_batch_job_with_a_bad_row_fails_naming_where(embedded):
    body = "annual_income,spending_score\n15,39\nlots,20\n"
    submitted = httpx.post(embedded.base_url + "/v1/clustering/predict", content=body.encode(),
                           headers={**ASYNC, "Content-Type": "text/csv"})
    done = finished(embedded, submitted.headers["location"])
    assert done["status"] == "failed" and done["problem"]["code"] == "invalid-csv"
    assert done["problem"]["line"] == 3


def test_a_ten_minute_recording_runs_as_a_job_only(embedded):
    import numpy as np
    import soundfile as sf

    from tests.support import SHARED_DATA

    speech, rate = sf.read(SHARED_DATA / "emodb" / "wav" / "03a01Wa.wav", dtype="float32")
    recording = np.tile(speech, int(np.ceil(600 * rate / len(speech))))[: 600 * rate]
    clip = io.BytesIO()
    sf.write(clip, recording[::2], rate // 2, format="WAV", subtype="PCM_16")  # 8 kHz: 9.6 MB
    files = {"audio": ("call.wav", clip.getvalue(), "audio/wav")}
    synchronous = httpx.post(embedded.base_url + "/v1/emotion/predict", files=files, timeout=60)
    assert (synchronous.status_code, synchronous.json()["code"]) == (413, "audio-too-long")
    submitted = httpx.post(embedded.base_url + "/v1/emotion/predict", files=files, headers=ASYNC, timeout=60)
    done = finished(embedded, submitted.headers["location"], timeout=180)
    assert done["status"] == "done", done["problem"]
    prediction = done["result"]["predictions"][0]
    assert prediction["duration_s"] == pytest.approx(600, abs=1) and len(prediction["segments"]) > 300


def test_only_predictions_become_jobs(embedded):
    made = httpx.post(embedded.base_url + "/v1/digits/predict", files=digit_files("digit-7.png")).json()
    assert wait_until(lambda: logged(embedded, made["request_id"]) == 1, 10)
    feedback = httpx.post(embedded.base_url + "/v1/feedback", headers=ASYNC,
                          json={"request_id": made["request_id"], "label": "7"})
    assert feedback.status_code in (200, 201) and "preference-applied" not in feedback.headers
    assert feedback.json()["correct"] is True


def test_the_embedded_job_worker_is_started_again_when_it_dies(tmp_path):
    import psutil

    def job_workers(live: LiveServer) -> list[psutil.Process]:
        return [p for p in psutil.Process(live.pid).children() if "app.jobs.worker" in " ".join(p.cmdline())]

    env = {"JOBS": "embedded", "JOBS_QUEUE_PATH": str(tmp_path / "q.db")}
    with running_server(workers=1, env=env) as live:
        assert wait_until(lambda: len(job_workers(live)) == 1, 30)
        (first,) = job_workers(live)
        first.kill()
        first.wait(10)
        assert wait_until(lambda: [p.pid for p in job_workers(live)] not in ([], [first.pid]), 30)
        submitted = httpx.post(live.base_url + "/v1/digits/predict", files=digit_files("digit-7.png"), headers=ASYNC)
        assert finished(live, submitted.headers["location"], timeout=90)["status"] == "done"


def test_one_client_cannot_fill_the_queue_for_everyone(tmp_path):
    """JOBS=worker with no worker running: jobs stay queued. One address gets its share, then 429;
    another address (behind the trusted proxy, as Heroku's router sends it) is still served."""
    from app.core.limits import JOB_MAX_PENDING_PER_CLIENT

    env = {"JOBS": "worker", "JOBS_QUEUE_PATH": str(tmp_path / "queue.db")}
    body = (EXAMPLES / "mall-customers.json").read_bytes()

    def submit(client: httpx.Client, address: str) -> httpx.Response:
        return client.post("/v1/clustering/predict", content=body, headers={
            **ASYNC, "Content-Type": "application/json", "X-Forwarded-For": address})

    with running_server(workers=1, env=env) as live, httpx.Client(base_url=live.base_url, timeout=30) as client:
        accepted = [submit(client, "203.0.113.7") for _ in range(JOB_MAX_PENDING_PER_CLIENT)]
        assert {r.status_code for r in accepted} == {202}
        refused = submit(client, "203.0.113.7")
        assert refused.status_code == 429 and refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["code"] == "too-many-jobs" and refused.headers["retry-after"] == "30"
        assert submit(client, "203.0.113.8").status_code == 202  # someone else is not held back
        assert client.delete(accepted[0].headers["location"]).status_code == 200  # a finished job frees a place
        assert submit(client, "203.0.113.7").status_code == 202
        kept = rows(live.database_url, "SELECT DISTINCT client FROM jobs")
        assert len(kept) == 2 and not any("203.0.113" in str(row) for row in kept)
