# Serving image: Python 3.11 slim, serving dependencies only (no TensorFlow), non-root, $PORT.
#
#   docker build -t inference .
#   docker run -p 8000:8000 -e PORT=8000 inference
#
# BASE_IMAGE: any Debian-based image with python3.11 at /usr/local/bin/python (the official one by
# default; `make docker-test` builds from a Debian stand-in where no registry can be reached).
# A CA bundle for pip (a proxy that re-signs TLS) is handed in as a build secret and never stored:
#   docker build --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt .
# PIP_INDEX_URL / PIP_EXTRA_INDEX_URL: another package index (public PyPI by default).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_INDEX_URL=${PIP_INDEX_URL} \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}
RUN python -m venv /opt/venv
COPY requirements.txt /tmp/requirements.txt
# Installed without byte-code; the package test suites and pip itself are removed (never imported
# by the service), then what is left is compiled once, so a read-only container never compiles.
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && /opt/venv/bin/pip install --no-compile -r /tmp/requirements.txt \
    && /opt/venv/bin/pip uninstall -q -y pip setuptools \
    && find /opt/venv -depth -type d \( -name tests -o -name __pycache__ \) -exec rm -rf {} + \
    && python -m compileall -q -j 0 /opt/venv/lib

FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    PORT=8000 \
    WEB_CONCURRENCY=2 \
    MALLOC_ARENA_MAX=2 \
    DATABASE_URL=sqlite:////app/var/predictions.db \
    XDG_RUNTIME_DIR=/tmp
RUN useradd --create-home --uid 10001 app
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY app/ app/
COPY models/ models/
COPY gunicorn.conf.py ./
RUN python -m compileall -q app gunicorn.conf.py \
    && mkdir -p /app/var && chown app:app /app/var
USER app

EXPOSE 8000
# Liveness, not readiness: a worker that is busy is not broken (its /health/ready answers 503).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/health/live', timeout=4)"

# The Procfile's command; gunicorn.conf.py binds $HOST (0.0.0.0):$PORT. SIGTERM (docker stop)
# drains: requests in flight are answered and the container exits 0.
CMD ["gunicorn", "-c", "gunicorn.conf.py", "app.main:app"]
