"""The jobs table: one row per submitted job, its request, its state and its answer.

It lives in the prediction log's database (``DATABASE_URL``), so every web dyno and every job
worker sees the same jobs. The queue (:mod:`app.jobs.queue`) only carries job ids; this table is
what a job is. A worker claims a job with one conditional update (``queued``, or ``running`` with
its lease run out), so a job delivered twice runs once at a time, and a job whose worker died is
taken over once its lease has run out.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column, Float, Integer, LargeBinary, MetaData, String, Table, Text
from sqlalchemy import case, delete, func, insert, or_, select, update

from app.core.access import key_digest
from app.core.limits import JOB_MAX_PENDING, JOB_MAX_PENDING_BYTES, JOB_MAX_PENDING_PER_CLIENT
from app.core.tables import TableStore

STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")

metadata = MetaData()
jobs_table = Table(
    "jobs", metadata,
    Column("id", String(32), primary_key=True),  # 128 random bits, hex
    Column("owner", String(64), nullable=False),  # sha256 of the API key that submitted it ("" without keys)
    Column("state", String(9), nullable=False),
    Column("request_id", String(64), nullable=False),
    Column("path", Text, nullable=False),
    Column("query", Text, nullable=False),
    Column("headers", Text, nullable=False),  # JSON list of [name, value]
    Column("body", LargeBinary),  # dropped once the job has finished
    Column("tries", Integer, nullable=False, default=0),
    Column("progress", Float, nullable=False, default=0.0),  # share of its instances answered
    Column("lease_until", Float),
    Column("created", Float, nullable=False),
    Column("updated", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("status_code", Integer),
    Column("media_type", Text),
    Column("result", LargeBinary),
    Column("client", String(32)),  # who submitted it, for the per-client bound: a digest, never the address
)


@dataclass(frozen=True)
class Job:
    id: str
    owner: str
    state: str
    request_id: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes | None
    tries: int
    progress: float
    created: float
    updated: float
    status_code: int | None
    media_type: str | None
    result: bytes | None

    @classmethod
    def of(cls, row: Any) -> Job:
        return cls(row.id, row.owner, row.state, row.request_id, row.path, row.query,
                   [(n, v) for n, v in json.loads(row.headers)], None if row.body is None else bytes(row.body),
                   row.tries, row.progress, row.created, row.updated, row.status_code, row.media_type,
                   None if row.result is None else bytes(row.result))


def new_job_id() -> str:
    return secrets.token_hex(16)


class QueueFull(Exception):
    """As many jobs (or bytes of them) are waiting or running as the service keeps."""


class ClientQueueFull(Exception):
    """As many of this client's jobs are waiting or running as one client may have."""


def client_digest(identity: str) -> str:
    """What the jobs table keeps of a client's identity (``Access.identity``)."""
    return key_digest(identity)[:32]


class JobStore(TableStore):
    """The jobs table in ``url``'s database; each operation one short transaction."""

    metadata = jobs_table.metadata


    def submit(self, job_id: str, owner: str, request_id: str, path: str, query: str,
               headers: list[tuple[str, str]], body: bytes, *, client: str) -> None:
        """Queue a job; ``client`` (``Access.identity``) is who it counts against: at most
        ``JOB_MAX_PENDING_PER_CLIENT`` waiting or running per client (:class:`ClientQueueFull`),
        ``JOB_MAX_PENDING`` in all (:class:`QueueFull`)."""
        self.create()
        now = time.time()
        digest = client_digest(client)
        with self.engine.begin() as conn:
            pending, stored, mine = conn.execute(
                select(func.count(), func.coalesce(func.sum(func.length(jobs_table.c.body)), 0),
                       func.coalesce(func.sum(case((jobs_table.c.client == digest, 1), else_=0)), 0))
                .where(jobs_table.c.state.in_(("queued", "running")), jobs_table.c.expires_at >= now)).one()
            if mine >= JOB_MAX_PENDING_PER_CLIENT:
                raise ClientQueueFull(f"{mine} of this client's jobs waiting")
            if pending >= JOB_MAX_PENDING or stored + len(body) > JOB_MAX_PENDING_BYTES:
                raise QueueFull(f"{pending} jobs, {stored} bytes waiting")
            conn.execute(insert(jobs_table).values(
                id=job_id, owner=owner, state="queued", request_id=request_id, path=path, query=query,
                headers=json.dumps(headers), body=body, tries=0, progress=0.0, created=now, updated=now,
                expires_at=now + self.ttl_s, client=digest))

    def get(self, job_id: str) -> Job | None:
        self.create()
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs_table).where(jobs_table.c.id == job_id,
                                                        jobs_table.c.expires_at >= time.time())).first()
        return None if row is None else Job.of(row)

    def claim(self, job_id: str, max_tries: int) -> Job | None:
        """Take the job to run it: a queued job, or a running one whose worker's lease ran out.
        None when it is not there to take (finished, cancelled, or running elsewhere). A job taken
        over ``max_tries`` times is failed instead (its runs killed every worker that took it)."""
        self.create()
        now = time.time()
        takeable = (jobs_table.c.id == job_id) & or_(
            jobs_table.c.state == "queued",
            (jobs_table.c.state == "running") & (jobs_table.c.lease_until < now))
        with self.engine.begin() as conn:
            row = conn.execute(select(jobs_table.c.tries).where(takeable)).first()
            if row is None:
                return None
            if row.tries >= max_tries:
                problem = {"type": "about:blank", "title": "Internal Server Error", "status": 500,
                           "code": "job-abandoned", "detail": f"The job's worker stopped {row.tries} times "
                           "while running it; it is not tried again."}
                conn.execute(update(jobs_table).where(takeable).values(
                    state="failed", updated=now, lease_until=None, body=None, status_code=500,
                    media_type="application/problem+json", result=json.dumps(problem).encode()))
                return None
            taken = conn.execute(update(jobs_table).where(takeable, jobs_table.c.tries == row.tries).values(
                state="running", tries=row.tries + 1, progress=0.0, lease_until=now + self.lease_s, updated=now))
            if taken.rowcount != 1:
                return None
            found = conn.execute(select(jobs_table).where(jobs_table.c.id == job_id)).first()
        return Job.of(found)

    def renew(self, job_id: str, progress: float | None = None) -> bool:
        """Extend a running job's lease (and record its progress); False when it is no longer
        running (cancelled)."""
        values: dict[str, Any] = {"lease_until": time.time() + self.lease_s}
        if progress is not None:
            values.update(progress=progress, updated=time.time())
        with self.engine.begin() as conn:
            return conn.execute(update(jobs_table).where(
                jobs_table.c.id == job_id, jobs_table.c.state == "running").values(**values)).rowcount == 1

    def finish(self, job_id: str, state: str, status_code: int, media_type: str, result: bytes) -> bool:
        """Store a running job's answer; False when it was cancelled meanwhile (the answer is dropped)."""
        with self.engine.begin() as conn:
            return conn.execute(update(jobs_table).where(
                jobs_table.c.id == job_id, jobs_table.c.state == "running").values(
                state=state, status_code=status_code, media_type=media_type, result=result, body=None,
                progress=1.0 if state == "done" else jobs_table.c.progress, lease_until=None,
                updated=time.time())).rowcount == 1

    def release(self, job_id: str) -> None:
        """Give a running job back to the queue (its run was refused for now: try it again later)."""
        with self.engine.begin() as conn:
            conn.execute(update(jobs_table).where(jobs_table.c.id == job_id, jobs_table.c.state == "running")
                         .values(state="queued", lease_until=None, updated=time.time()))

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; False when it had already finished."""
        with self.engine.begin() as conn:
            return conn.execute(update(jobs_table).where(
                jobs_table.c.id == job_id, jobs_table.c.state.in_(("queued", "running"))).values(
                state="cancelled", body=None, lease_until=None, updated=time.time())).rowcount == 1

    def stranded(self, lost_after_s: float) -> list[str]:
        """Jobs to queue again: running with their lease run out (the worker died), or queued for
        longer than ``lost_after_s`` (the queue lost the message)."""
        self.create()
        now = time.time()
        with self.engine.connect() as conn:
            return list(conn.execute(select(jobs_table.c.id).where(or_(
                (jobs_table.c.state == "running") & (jobs_table.c.lease_until < now),
                (jobs_table.c.state == "queued") & (jobs_table.c.updated < now - lost_after_s)))).scalars())

    def touch(self, job_id: str) -> None:
        """Mark a queued job as queued again now (it is not picked up again until ``lost_after_s``)."""
        with self.engine.begin() as conn:
            conn.execute(update(jobs_table).where(jobs_table.c.id == job_id, jobs_table.c.state == "queued")
                         .values(updated=time.time()))

    def purge(self) -> int:
        """Delete the expired jobs; how many."""
        self.create()
        with self.engine.begin() as conn:
            return conn.execute(delete(jobs_table).where(jobs_table.c.expires_at < time.time())).rowcount
