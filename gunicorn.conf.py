"""gunicorn settings for Heroku, Docker and the contract tests (all run the Procfile command).

Uvicorn workers (``uvicorn-worker``), the app's libraries imported once in the master and shared
copy-on-write (preload), one LiteRT interpreter set per worker (each worker loads its own models in
the lifespan, after the fork), a request timeout under Heroku's 30 s router limit,
graceful shutdown on SIGTERM (Heroku gives 30 s), and recycled workers (max_requests + jitter).
Prometheus multiprocess mode: the master points PROMETHEUS_MULTIPROC_DIR at a fresh directory
before forking and marks workers dead as they exit, so /metrics sums every worker.
"""

import os
import shutil
import subprocess
import sys
import tempfile

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "uvicorn_worker.UvicornWorker"
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "25"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "20"))
keepalive = 5
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "2000"))
max_requests_jitter = int(os.environ.get("GUNICORN_MAX_REQUESTS_JITTER", "200"))
# Import the app (its libraries: numpy, scipy, scikit-learn, PyAV...) once in the master and fork:
# the workers share those pages copy-on-write. Models load per worker in the lifespan, after the fork.
preload_app = os.environ.get("GUNICORN_PRELOAD", "true").lower() == "true"
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
# Before the app is imported (preload): stale files from a previous run would be summed into this
# run's counters, and prometheus-client needs the directory to exist.
shutil.rmtree(_metrics_dir, ignore_errors=True)
os.makedirs(_metrics_dir, exist_ok=True)


def on_starting(server):
    # Create the prediction-log schema once before the workers start (they also check it). In a
    # child process, so the master never imports the app's libraries (~100 MiB it would keep).
    try:
        result = subprocess.run([sys.executable, "-m", "app.monitoring.migrate"], timeout=60,
                                capture_output=True, text=True)
        if result.returncode != 0:
            server.log.warning("prediction-log schema not created at start-up: %s",
                               (result.stderr or result.stdout).strip()[-500:])
    except (OSError, subprocess.TimeoutExpired) as exc:  # the workers retry; keep serving
        server.log.warning("prediction-log schema not created at start-up: %s", exc)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
