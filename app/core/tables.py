"""A store of a few small tables in the prediction log's database (SQLite or PostgreSQL): the
idempotency keys and the jobs. Each operation is one short transaction; the tables are created on
first use, by whichever worker gets there first, and a column a table gained since an existing
table was made is added to it then (such columns are nullable)."""

from __future__ import annotations

from sqlalchemy import MetaData, create_engine, inspect, text
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
        for table in self.metadata.sorted_tables:
            self._add_missing_columns(table)
        self._created = True

    def _add_missing_columns(self, table) -> None:
        preparer = self.engine.dialect.identifier_preparer
        present = {c["name"] for c in inspect(self.engine).get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable:  # an existing table's rows would have no value for it
                raise RuntimeError(f"{table.name}.{column.name} is missing and not nullable: add it by hand")
            kind = column.type.compile(dialect=self.engine.dialect)
            try:
                with self.engine.begin() as conn:
                    conn.execute(text(f"ALTER TABLE {preparer.quote(table.name)} "
                                      f"ADD COLUMN {preparer.quote(column.name)} {kind}"))
            except SQLAlchemyError:  # another process added it at the same moment
                if column.name not in {c["name"] for c in inspect(self.engine).get_columns(table.name)}:
                    raise

    def dispose(self) -> None:
        self.engine.dispose()
