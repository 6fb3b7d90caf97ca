"""Submitting jobs and reading them: ``Prefer: respond-async`` on any prediction, ``/v1/jobs/{id}``.

A prediction POST (v1 or V2) sent with ``Prefer: respond-async`` (RFC 7240) is checked as a
synchronous one would be at the door (API key, rate limit, body size), stored as a job with the
request id it was given, queued, and answered ``202 Accepted`` with ``Location: /v1/jobs/{id}``,
``Retry-After`` and ``Preference-Applied: respond-async``. A job worker later sends that same
request through the same app (:mod:`app.jobs.worker`): the same request id, prediction-log rows,
consent and drift features as a synchronous call. ``GET /v1/jobs/{id}`` gives the job; when done,
its ``result`` is exactly the envelope the synchronous call gives (a binary answer is fetched
from ``result_url``); when failed, ``problem`` is the problem the synchronous call would have
given. ``DELETE`` cancels a job that has not finished. With ``Prefer: respond-async, wait=N`` the
request is first run synchronously with its deadline cut to N s: answered when it fits, made a job
(202) when admission refuses it (503 ``overloaded``) or it runs out of time. Ids are 128 random bits; with API keys
configured a job belongs to the key that submitted it (others get 404), and the admin token reads
any job. With ``JOBS=off`` the preference is ignored, as RFC 7240 allows: the answer is synchronous.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import math
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.access import bearer_token, is_admin_token
from app.core.errors import ProblemError, problem_answer
from app.core.execution import BlockingCalls
from app.core.idempotency import api_key_owner, read_whole_body
from app.core.limits import (
    DB_CALL_TIMEOUT_S,
    DB_QUEUE,
    DB_THREADS,
    JOB_MAX_PENDING,
    JOB_MAX_PENDING_BYTES,
    JOB_MAX_PENDING_PER_CLIENT,
    JOB_POLL_AFTER_S,
)
from app.jobs.queue import build_queue
from app.jobs.store import ClientQueueFull, Job, JobStore, QueueFull, new_job_id

log = logging.getLogger("app.jobs")

# Request headers a job keeps: what the prediction reads. Credentials are checked at submission and
# never stored; Prefer and Idempotency-Key belong to the submission.
KEPT_HEADERS = {"content-type", "accept", "x-data-consent", "x-client-version", "x-request-id",
                "user-agent"}
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
PREFER_PARAMETER = {
    "name": "Prefer", "in": "header", "required": False, "schema": {"type": "string"},
    "description": "`respond-async`: answer 202 Accepted at once with the job's URL (Location) and run the "
                   "prediction in a job worker; GET that URL for the result. `respond-async, wait=N`: answer "
                   "synchronously when the work fits in N seconds (admission's estimate of the work queued "
                   "ahead, then the run itself), else 202 as above, instead of a 503. Ignored (a synchronous "
                   "answer) when the service runs no job workers (JOBS=off)."}


class JobDocument(BaseModel):
    """A job: its state and, once finished, the synchronous call's answer or problem."""

    model_config = {"json_schema_extra": {"examples": [{
        "id": "5f0c6a1e9b2d4c7f8a3e1d2c4b5a6978", "status": "done", "progress": 1.0,
        "request_id": "019ab2c3d4e5f60718293a4b5c6d7e8f", "created": "2026-01-05T10:00:00.000+00:00",
        "updated": "2026-01-05T10:00:00.250+00:00",
        "result": {"model": "digits", "version": "1.1.0", "request_id": "019ab2c3d4e5f60718293a4b5c6d7e8f",
                   "predictions": [{"label": "7", "digit": 7, "confidence": 0.9999}]},
        "result_url": None, "problem": None}]}}

    id: str = Field(description="the job's id: keep it, it is the only way to read the job")
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    progress: float = Field(ge=0, le=1, description="share of the job's work done")
    request_id: str = Field(description="the prediction's request id (in the prediction log and in feedback)")
    created: str
    updated: str
    result: dict[str, Any] | None = Field(None, description="when done: the envelope the synchronous call gives")
    result_url: str | None = Field(None, description="when done with a binary answer (an image): where to get it")
    problem: dict[str, Any] | None = Field(None, description="when failed: the problem the synchronous call gives")


class StoreUnavailable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


def owner_of(scope: Scope) -> str:
    """Whose job it is: the hex digest of the API key sent (as an idempotency key's owner), or ""."""
    return api_key_owner(scope).hex()


def document(job: Job) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": job.id, "status": job.state, "progress": round(job.progress, 4),
                           "request_id": job.request_id, "created": _iso(job.created),
                           "updated": _iso(job.updated), "result": None, "result_url": None, "problem": None}
    if job.state == "done" and job.result is not None:
        if (job.media_type or "").startswith("application/json"):
            doc["result"] = json.loads(job.result)
        else:
            doc["result_url"] = f"/v1/jobs/{job.id}/result"
    elif job.state == "failed" and job.result is not None:
        doc["problem"] = json.loads(job.result)
    return doc


def preference(scope: Scope) -> tuple[bool, float | None]:
    """Whether the request prefers ``respond-async``, and the ``wait`` it allows (seconds), if any."""
    wanted, wait = False, None
    for name, value in scope["headers"]:
        if name != b"prefer":
            continue
        for part in value.decode("latin-1").split(","):
            for item in part.split(";"):
                token, _, argument = item.strip().partition("=")
                token = token.strip().lower()
                if token == "respond-async":
                    wanted = True
                elif token == "wait":
                    with contextlib.suppress(ValueError):
                        seconds = float(argument.strip().strip('"'))
                        if seconds >= 0 and math.isfinite(seconds):
                            wait = seconds
    return wanted, wait


def wants_async(scope: Scope) -> bool:
    return preference(scope)[0]


class JobService:
    """The jobs of one process: the table, the queue and the threads their calls run on."""

    def __init__(self, settings: Any) -> None:
        self.store = JobStore(settings.database_url, ttl_s=settings.job_result_ttl_h * 3600.0,
                              lease_s=settings.job_lease_s)
        self.queue, self.task = build_queue(settings)
        self.calls = BlockingCalls(DB_THREADS, DB_QUEUE, DB_CALL_TIMEOUT_S, "jobs")

    def submit(self, job_id: str, owner: str, request_id: str, path: str, query: str,
               headers: list[tuple[str, str]], body: bytes, client: str) -> Job:
        self.store.submit(job_id, owner, request_id, path, query, headers, body, client=client)
        self.task(job_id)
        job = self.store.get(job_id)
        assert job is not None
        return job

    async def run(self, fn: Any, *args: Any) -> Any:
        return await self.calls.run(None, StoreUnavailable, fn, *args)

    def close(self) -> None:
        self.store.dispose()


class JobsMiddleware:
    """Turns a prediction POST with ``Prefer: respond-async`` into a job (see the module); every
    other request passes through. Inside the idempotency layer: a retried submission with the same
    Idempotency-Key gets the same job."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        jobs: JobService | None = getattr(scope["app"].state, "jobs", None) if "app" in scope else None
        wanted, wait = preference(scope) if scope["type"] == "http" and scope["method"] == "POST" else (False, None)
        if jobs is None or not wanted:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if wait is None:
            try:
                access_headers = scope["app"].state.access.check(request)  # 401 / 429 before anything is kept
            except ProblemError as exc:
                await problem_answer(request, exc)(scope, receive, send)
                return
        else:
            access_headers = {}  # the synchronous attempt checks access; a job after it does not again
        messages, body = await read_whole_body(receive)
        if messages is None:
            return  # the client went away
        state = scope["state"]
        if wait is not None and await self._answered_within(scope, body, receive, send, wait):
            return
        headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in scope["headers"]
                   if n.decode("latin-1").lower() in KEPT_HEADERS]
        owner = owner_of(scope)
        try:
            job = await jobs.run(jobs.submit, new_job_id(), owner, state["request_id"], scope["path"],
                                 scope.get("query_string", b"").decode("latin-1"), headers, body,
                                 scope["app"].state.access.identity(request))
        except ClientQueueFull:
            error = ProblemError(429, "too-many-jobs", f"This client has {JOB_MAX_PENDING_PER_CLIENT} jobs waiting "
                                 "or running, the most one client may have; retry once one has finished.",
                                 headers={"Retry-After": "30"})
            await problem_answer(request, error)(scope, receive, send)
            return
        except QueueFull:
            error = ProblemError(503, "jobs-full", f"As many jobs are waiting as the service keeps "
                                 f"({JOB_MAX_PENDING}, or {JOB_MAX_PENDING_BYTES // 1048576} MiB of them); "
                                 "retry later.", headers={"Retry-After": "30"})
            await problem_answer(request, error)(scope, receive, send)
            return
        except (StoreUnavailable, SQLAlchemyError, OSError) as exc:
            log.warning("job not queued: %r", exc)
            error = ProblemError(503, "jobs-unavailable", "The job store or queue cannot be reached; retry "
                                 "shortly (nothing was queued).", headers={"Retry-After": "5"})
            await problem_answer(request, error)(scope, receive, send)
            return
        state["job_id"] = job.id
        response = JSONResponse(document(job), status_code=202, headers={
            "Location": f"/v1/jobs/{job.id}", "Retry-After": str(JOB_POLL_AFTER_S),
            "Preference-Applied": "respond-async", **access_headers})
        await response(scope, receive, send)

    async def _answered_within(self, scope: Scope, body: bytes, receive: Receive, send: Send,
                               wait: float) -> bool:
        """``Prefer: respond-async, wait=N``: run the request now with its deadline cut to N s. The
        admission gates refuse it (503 ``overloaded``) when the work queued ahead would not let it
        finish in time, and a run past N s stops (503 ``deadline-exceeded``); either way nothing was
        answered or logged, and it becomes a job (False). Any other answer is sent (True)."""
        deadline = scope["state"]["deadline"]
        deadline.expires_at = min(deadline.expires_at, time.monotonic() + wait)
        pending = [{"type": "http.request", "body": body, "more_body": False}]
        held: list[Message] = []

        async def replay() -> Message:
            if pending:
                return pending.pop(0)
            return await receive()  # the body is read: what comes now is the client going away

        async def hold_refusals(message: Message) -> None:
            if held or (message["type"] == "http.response.start" and message["status"] == 503):
                held.append(message)
                return
            await send(message)

        await self.app(scope, replay, hold_refusals)
        if not held:
            return True
        if scope["state"].get("error_code") in ("overloaded", "deadline-exceeded"):
            scope["state"]["error_code"] = None
            return False
        for message in held:
            await send(message)
        return True


router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="the id the 202 answer gave")]
NOT_FOUND = {404: {"description": "no such job (or not yours, or expired): `unknown-job`"}}


def _service(request: Request) -> JobService:
    jobs: JobService | None = request.app.state.jobs
    if jobs is None:
        raise ProblemError(404, "jobs-off", "This service runs no jobs (JOBS=off).")
    return jobs


async def _job(request: Request, job_id: str) -> tuple[JobService, Job]:
    jobs = _service(request)
    try:
        job = await jobs.run(jobs.store.get, job_id)
    except (StoreUnavailable, SQLAlchemyError) as exc:
        log.warning("job store unavailable: %r", exc)
        raise ProblemError(503, "jobs-unavailable", "The job store cannot be reached; retry shortly.",
                           headers={"Retry-After": "5"}) from None
    owner = owner_of(request.scope)
    admin = is_admin_token(bearer_token(request.headers.get("authorization", "")), request.app.state.settings)
    if job is None or not (hmac.compare_digest(job.owner, owner) or admin):
        raise ProblemError(404, "unknown-job", "No job with this id: it expired, or it is another API key's.",
                           field="job_id")
    return jobs, job


def _answer(job: Job) -> JSONResponse:
    headers = {} if job.state in ("done", "failed", "cancelled") else {"Retry-After": str(JOB_POLL_AFTER_S)}
    return JSONResponse(document(job), headers=headers)


@router.get("/{job_id}", operation_id="get_job", response_model=JobDocument, responses=NOT_FOUND)
async def get_job(request: Request, job_id: JobId) -> JSONResponse:
    """The job: queued, running, done (with ``result`` or ``result_url``), failed (with ``problem``)
    or cancelled. While it is queued or running the answer carries ``Retry-After``."""
    _, job = await _job(request, job_id)
    return _answer(job)


@router.get("/{job_id}/result", operation_id="get_job_result", responses={
    **NOT_FOUND, 200: {"description": "the binary answer of a done job (an image)",
                       "content": {"image/png": {"schema": {"type": "string", "format": "binary"},
                                                 "example": "(the PNG's bytes)"}}},
    409: {"description": "the job has no binary answer (yet): `job-not-done`"}})
async def get_job_result(request: Request, job_id: JobId) -> Response:
    """The answer of a done job, as the synchronous call sends it (for a binary answer: an image)."""
    _, job = await _job(request, job_id)
    if job.state != "done" or job.result is None:
        raise ProblemError(409, "job-not-done", f"The job is {job.state}: no result to fetch.", field="job_id")
    return Response(job.result, media_type=job.media_type or "application/octet-stream")


@router.delete("/{job_id}", operation_id="cancel_job", response_model=JobDocument, responses={
    **NOT_FOUND, 409: {"description": "the job has already finished: `job-finished`"}})
async def cancel_job(request: Request, job_id: JobId) -> JSONResponse:
    """Cancel a queued or running job: it will not run (or its answer is dropped); the job, now
    ``cancelled``, is returned."""
    jobs, job = await _job(request, job_id)
    cancelled = await jobs.run(jobs.store.cancel, job_id)
    if not cancelled:
        raise ProblemError(409, "job-finished", f"The job has already finished ({job.state}).", field="job_id")
    _, job = await _job(request, job_id)
    return _answer(job)


def build_jobs(settings: Any) -> JobService | None:
    """The process's job service, or None with ``JOBS=off``."""
    return None if settings.jobs == "off" else JobService(settings)


def add_job_contract(schema: dict[str, Any], paths: list[str], patterns: Any) -> None:
    """Every prediction operation in the OpenAPI document takes ``Prefer`` and may answer 202."""
    prediction_paths = set(paths) | {route.path for route in patterns}
    # No body schema: typed clients keep one answer type for a prediction; the body is the job as
    # GET /v1/jobs/{id} (get_job) gives it.
    accepted = {"description": "with `Prefer: respond-async`: the job was queued; GET its Location "
                               "(`get_job`) for its state and result. The body is that job (JobDocument).",
                "headers": {"Location": {"schema": {"type": "string"}, "description": "/v1/jobs/{id}"},
                            "Retry-After": {"schema": {"type": "integer"}},
                            "Preference-Applied": {"schema": {"type": "string", "enum": ["respond-async"]}}}}
    for path, operations in schema.get("paths", {}).items():
        if path not in prediction_paths or "post" not in operations:
            continue
        operation = operations["post"]
        operation.setdefault("parameters", []).append(PREFER_PARAMETER)
        responses = operation.setdefault("responses", {})
        responses["202"] = accepted
        if "429" in responses:
            responses["429"] = {**responses["429"], "description": responses["429"]["description"] + (
                f"; with `Prefer: respond-async`, `too-many-jobs`: {JOB_MAX_PENDING_PER_CLIENT} of this "
                "client's jobs are waiting or running")}
