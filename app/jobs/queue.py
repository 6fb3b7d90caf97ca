"""The job queue: huey, over Redis when ``REDIS_URL`` is set, else over a SQLite file.

huey is a small, well-kept task queue whose two storages match the two ways the service runs: a
SQLite file for one machine (``make serve``, no other service needed) and Redis for several dynos
(the Heroku Key-Value Store the rate limits already use). A message carries only a job id; the job
itself (its request, state and answer) is a row of :mod:`app.jobs.store`, so a message delivered
twice, or lost with a worker killed while running it, costs nothing: the worker claims the row
before it runs, and a worker queues again the jobs whose worker died (:mod:`app.jobs.worker`).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from huey import Huey, RedisHuey, SqliteHuey

TASK_NAME = "run_job"


def build_queue(settings: Any, run: Callable[[str], None] | None = None) -> tuple[Huey, Callable[[str], Any]]:
    """The queue and its one task (``task(job_id)`` queues a job); ``run`` is what a worker does
    with a job id (producers leave it out)."""
    if settings.redis_url:
        extra: dict[str, Any] = {}
        if settings.redis_url.startswith("rediss://") and not settings.redis_tls_verify:
            extra["ssl_cert_reqs"] = ssl.CERT_NONE
        queue: Huey = RedisHuey("ml-inference-jobs", url=settings.redis_url, results=False, **extra)
    else:
        settings.jobs_queue_path.parent.mkdir(parents=True, exist_ok=True)
        queue = SqliteHuey("ml-inference-jobs", filename=str(settings.jobs_queue_path), results=False)

    def run_job(job_id: str) -> None:
        if run is None:  # pragma: no cover - producers never consume
            raise RuntimeError("this process only queues jobs")
        run(job_id)

    task = queue.task(name=TASK_NAME)(run_job)
    return queue, task
