"""gunicorn settings for Heroku, Docker and the contract tests (all run the Procfile command).

Uvicorn workers (``uvicorn-worker``), one LiteRT interpreter set per worker (no preload: each
worker loads its own models after the fork), a request timeout under Heroku's 30 s router limit,
graceful shutdown on SIGTERM (Heroku gives 30 s), and recycled workers (max_requests + jitter).
Prometheus multiprocess mode: the master points PROMETHEUS_MULTIPROC_DIR at a fresh directory
before forking and marks workers dead as they exit, so /metrics sums every worker.
"""

import os
import shutil
import tempfile

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "uvicorn_worker.UvicornWorker"
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "25"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "20"))
keepalive = 5
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "2000"))
max_requests_jitter = int(os.environ.get("GUNICORN_MAX_REQUESTS_JITTER", "200"))
preload_app = False
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "*")  # Heroku's router sets X-Forwarded-*
accesslog = None  # the app writes one structured JSON line per request itself
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()

# One compute thread per worker: workers are the unit of parallelism, and OpenMP/BLAS threads
# spin-waiting on each other on a small dyno made a K-means scan 50x slower.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="prom-multiproc-")
_metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]


def on_starting(server):
    # Stale files from a previous run would be summed into this one's counters.
    shutil.rmtree(_metrics_dir, ignore_errors=True)
    os.makedirs(_metrics_dir, exist_ok=True)
    try:
        from app.monitoring.migrate import migrate

        migrate()
    except Exception as exc:  # the workers retry; a database outage must not stop serving
        server.log.warning("prediction-log schema not created at start-up: %s", exc)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
