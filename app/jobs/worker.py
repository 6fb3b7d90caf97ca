"""The job worker: ``python -m app.jobs.worker`` (the Procfile's ``worker`` process).

It builds the same app the web dynos serve, loads the models once, and consumes the job queue
(:mod:`app.jobs.queue`) one job at a time: it claims the job's row, sends the job's stored request
through the app in this process under the request id the submission was given (a batch larger than
the synchronous limit as several requests of that size, :mod:`app.jobs.batches`, recording its
progress after each), and stores the answer. The prediction-log rows are written before the answer is stored (``LOG_DURABLE``). The
access check (API key, rate limit) was made when the job was submitted and is not made again.

At least once, visible once: while a job runs its lease is renewed; a worker killed mid-job (kill -9,
a dyno restart) leaves a job whose lease runs out, and every worker looks for such jobs every
``JOB_REAP_S`` and queues them again. A job taken over deletes the rows its earlier run may have
written before running again, so each input is in the log once. A job that has been taken over
``JOB_MAX_TRIES`` times fails with ``job-abandoned``. A job whose prediction answers "try again"
(429, or a 503 other than ``deadline-exceeded``: ``overloaded``, the log's database down) goes back
to the queue, picked up again within ``JOB_LOST_MESSAGE_S``, up to the same limit; any other answer
is the job's result (2xx: ``done``, else ``failed`` with the problem).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
from typing import Any

from app.core.config import Settings, get_settings
from app.core.errors import PROBLEM_MEDIA_TYPE, ProblemError, problem_body
from app.core.limits import JOB_LOST_MESSAGE_S, JOB_MAX_AUDIO_SECONDS, JOB_MAX_TRIES, JOB_REAP_S
from app.core.pipeline import REGISTERED
from app.jobs.batches import Part, join, split
from app.jobs.queue import build_queue
from app.jobs.store import Job, JobStore
from app.monitoring.observer import INSTANCE_OFFSET

log = logging.getLogger("app.jobs.worker")


def worker_settings(settings: Settings) -> Settings:
    """The web settings as a job worker runs them: no access check (made at submission), the
    job's deadline, clips up to ``JOB_MAX_AUDIO_SECONDS``, rows written before an answer, and no
    jobs of its own."""
    return settings.model_copy(update={
        "api_keys": [], "rate_limit": None, "log_durable": True, "jobs": "off",
        "request_timeout_s": settings.job_timeout_s,
        "max_audio_seconds": max(settings.max_audio_seconds, JOB_MAX_AUDIO_SECONDS)})


class InProcessApp:
    """The app on an event loop of its own thread, its lifespan entered (models loaded) once."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="job-app", daemon=True)
        self.thread.start()
        self._lifespan = app.router.lifespan_context(app)
        self._call(self._lifespan.__aenter__())

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def parts(self, job: Job) -> list[Part]:
        """The job's request cut into requests of the synchronous size (:mod:`app.jobs.batches`)."""
        endpoint = next((e for e in REGISTERED if e.path == job.path), None)
        content_type = next((v for n, v in job.headers if n.lower() == "content-type"), "")
        return self._call(split(endpoint, content_type, job.body or b""))

    def send(self, job: Job, part: Part) -> tuple[int, str, bytes]:
        """The app's answer to one part of the job's request: status, media type, body."""
        return self._call(self._send(job, part))

    async def _send(self, job: Job, part: Part) -> tuple[int, str, bytes]:
        INSTANCE_OFFSET.set(part.first_instance)  # this task's context: the log numbers the whole batch
        body = part.body
        headers = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in job.headers
                   if name.lower() != "content-type"]
        headers += [(b"content-type", part.content_type.encode("latin-1")), (b"host", b"job-worker"),
                    (b"content-length", str(len(body)).encode())]
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": job.path, "raw_path": job.path.encode(),
                 "query_string": job.query.encode("latin-1"), "root_path": "", "headers": headers,
                 "client": ("127.0.0.1", 0), "server": ("job-worker", 0),
                 "state": {"job_request_id": job.request_id}}
        sent = False
        answer: dict[str, Any] = {"status": 500, "media_type": "application/octet-stream", "body": []}

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the request is whole: nothing more arrives
            return {"type": "http.disconnect"}  # pragma: no cover

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                for name, value in message.get("headers", []):
                    if name.lower() == b"content-type":
                        answer["media_type"] = value.decode("latin-1")
            elif message["type"] == "http.response.body":
                answer["body"].append(message.get("body", b""))

        await self.app(scope, receive, send)
        return answer["status"], answer["media_type"], b"".join(answer["body"])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._lifespan.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)


class JobRunner:
    """Runs one job id (the queue's task) against the in-process app."""

    def __init__(self, settings: Settings, app: InProcessApp, store: JobStore, erase: Any) -> None:
        self.settings, self.app, self.store, self.erase = settings, app, store, erase

    def __call__(self, job_id: str) -> None:
        job = self.store.claim(job_id, JOB_MAX_TRIES)
        if job is None:
            return  # finished, cancelled, or running in another worker
        if job.tries > 1:  # an earlier run died: whatever it logged goes, this run logs it once
            self.erase(job.request_id)
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(job_id, stop), daemon=True)
        renewer.start()
        started = time.perf_counter()
        try:
            outcome = self._run(job)
        finally:
            stop.set()
            renewer.join()
        if outcome is None:
            return  # cancelled while it ran
        status, media_type, body = outcome
        if status == 429 or (status == 503 and _code(body) != "deadline-exceeded"):
            log.warning("job run refused, queued again", extra={"job_id": job_id, "status": status})
            self.store.release(job_id)
            return
        state = "done" if status < 400 else "failed"
        if self.store.finish(job_id, state, status, media_type, body):
            log.info("job finished", extra={"job_id": job_id, "request_id": job.request_id, "state": state,
                                            "status": status, "seconds": round(time.perf_counter() - started, 3)})

    def _run(self, job: Job) -> tuple[int, str, bytes] | None:
        """Send every part of the job; the joined answer, the first part's refusal or problem, or
        None when the job was cancelled between parts."""
        try:
            parts = self.app.parts(job)
        except ProblemError as exc:
            problem = problem_body(exc.status, exc.code, exc.detail, field=exc.field, request_id=job.request_id,
                                   instance=job.path, **exc.extra)
            return exc.status, PROBLEM_MEDIA_TYPE, json.dumps(problem).encode()
        total = sum(part.instances for part in parts) or 1
        answers: list[dict[str, Any]] = []
        done = 0
        for part in parts:
            status, media_type, body = self.app.send(job, part)
            if len(parts) == 1:
                return status, media_type, body
            if status >= 300 or not media_type.startswith("application/json"):
                return status, media_type, _in_batch(body, part)
            answers.append(json.loads(body))
            done += part.instances
            if not self.store.renew(job.id, progress=done / total):
                return None
        return 200, "application/json", json.dumps(join(answers)).encode()

    def _renew(self, job_id: str, stop: threading.Event) -> None:
        while not stop.wait(self.store.lease_s / 3):
            with contextlib.suppress(Exception):
                self.store.renew(job_id)


def _in_batch(body: bytes, part: Part) -> bytes:
    """A part's problem, saying where in the batch its instances start."""
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        problem = json.loads(body)
        problem["first_instance"] = part.first_instance
        problem["detail"] = f"{problem.get('detail', '')} (in the part of the batch from instance " \
                            f"{part.first_instance})"
        return json.dumps(problem).encode()
    return body


def _code(body: bytes) -> str | None:
    with contextlib.suppress(ValueError, AttributeError):
        return json.loads(body).get("code")
    return None


def reap(store: JobStore, queue_task: Any, stop: threading.Event) -> None:
    """Every ``JOB_REAP_S``: queue again the jobs whose worker died or whose message was lost, and
    delete the expired ones."""
    while not stop.wait(JOB_REAP_S):
        try:
            for job_id in store.stranded(JOB_LOST_MESSAGE_S):
                store.touch(job_id)
                queue_task(job_id)
            store.purge()
        except Exception as exc:  # the database or the queue is down: try again next round
            log.warning("job reaper: %r", exc)


def main() -> None:
    from app.main import create_app
    from app.monitoring.store import erase_request

    settings = worker_settings(get_settings())
    app = create_app(settings)
    running = InProcessApp(app)
    store = JobStore(settings.database_url, ttl_s=settings.job_result_ttl_h * 3600.0, lease_s=settings.job_lease_s)
    engine = app.state.prediction_log.engine if getattr(app.state, "prediction_log", None) else store.engine
    runner = JobRunner(settings, running, store, lambda request_id: erase_request(engine, request_id, remember=False))
    queue, task = build_queue(settings, runner)
    stop = threading.Event()
    reaper = threading.Thread(target=reap, args=(store, task, stop), name="job-reaper", daemon=True)
    reaper.start()
    log.info("job worker ready", extra={"pid": os.getpid(), "queue": type(queue).__name__})
    consumer = queue.create_consumer(workers=1, worker_type="thread", periodic=False, check_worker_health=True)
    try:
        consumer.run()  # until SIGTERM / SIGINT (huey finishes the job in progress first)
    finally:
        stop.set()
        running.close()


if __name__ == "__main__":  # pragma: no cover
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    main()
