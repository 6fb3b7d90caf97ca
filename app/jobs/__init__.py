"""Asynchronous jobs: a prediction sent with ``Prefer: respond-async`` runs in a job worker.

:mod:`app.jobs.service` takes submissions and answers ``/v1/jobs/{id}``; :mod:`app.jobs.store` is
the jobs table; :mod:`app.jobs.queue` the queue (huey over SQLite or Redis); :mod:`app.jobs.worker`
the worker process.
"""
