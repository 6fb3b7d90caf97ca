"""The prediction log: SQLAlchemy Core tables, the engine, and a buffered background writer.

SQLite by default (a file under ``var/``, WAL journal so readers never block the writer), PostgreSQL
when ``DATABASE_URL`` says so. Requests never touch the database on the prediction path:
:meth:`PredictionLog.enqueue` appends to a bounded in-memory buffer and returns; a writer thread
inserts the buffered rows in batches every ``LOG_FLUSH_INTERVAL_S``. When the database is down the
writer logs the outage once, counts each failed attempt, keeps the rows and retries with backoff.
The buffer is bounded in rows (``LOG_BUFFER_SIZE``) and in bytes: consented inputs beyond
``LOG_BUFFER_INPUT_BYTES`` are not kept (their summary rows are; counted as not stored,
``buffer-full``), and rows beyond either bound are dropped and counted. ``/health/ready`` reports the
log as degraded while the database is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError

from app.core.limits import (
    DB_POOL_TIMEOUT_S,
    DB_STATEMENT_TIMEOUT_S,
    LOG_BUFFER_INPUT_BYTES,
    LOG_BUFFER_ROW_BYTES,
    STORED_INPUT_MAX_BYTES,
)
from app.monitoring.drift import clean_float
from app.monitoring.metrics import (
    INFERENCE_LATENCY,
    INPUTS_NOT_STORED,
    INPUTS_PURGED,
    INPUTS_STORED,
    LOG_BUFFERED,
    LOG_ROWS_DROPPED,
    LOG_ROWS_PURGED,
    LOG_ROWS_WRITTEN,
    LOG_WRITE_FAILURES,
    PREDICTIONS,
    labelled,
)

log = logging.getLogger("app.monitoring.store")

metadata = MetaData()
_ID = BigInteger().with_variant(Integer, "sqlite")  # SQLite only auto-increments INTEGER PRIMARY KEY
_JSON = JSON().with_variant(JSONB(), "postgresql")



def _prediction_columns() -> list[Column]:
    """What a version predicted for one instance: the columns the log and the shadow log share."""
    return [
        Column("id", _ID, primary_key=True, autoincrement=True),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("request_id", String(128), nullable=False),
        Column("instance", Integer, nullable=False),  # index of the instance within its request
        Column("model", String(64), nullable=False),
        Column("version", String(64), nullable=False),
        Column("latency_ms", Float, nullable=False),
        Column("prediction", String(256), nullable=False),
        Column("confidence", Float, nullable=True),
    ]


predictions = Table(
    "predictions", metadata,
    *_prediction_columns(),
    Column("features", _JSON, nullable=False),
    Column("input", LargeBinary, nullable=True),  # raw input, only with the request's consent
    Column("client_version", String(48), nullable=True),  # X-Client-Version (bounded), null without it
    Index("ix_predictions_model_id", "model", "id"),
    Index("ix_predictions_model_created_at", "model", "created_at"),
    Index("ix_predictions_request", "request_id", "instance"),
)

feedback = Table(
    "feedback", metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("request_id", String(128), nullable=False),
    Column("instance", Integer, nullable=False),
    Column("label", String(256), nullable=False),
    UniqueConstraint("request_id", "instance", name="uq_feedback_request_instance"),
)

# What a shadow version predicted for a request the primary version answered (never shown to the
# client). A table of its own, so every report on the predictions table stays about the primary.
shadow_predictions = Table(
    "shadow_predictions", metadata,
    *_prediction_columns(),
    Index("ix_shadow_model_id", "model", "id"),
    Index("ix_shadow_model_created_at", "model", "created_at"),
    Index("ix_shadow_request", "request_id", "instance"),
)

# Request ids whose data a client erased: rows of theirs still in some worker's buffer (or a shadow
# prediction still queued) are dropped by the writer instead of written after the erasure.
erasures = Table(
    "erasures", metadata,
    Column("request_id", String(128), primary_key=True),
    Column("erased_at", DateTime(timezone=True), nullable=False),
    Index("ix_erasures_erased_at", "erased_at"),
)
ERASURE_MEMORY_S = 24 * 3600  # erasure records older than this are forgotten (rows arrive in seconds)

_SCHEMA_LOCK_KEY = 742_519_001  # pg_advisory_xact_lock key: one schema creator at a time


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def make_engine(database_url: str, *, sqlite_busy_timeout_ms: int = 5000,
                connect_timeout_s: int = 3) -> Engine:
    """An engine for ``database_url``: SQLite gets WAL + busy_timeout on every connection, PostgreSQL
    a short connect timeout (so an outage is noticed quickly) and pre-ping (so a restarted server's
    dead connections are replaced)."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": sqlite_busy_timeout_ms / 1000},
                               json_serializer=json_text)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout={int(sqlite_busy_timeout_ms)}")
            # Converting a new file to WAL takes an exclusive lock and SQLite does not wait on the
            # busy handler for it: connections that open a fresh file at once (workers, threads)
            # get "database is locked". Retry within the busy timeout; on a file already in WAL
            # mode the pragma is a read and never waits.
            deadline = time.monotonic() + sqlite_busy_timeout_ms / 1000
            while True:
                try:
                    cursor.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql":
        # The server stops a statement (and a lock wait) that runs past the timeout, so a slow query
        # frees its connection; a caller never waits long for a pooled connection either.
        connect_args["connect_timeout"] = connect_timeout_s
        timeout_ms = int(DB_STATEMENT_TIMEOUT_S * 1000)
        given = url.query.get("options")  # e.g. a search_path in DATABASE_URL: kept
        connect_args["options"] = " ".join(
            [*([given] if isinstance(given, str) else list(given or ())),
             f"-c statement_timeout={timeout_ms}", f"-c lock_timeout={timeout_ms}"])
    return create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=6, pool_recycle=1800,
                         pool_timeout=DB_POOL_TIMEOUT_S, connect_args=connect_args, json_serializer=json_text)


def create_schema(engine: Engine) -> None:
    """Create the tables and indexes that are missing. Idempotent, and safe when several processes
    start at once: PostgreSQL serialises creators on an advisory lock; elsewhere a creator that
    loses the race ("already exists") checks again."""
    for attempt in range(3):
        try:
            with engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
                metadata.create_all(conn, checkfirst=True)
                _add_missing_columns(conn)
            return
        except SQLAlchemyError as exc:
            if attempt == 2 or "already exists" not in str(exc).lower():
                raise
            time.sleep(0.05 * (attempt + 1))


def _add_missing_columns(conn: Any) -> None:
    """Columns a table gained after it was first created (nullable, so existing rows keep NULL)."""
    for table in metadata.sorted_tables:
        present = {c["name"] for c in inspect(conn).get_columns(table.name)}
        for column in table.columns:
            if column.name not in present:
                kind = column.type.compile(dialect=conn.dialect)
                conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}'))


def schema_ready(engine: Engine) -> bool:
    names = set(inspect(engine).get_table_names())
    return set(metadata.tables) <= names


def erase_request(engine: Engine, request_id: str, *, remember: bool = True) -> int:
    """Delete every row of ``request_id`` (predictions with their stored inputs, shadow predictions,
    feedback) and remember the erasure first, so rows still buffered are not written later. Returns
    the number of prediction rows deleted (0: nothing was logged under that id).

    A writer transaction that checked the erasures just before this one committed may still insert
    a row after the deletes: callers run this again a moment later (``remember=False``), and the
    hourly purge deletes the rows of every remembered erasure (:func:`purge_inputs`)."""
    if remember:
        with engine.begin() as conn:
            known = conn.execute(select(erasures.c.request_id).where(erasures.c.request_id == request_id)).first()
            if known is None:
                conn.execute(erasures.insert().values(request_id=request_id, erased_at=utcnow()))
    with engine.begin() as conn:
        deleted = conn.execute(predictions.delete().where(predictions.c.request_id == request_id)).rowcount
        conn.execute(shadow_predictions.delete().where(shadow_predictions.c.request_id == request_id))
        conn.execute(feedback.delete().where(feedback.c.request_id == request_id))
    return int(deleted or 0)


def purge_rows(engine: Engine, retention_days: float, *, batch: int = 5000) -> int:
    """Delete prediction-log rows older than ``retention_days`` (``LOG_RETENTION_DAYS``): summary
    rows, shadow predictions and feedback, oldest first, ``batch`` rows per transaction so neither
    the table nor the writers are held for long. Returns how many prediction rows were deleted."""
    cutoff = utcnow() - timedelta(days=retention_days)
    purged = 0
    for table in (predictions, shadow_predictions, feedback):
        while True:
            ids = (select(table.c.id).where(table.c.created_at < cutoff).order_by(table.c.id)
                   .limit(batch).scalar_subquery())
            with engine.begin() as conn:
                done = conn.execute(table.delete().where(table.c.id.in_(ids))).rowcount or 0
            if table is predictions:
                purged += done
            if done < batch:
                break
    if purged:
        LOG_ROWS_PURGED.inc(purged)
    return purged


def purge_inputs(engine: Engine, retention_days: float, *, batch: int = 1000) -> int:
    """Delete stored inputs older than ``retention_days`` (the summary rows stay), in batches so no
    transaction holds many rows; also forget old erasure records. Returns how many were deleted."""
    cutoff = utcnow() - timedelta(days=retention_days)
    purged = 0
    while True:
        ids = select(predictions.c.id).where(predictions.c.input.is_not(None),
                                             predictions.c.created_at < cutoff).limit(batch)
        with engine.begin() as conn:
            done = conn.execute(predictions.update().where(predictions.c.id.in_(ids.scalar_subquery()))
                                .values(input=None)).rowcount or 0
        purged += done
        if done < batch:
            break
    with engine.begin() as conn:
        erased = select(erasures.c.request_id).scalar_subquery()
        for table in (predictions, shadow_predictions, feedback):  # stragglers of a raced erasure
            conn.execute(table.delete().where(table.c.request_id.in_(erased)))
        conn.execute(erasures.delete().where(
            erasures.c.erased_at < utcnow() - timedelta(seconds=ERASURE_MEMORY_S)))
    if purged:
        INPUTS_PURGED.inc(purged)
    return purged


class Enqueued(int):
    """How many rows were buffered; ``inputs``: how many of their raw inputs will be kept; ``seq``:
    the sequence number of the last of them (``PredictionLog.written`` waits for it)."""

    inputs: int = 0
    seq: int = 0


def _row_bytes(entry: Mapping[str, Any]) -> int:
    """A summary row's memory while buffered, estimated: its fixed fields and its features."""
    return 512 + 96 * len(entry.get("features") or ())


def _input_bytes(entry: Mapping[str, Any]) -> int:
    raw = entry.get("input")
    return len(raw) if raw is not None else 0


class PredictionLog:
    """Bounded buffer + background writer for prediction-log rows (one per instance)."""

    def __init__(self, engine: Engine, *, buffer_size: int = 10_000, flush_interval_s: float = 0.5,
                 store_inputs: bool = False, batch_size: int = 1000, max_backoff_s: float = 10.0,
                 durable: bool = False) -> None:
        self.engine = engine
        self.buffer_size = buffer_size
        self.flush_interval_s = flush_interval_s
        self.store_inputs = store_inputs
        self.batch_size = batch_size
        self.max_backoff_s = max_backoff_s
        self._queue: deque[tuple[int, Table, dict[str, Any]]] = deque()
        self._pending: list[tuple[int, Table, dict[str, Any]]] = []  # taken from the queue, not yet written
        self._size = 0  # queue + pending: what the bound applies to
        self._row_bytes = 0  # their estimated memory
        self._input_bytes = 0  # the raw inputs they keep
        self.max_row_bytes = LOG_BUFFER_ROW_BYTES
        self.max_input_bytes = LOG_BUFFER_INPUT_BYTES
        self._seq = 0  # sequence number of the last enqueued row
        self._written_seq = 0  # every row up to this one is written
        self._lock = threading.Lock()
        self._written = threading.Condition(self._lock)
        self.durable = durable  # rows are written as soon as they arrive (their requests wait)
        self._seq_waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._schema_ok = False
        self._outage_since: float | None = None
        self._failures_in_outage = 0
        self._poisoned = 0
        self.rows_written = 0
        self.rows_dropped = 0
        self.write_failures = 0

    # ---- request path -------------------------------------------------------------------------
    def enqueue(self, request_id: str, model: str, version: str, rows: Sequence[Mapping[str, Any]],
                latency_ms: float, raw_inputs: Sequence[bytes] | None = None,
                client_version: str | None = None, first_instance: int = 0) -> Enqueued:
        """Buffer one row per instance and return how many were accepted (and, as ``.inputs``, how
        many raw inputs will be kept); never blocks on I/O and never raises. Rows beyond the buffer
        bounds are dropped and counted. ``raw_inputs`` (given only for requests whose client
        consented) are kept up to ``STORED_INPUT_MAX_BYTES`` each while the buffer has room for
        them, unless the log was built with ``store_inputs=False`` (``STORE_INPUTS=never``).
        ``first_instance``: the index of the first row's instance (a part of a batch job)."""
        try:
            created_at = utcnow()
            latency = float(latency_ms)
            labelled(INFERENCE_LATENCY, model).observe(latency / 1000.0)
            entries = []
            for index, row in enumerate(rows):
                prediction = str(row.get("prediction", ""))[:256]
                labelled(PREDICTIONS, model, version, prediction[:64]).inc()
                entries.append({
                    "created_at": created_at, "request_id": str(request_id)[:128],
                    "instance": first_instance + index, "model": model, "version": version, "latency_ms": latency,
                    "prediction": prediction, "confidence": row.get("confidence"),
                    "features": row.get("features") or {},
                    "input": self._kept_input(model, raw_inputs, index),
                    "client_version": client_version})
            return self._buffer(predictions, entries)
        except Exception:  # a logging bug must never fail a prediction
            log.exception("could not buffer prediction-log rows")
            return Enqueued(0)

    def enqueue_shadow(self, request_id: str, model: str, version: str,
                       rows: Sequence[Mapping[str, Any]], latency_ms: float, first_instance: int = 0) -> int:
        """Buffer what a shadow version predicted for a request (one row per instance)."""
        try:
            created_at = utcnow()
            return self._buffer(shadow_predictions, [
                {"created_at": created_at, "request_id": str(request_id)[:128], "instance": first_instance + index,
                 "model": model, "version": version, "latency_ms": float(latency_ms),
                 "prediction": str(row.get("prediction", ""))[:256], "confidence": row.get("confidence")}
                for index, row in enumerate(rows)])
        except Exception:
            log.exception("could not buffer shadow-prediction rows")
            return 0

    def _kept_input(self, model: str, raw_inputs: Sequence[bytes] | None, index: int) -> bytes | None:
        if not self.store_inputs or raw_inputs is None or index >= len(raw_inputs) or raw_inputs[index] is None:
            return None
        raw = raw_inputs[index]
        if len(raw) > STORED_INPUT_MAX_BYTES:
            INPUTS_NOT_STORED.labels(model, "too-large").inc()
            return None
        return bytes(raw)

    def _buffer(self, table: Table, entries: list[dict[str, Any]]) -> Enqueued:
        accepted = dropped = inputs = 0
        not_kept: list[str] = []
        with self._lock:
            for entry in entries:
                row_bytes = _row_bytes(entry)
                if self._size >= self.buffer_size or self._row_bytes + row_bytes > self.max_row_bytes:
                    dropped += 1
                    continue
                raw = entry.get("input")
                if raw is not None:
                    if self._input_bytes + len(raw) > self.max_input_bytes:
                        entry["input"] = None  # the summary row is kept; the input is not
                        not_kept.append(entry["model"])
                    else:
                        self._input_bytes += len(raw)
                        inputs += 1
                self._seq += 1
                self._queue.append((self._seq, table, entry))
                self._size += 1
                self._row_bytes += row_bytes
                accepted += 1
        if dropped:
            self.rows_dropped += dropped
            LOG_ROWS_DROPPED.inc(dropped)
        for model in not_kept:
            INPUTS_NOT_STORED.labels(model, "buffer-full").inc()
        if inputs:
            INPUTS_STORED.labels(entries[0]["model"]).inc(inputs)
        # LOG_BUFFERED is set by the writer, after each batch and each failed attempt: a gauge
        # read every scrape, not a write to the metrics file on every request.
        result = Enqueued(accepted)
        result.inputs, result.seq = inputs, self._seq
        if self.durable and accepted:
            self._wake.set()
        return result

    async def written(self, seq: int, timeout_s: float) -> bool:
        """Wait (asleep, on the event loop) until every row up to ``seq`` is written; False when
        that has not happened within ``timeout_s`` (the database slow or down)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self._written_seq >= seq:
                return True
            if len(self._seq_waiters) > 1000:  # those that gave up (the database down) go
                self._seq_waiters = [w for w in self._seq_waiters if not w[2].done()]
            self._seq_waiters.append((seq, loop, future))
        try:
            await asyncio.wait_for(future, timeout_s)
            return True
        except TimeoutError:
            return False

    def _wake_waiters(self) -> None:
        """Called with the lock held, once ``_written_seq`` has moved."""
        if not self._seq_waiters:
            return
        ready = [w for w in self._seq_waiters if w[0] <= self._written_seq and not w[2].done()]
        self._seq_waiters = [w for w in self._seq_waiters if w[0] > self._written_seq]
        for _, loop, future in ready:
            with contextlib.suppress(RuntimeError):  # its loop has closed: nobody waits any more
                loop.call_soon_threadsafe(_resolve, future)

    def contains(self, request_id: str) -> bool:
        """Whether rows of ``request_id`` are still waiting in this process's buffer."""
        with self._lock:
            return any(r["request_id"] == request_id for _, _, r in self._pending) or \
                any(r["request_id"] == request_id for _, _, r in self._queue)

    @property
    def buffered(self) -> int:
        return self._size

    @property
    def outage(self) -> bool:
        """The database has refused the last write: rows are waiting in memory."""
        return self._outage_since is not None

    def status(self) -> dict[str, Any]:
        return {"database": "unavailable" if self.outage else "ok", "buffered_rows": self._size,
                "buffered_input_bytes": self._input_bytes}

    # ---- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="prediction-log-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the writer after a last flush; returns whether everything buffered was written."""
        if self._thread is None:
            return self.flush(timeout)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self._thread = None
        if self._size:
            log.warning("prediction log stopped with unwritten rows", extra={"rows": self._size})
        return self._size == 0

    def flush(self, timeout: float = 5.0) -> bool:
        """Write everything buffered so far; True once written, False on timeout (e.g. DB down)."""
        with self._lock:
            target = self._seq
        if self._thread is None or not self._thread.is_alive():
            deadline = time.monotonic() + timeout
            while self._written_seq < target and time.monotonic() < deadline:
                if not self._write_once():
                    time.sleep(min(0.1, self.flush_interval_s))
            return self._written_seq >= target
        self._wake.set()
        with self._written:
            return self._written.wait_for(lambda: self._written_seq >= target, timeout)

    # ---- writer thread ------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = self.flush_interval_s
        while True:
            stopping = self._stop.is_set()
            self._wake.wait(backoff if self._outage_since is not None else self.flush_interval_s)
            self._wake.clear()
            stopping = stopping or self._stop.is_set()
            ok = True
            while ok and self._size:  # drain in batches
                ok = self._write_once()
            if ok:
                backoff = self.flush_interval_s
            else:
                backoff = min(backoff * 2, self.max_backoff_s)
            if stopping:
                if not ok:  # one last try, then give up: the process is going away
                    self._write_once()
                return

    def _write_once(self) -> bool:
        """Write the pending batch (taking a new one from the queue if none); True on success."""
        with self._lock:
            if not self._pending:
                while self._queue and len(self._pending) < self.batch_size:
                    self._pending.append(self._queue.popleft())
            batch = list(self._pending)
        if not batch:
            return True
        refused = 0
        try:
            if not self._schema_ok:
                create_schema(self.engine)
                self._schema_ok = True
            with self.engine.begin() as conn:
                erased = _erased(conn, {r["request_id"] for _, _, r in batch})
                for table in (predictions, shadow_predictions):
                    values = [_row_values(r) for _, t, r in batch if t is table and r["request_id"] not in erased]
                    if values:
                        conn.execute(table.insert(), values)
        except (OperationalError, InterfaceError) as exc:  # down, unreachable, or locked
            self._note_failure(exc)
            return False
        except Exception as exc:  # the rows themselves were refused: isolate them, keep the rest
            self._schema_ok = False
            self._note_failure(exc)
            self._poisoned += 1
            if self._poisoned < 3:
                return False
            refused = self._write_one_by_one(batch)
        self._poisoned = 0
        with self._written:
            del self._pending[:len(batch)]
            self._size -= len(batch)
            self._row_bytes -= sum(_row_bytes(r) for _, _, r in batch)
            self._input_bytes -= sum(_input_bytes(r) for _, _, r in batch)
            self._written_seq = batch[-1][0]
            self._written.notify_all()
            self._wake_waiters()
            size = self._size
        self.rows_written += len(batch) - refused
        LOG_ROWS_WRITTEN.inc(len(batch) - refused)
        LOG_BUFFERED.set(size)
        if self._outage_since is not None:
            log.warning("prediction log: database back, buffered rows written",
                        extra={"outage_s": round(time.monotonic() - self._outage_since, 1),
                               "failed_attempts": self._failures_in_outage, "still_buffered": size})
            self._outage_since = None
            self._failures_in_outage = 0
        return True

    def _note_failure(self, exc: Exception) -> None:
        self.write_failures += 1
        LOG_WRITE_FAILURES.inc()
        LOG_BUFFERED.set(self._size)
        self._failures_in_outage += 1
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.error("prediction log: database unavailable, buffering rows",
                      extra={"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                             "buffered": self._size})

    def _write_one_by_one(self, batch: list[tuple[int, Table, dict[str, Any]]]) -> int:
        """After repeated non-connection errors: write what can be written, drop (and count) the rest."""
        bad = 0
        for _, table, row in batch:
            try:
                with self.engine.begin() as conn:
                    if not _erased(conn, {row["request_id"]}):
                        conn.execute(table.insert(), [_row_values(row)])
            except Exception:
                bad += 1
                log.exception("prediction log: dropping a row the database refuses",
                              extra={"request_id": row.get("request_id"), "model": row.get("model")})
        if bad:
            self.rows_dropped += bad
            LOG_ROWS_DROPPED.inc(bad)
        return bad


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(True)


def _erased(conn: Any, request_ids: set[str]) -> set[str]:
    """Which of ``request_ids`` were erased (their late rows must not be written)."""
    found: set[str] = set()
    ids = sorted(request_ids)
    for start in range(0, len(ids), 500):
        found.update(conn.execute(select(erasures.c.request_id)
                                  .where(erasures.c.request_id.in_(ids[start:start + 500]))).scalars())
    return found


def json_text(value: Any) -> str:
    """JSON columns as text (the engines' serializer): orjson, which writes NaN and infinity as
    ``null``; the standard library's encoder for what orjson refuses (an integer past 64 bits)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return json.dumps(_finite(value))


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinite floats as ``None``, at any depth (as orjson writes them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _row_values(row: dict[str, Any]) -> dict[str, Any]:
    """Database-safe values: plain floats, JSON without NaN (PostgreSQL's jsonb refuses it)."""
    values = {**row, "confidence": clean_float(row["confidence"])}
    if "features" in row:
        features = row["features"] if isinstance(row["features"], Mapping) else {}
        numbers = list(features.values())
        # The common row (a task's own features: str names, finite Python floats) is kept as it
        # is; one check for all its values instead of a clean_float call for each.
        if not (set(map(type, numbers)) <= {float} and math.isfinite(sum(numbers))
                and all(type(k) is str for k in features)):
            features = {str(k): clean_float(v) for k, v in features.items()}
        values["features"] = features
    if "input" in row:
        values["input"] = bytes(row["input"]) if row["input"] is not None else None
    return values
