"""Create or migrate the prediction-log schema: ``python -m app.monitoring.migrate``.

The Procfile ``release`` step runs this once per deploy (it exits non-zero if the database is
unreachable, failing the release); gunicorn's ``on_starting`` hook calls :func:`migrate` and only
logs a failure, so a database outage at boot does not stop predictions from being served (each
worker's log writer creates the schema once the database answers).
"""

from __future__ import annotations

import logging
import sys

from sqlalchemy.engine import make_url

from app.core.config import get_settings
from app.monitoring.store import create_schema, make_engine

log = logging.getLogger("app.monitoring.migrate")


def run_migrations(database_url: str | None = None, *, strict: bool = False) -> bool:
    """Create the missing tables and indexes (idempotent, safe to race). Returns success; raises
    on failure only when ``strict``."""
    url = database_url or get_settings().database_url
    engine = make_engine(url)
    try:
        create_schema(engine)
        log.info("prediction-log schema ready", extra={"database": make_url(url).render_as_string(hide_password=True)})
        return True
    except Exception as exc:
        if strict:
            raise
        log.error("prediction-log schema not created", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
        return False
    finally:
        engine.dispose()


def migrate(database_url: str | None = None) -> None:
    """Create the schema or raise (what gunicorn's ``on_starting`` hook and the release step call)."""
    run_migrations(database_url, strict=True)


def main() -> int:
    logging.basicConfig(level=logging.INFO)
    try:
        run_migrations(strict=True)
    except Exception as exc:
        print(f"migration failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print("prediction-log schema ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
