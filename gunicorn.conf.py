"""gunicorn settings for Heroku, Docker and the contract tests (all run the Procfile command).

Uvicorn workers (``uvicorn-worker``), the app's libraries imported once in the master and shared
copy-on-write (preload), one LiteRT interpreter set per worker (each worker loads its own models in
the lifespan, after the fork), a request timeout under Heroku's 30 s router limit,
graceful shutdown on SIGTERM (Heroku gives 30 s before SIGKILL: every request ends within
``REQUEST_TIMEOUT_S``, 25 s, of its start, and workers get 28 s to finish theirs). Workers are not
recycled by default (``GUNICORN_MAX_REQUESTS=0``): a 10-minute soak (``bench/load.py --soak``) keeps
memory flat without it, and a recycle with one worker leaves no one accepting while the new worker
loads its models and resets the keep-alive connections of busy clients. With recycling asked for
and one worker, it is refused with a warning; with two or more it is staggered by a jitter.
Prometheus multiprocess mode: the master points PROMETHEUS_MULTIPROC_DIR at a fresh directory
before forking and marks workers dead as they exit, so /metrics sums every worker.
"""

import ctypes
import gc
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "app.core.worker.Worker"
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "25"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "28"))
keepalive = 5
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "0"))
if max_requests and workers < 2:
    print('{"level": "WARNING", "logger": "gunicorn.conf", "message": "GUNICORN_MAX_REQUESTS ignored: '
          'recycling the only worker would leave no one to answer while its replacement loads"}',
          file=sys.stderr)
    max_requests = 0
# Staggered: two workers never recycle at the same moment (default: a quarter of max_requests).
max_requests_jitter = int(os.environ.get("GUNICORN_MAX_REQUESTS_JITTER", str(max_requests // 4)))
# Import the app (its libraries: numpy, scipy, scikit-learn, PyAV...) once in the master and fork:
# the workers share those pages copy-on-write. Models load per worker in the lifespan, after the fork.
preload_app = os.environ.get("GUNICORN_PRELOAD", "true").lower() == "true"
# Which peers may set X-Forwarded-For/-Proto: only loopback by default. On Heroku the router is the
# only thing that can reach a dyno, so app.json sets FORWARDED_ALLOW_IPS="*" there.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
accesslog = None  # the app writes one structured JSON line per request itself
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
# gunicorn's own lines (boot, worker exits, timeouts) as JSON too, so stdout is one JSON object per line.
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "app.core.logging.JsonFormatter"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "json",
                             "stream": "ext://sys.stdout"}},
    "root": {"level": loglevel.upper(), "handlers": ["console"]},
    "loggers": {
        "gunicorn.error": {"level": loglevel.upper(), "handlers": ["console"], "propagate": False},
        "gunicorn.access": {"level": loglevel.upper(), "handlers": [], "propagate": False},
    },
}


def _tune_malloc() -> None:
    """glibc malloc, set in the master before the workers fork: allocations of 1 MiB and more are
    mapped and unmapped (a freed image or waveform goes back to the OS instead of staying in the
    heap: 20 concurrent 2048 x 2048 segmentations left 767 MiB held before), and two arenas."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_mmap_threshold, m_arena_max = -3, -8
    libc.mallopt(m_mmap_threshold, int(os.environ.get("MALLOC_MMAP_THRESHOLD_", 1024 * 1024)))
    libc.mallopt(m_arena_max, int(os.environ.get("MALLOC_ARENA_MAX", 2)))


_tune_malloc()


def _raise_file_limit() -> None:
    """Open files up to the hard limit (often 1 024 soft): each connection is a file, and the
    workers cap their connections below what is left (app.core.worker)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(target, 65536), hard))
        except (ValueError, OSError):
            pass


_raise_file_limit()

# Request ids carry a tag only this service can make; every worker of this master shares the key
# (set REQUEST_ID_SECRET to the same value on every dyno so each recognises the others' ids).
os.environ.setdefault("REQUEST_ID_SECRET", secrets.token_hex(32))

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


# The dyno's places for big jobs (app.core.places): lock files every worker of this server shares.
if not os.environ.get("DYNO_PLACES_DIR"):
    os.environ["DYNO_PLACES_DIR"] = tempfile.mkdtemp(prefix="dyno-places-")


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


def pre_fork(server, worker):
    # Objects the master made (the preloaded app) move to a permanent generation: the workers'
    # garbage collector never walks them, so their pages stay shared instead of being copied.
    gc.freeze()


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


# JOBS=embedded: one job worker (app.jobs.worker) beside the web workers, started once they are
# up, started again if it dies (a job it was running is taken over once its lease runs out), and
# stopped with the server. JOBS=worker leaves jobs to the Procfile's `worker` processes; JOBS=off
# (the default) runs none.
_job_worker: list[subprocess.Popen] = []
_stopping = threading.Event()


def _start_job_worker(server) -> None:
    # At a lower priority than the web workers: a long job on the same machine yields the CPU to them.
    _job_worker[:] = [subprocess.Popen([sys.executable, "-m", "app.jobs.worker"], preexec_fn=lambda: os.nice(10))]
    server.log.info("job worker started (JOBS=embedded), pid %s", _job_worker[0].pid)


def _keep_job_worker(server) -> None:
    while True:
        _job_worker[0].wait()  # returns when it exits (or when the arbiter has reaped it first)
        if _stopping.wait(1.0):  # a second between restarts: no tight loop if it cannot start
            return
        server.log.warning("job worker exited; starting another")
        _start_job_worker(server)


def when_ready(server):
    if os.environ.get("JOBS", "off").lower() == "embedded":
        _start_job_worker(server)
        threading.Thread(target=_keep_job_worker, args=(server,), name="job-worker-keeper", daemon=True).start()


def on_exit(server):
    _stopping.set()
    for process in _job_worker:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # huey: finish the job in progress, then stop
            try:
                process.wait(graceful_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
