"""The jobs table's claims (one run at a time, takeover after the lease, poison jobs), its bounds,
and the job runner's handling of answers, on SQLite; the table's upgrade on PostgreSQL too."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import Column, MetaData, Table, create_engine, insert, inspect, select

from app.jobs.service import document, owner_of, preference, wants_async
from app.jobs.store import JobStore, jobs_table, new_job_id
from app.jobs.batches import Part
from app.jobs.worker import JobRunner
from tests.monitoring_db import BACKENDS, database_url


@pytest.fixture
def store(tmp_path) -> JobStore:
    return JobStore(f"sqlite:///{tmp_path / 'jobs.db'}", ttl_s=3600, lease_s=0.2)


def submit(store: JobStore, body: bytes = b"{}", client: str = "ip:127.0.0.1") -> str:
    job_id = new_job_id()
    store.submit(job_id, "", "rid-" + job_id[:8], "/v1/clustering/predict", "",
                 [("content-type", "application/json")], body, client=client)
    return job_id


def test_a_job_is_claimed_once_while_its_lease_holds_then_taken_over(store):
    job_id = submit(store)
    first = store.claim(job_id, max_tries=3)
    assert first is not None and first.tries == 1 and first.state == "running"
    assert store.claim(job_id, max_tries=3) is None  # running elsewhere
    assert store.stranded(60) == []
    time.sleep(0.25)  # a sleep, not a wait: the 0.2 s lease must lapse unrenewed
    assert store.stranded(60) == [job_id]  # its worker stopped renewing
    second = store.claim(job_id, max_tries=3)
    assert second is not None and second.tries == 2


def test_a_job_taken_over_too_often_fails_as_abandoned(store):
    job_id = submit(store)
    for _ in range(2):
        assert store.claim(job_id, max_tries=2) is not None
        time.sleep(0.25)  # a sleep, not a wait: the 0.2 s lease must lapse unrenewed
    assert store.claim(job_id, max_tries=2) is None
    job = store.get(job_id)
    assert job.state == "failed" and job.body is None
    assert json.loads(job.result)["code"] == "job-abandoned"
    assert document(job)["problem"]["code"] == "job-abandoned"


def test_a_cancelled_job_is_not_claimed_and_a_finished_one_not_cancelled(store):
    job_id = submit(store)
    assert store.cancel(job_id)
    assert store.claim(job_id, max_tries=3) is None and store.get(job_id).body is None
    other = submit(store)
    store.claim(other, max_tries=3)
    assert store.finish(other, "done", 200, "application/json", b'{"predictions": []}')
    assert not store.cancel(other)
    assert document(store.get(other))["result"] == {"predictions": []}


def test_expired_jobs_are_purged(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}", ttl_s=0.0, lease_s=1)
    job_id = submit(store)
    time.sleep(0.01)  # a sleep, not a wait: the job must outlive its 0 s time to live
    assert store.get(job_id) is None
    assert store.purge() == 1


class FakeApp:
    def __init__(self, *answers: tuple[int, str, bytes], parts: int = 1) -> None:
        self.answers = list(answers)
        self.sent: list[str] = []
        self.count = parts

    def parts(self, job):
        return [Part("application/json", b"{}", i * 2, 2) for i in range(self.count)]

    def send(self, job, part):
        self.sent.append(job.request_id)
        return self.answers.pop(0)


@pytest.mark.parametrize("answer, state", [
    ((200, "application/json", b'{"predictions": [1]}'), "done"),
    ((422, "application/problem+json", b'{"code": "blank-image", "status": 422}'), "failed"),
    ((503, "application/problem+json", b'{"code": "deadline-exceeded", "status": 503}'), "failed"),
    ((503, "application/problem+json", b'{"code": "overloaded", "status": 503}'), "queued"),
    ((429, "application/problem+json", b'{"code": "rate-limited", "status": 429}'), "queued"),
])
def test_the_runner_stores_answers_and_queues_again_what_says_try_again(store, answer, state):
    job_id = submit(store)
    erased: list[str] = []
    app = FakeApp(answer)
    JobRunner(None, app, store, erased.append)(job_id)
    job = store.get(job_id)
    assert job.state == state and app.sent == [job.request_id]
    assert erased == []  # a first run has nothing of its own to erase


def test_a_job_taken_over_erases_what_its_dead_run_logged_before_running_again(store):
    job_id = submit(store)
    store.claim(job_id, max_tries=3)  # a worker took it and died
    time.sleep(0.25)  # a sleep, not a wait: the 0.2 s lease must lapse unrenewed
    erased: list[str] = []
    JobRunner(None, FakeApp((200, "application/json", b"{}")), store, erased.append)(job_id)
    assert erased == [store.get(job_id).request_id] and store.get(job_id).state == "done"


def test_prefer_and_owner_parsing():
    def scope(value: bytes) -> dict:
        return {"headers": [(b"prefer", value)]}

    assert wants_async(scope(b"respond-async"))
    assert wants_async(scope(b"return=minimal, respond-async; wait=10"))
    assert wants_async(scope(b"Respond-Async"))
    assert not wants_async(scope(b"return=minimal")) and not wants_async({"headers": []})
    assert preference(scope(b"respond-async, wait=10")) == (True, 10.0)
    assert preference(scope(b"respond-async; wait=2.5")) == (True, 2.5)
    assert preference(scope(b"wait=3")) == (False, 3.0)
    assert preference(scope(b"respond-async, wait=-1")) == (True, None)
    assert preference(scope(b"respond-async, wait=soon")) == (True, None)
    assert preference(scope(b"respond-async, wait=nan")) == (True, None)
    def owner(**headers: str) -> str:
        return owner_of({"headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]})

    assert owner() == ""
    assert owner(authorization="Bearer k1") == owner(x_api_key="k1") != owner(x_api_key="k2")


def test_a_batch_joins_its_parts_in_order_and_stops_at_the_first_problem(store):
    job_id = submit(store)
    answers = [(200, "application/json", json.dumps({"model": "m", "predictions": [i, i + 1]}).encode())
               for i in (0, 2, 4)]
    JobRunner(None, FakeApp(*answers, parts=3), store, list.append)(job_id)
    job = store.get(job_id)
    assert job.state == "done" and job.progress == 1.0
    assert document(job)["result"] == {"model": "m", "predictions": [0, 1, 2, 3, 4, 5]}

    failing = submit(store)
    answers = [(200, "application/json", b'{"predictions": [0, 1]}'),
               (422, "application/problem+json", b'{"code": "blank-image", "status": 422, "detail": "blank"}')]
    JobRunner(None, FakeApp(*answers, parts=3), store, list.append)(failing)
    job = store.get(failing)
    assert job.state == "failed" and job.progress == pytest.approx(2 / 6)  # the first part's two of six
    problem = document(job)["problem"]
    assert problem["code"] == "blank-image" and problem["first_instance"] == 2


def test_submissions_beyond_the_pending_bounds_are_refused(store, monkeypatch):
    import app.jobs.store as module

    monkeypatch.setattr(module, "JOB_MAX_PENDING", 2)
    first, second = submit(store), submit(store)
    with pytest.raises(module.QueueFull):
        submit(store)
    store.cancel(first)  # a finished job no longer counts
    submit(store)
    monkeypatch.setattr(module, "JOB_MAX_PENDING", 100)
    monkeypatch.setattr(module, "JOB_MAX_PENDING_BYTES", 10)
    with pytest.raises(module.QueueFull):
        submit(store, body=b"x" * 11)
    assert store.get(second).state == "queued"


def test_one_client_may_have_only_its_share_of_the_pending_jobs(store, monkeypatch):
    import app.jobs.store as module

    monkeypatch.setattr(module, "JOB_MAX_PENDING_PER_CLIENT", 2)
    first = submit(store, client="ip:203.0.113.7")
    submit(store, client="ip:203.0.113.7")
    with pytest.raises(module.ClientQueueFull):
        submit(store, client="ip:203.0.113.7")
    submit(store, client="ip:203.0.113.8")  # another client is not held back
    submit(store, client="key:0123456789abcdef")
    store.cancel(first)  # a finished job no longer counts
    submit(store, client="ip:203.0.113.7")
    with store.engine.connect() as conn:
        kept = {row.client for row in conn.execute(select(jobs_table.c.client))}
    assert len(kept) == 3 and not any("203.0.113" in c for c in kept)  # a digest, never the address


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_jobs_table_made_before_the_client_column_gains_it(backend, tmp_path):
    with database_url(backend, tmp_path) as url:
        older = MetaData()
        Table("jobs", older, *(Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
                               for c in jobs_table.columns if c.name != "client"))
        engine = create_engine(url)
        older.create_all(engine)
        with engine.begin() as conn:
            conn.execute(insert(older.tables["jobs"]).values(
                id="a" * 32, owner="", state="queued", request_id="r", path="/v1/clustering/predict", query="",
                headers="[]", body=b"{}", tries=0, progress=0.0, created=time.time(), updated=time.time(),
                expires_at=time.time() + 60))
        engine.dispose()
        store = JobStore(url, ttl_s=3600, lease_s=1)
        job_id = submit(store)
        assert {c["name"] for c in inspect(store.engine).get_columns("jobs")} >= {"client"}
        assert store.get("a" * 32).state == "queued" and store.get(job_id).state == "queued"
        second = JobStore(url, ttl_s=3600, lease_s=1)  # a second process: nothing to add
        assert second.get(job_id) is not None
        second.dispose()
        store.dispose()
