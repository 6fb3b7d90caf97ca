# Serving image: slim Python 3.11, serving dependencies only (no TensorFlow), non-root, $PORT.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=8000 \
    WEB_CONCURRENCY=2 \
    MALLOC_ARENA_MAX=2 \
    DATABASE_URL=sqlite:////app/var/predictions.db

WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt

RUN useradd --create-home --uid 10001 app
COPY --chown=app:app app/ app/
COPY --chown=app:app models/ models/
COPY --chown=app:app gunicorn.conf.py ./
RUN mkdir -p /app/var && chown app:app /app/var
USER app

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/health/live', timeout=4)"

# The Procfile's command; gunicorn.conf.py binds 0.0.0.0:$PORT. The schema is created on start-up.
CMD ["gunicorn", "-c", "gunicorn.conf.py", "app.main:app"]
