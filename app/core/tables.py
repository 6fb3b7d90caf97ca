"""A store of a few small tables in the prediction log's database (SQLite or PostgreSQL): the
idempotency keys and the jobs. Each operation is one short transaction; the tables are created on
first use, by whichever worker gets there first."""

from __future__ import annotations

from sqlalchemy import MetaData, create_engine
from sqlalchemy.exc import SQLAlchemyError

from app.core.limits import DB_CALL_TIMEOUT_S


class TableStore:
    """``metadata``'s tables in ``url``'s database; ``ttl_s`` and ``lease_s`` are the subclass's."""

    metadata: MetaData

    def __init__(self, url: str, ttl_s: float, lease_s: float) -> None:
        connect_args = {"timeout": DB_CALL_TIMEOUT_S} if url.startswith("sqlite") else {}
        self.engine = create_engine(url, pool_pre_ping=True, pool_timeout=2, connect_args=connect_args)
        self.ttl_s, self.lease_s = ttl_s, lease_s
        self._created = False

    def create(self) -> None:
        if self._created:
            return
        try:
            self.metadata.create_all(self.engine, checkfirst=True)
        except SQLAlchemyError:  # another process created them at the same moment
            self.metadata.create_all(self.engine, checkfirst=True)
        self._created = True

    def dispose(self) -> None:
        self.engine.dispose()
