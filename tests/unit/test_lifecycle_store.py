"""Stored inputs, erasure and shadow rows in the prediction log, on SQLite and PostgreSQL; the
consent header and the STORE_INPUTS setting."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update
from starlette.datastructures import Headers

from app.core.config import Settings
from app.core.errors import ProblemError
from app.core.limits import STORED_INPUT_MAX_BYTES
from app.core.pipeline import consent
from app.monitoring.store import (
    PredictionLog,
    create_schema,
    erase_request,
    erasures,
    feedback,
    make_engine,
    predictions,
    purge_inputs,
    purge_rows,
    shadow_predictions,
    utcnow,
)
from tests import monitoring_db
from tests.monitoring_db import database_url

ROW = {"prediction": "7", "confidence": 0.9, "features": {"raw_mean": 0.1}}


@pytest.fixture(params=monitoring_db.BACKENDS)
def engine(request, tmp_path):
    with database_url(request.param, tmp_path) as url:
        engine = make_engine(url)
        create_schema(engine)
        yield engine
        engine.dispose()


def table_rows(engine, table, request_id=None):
    query = select(table)
    if request_id is not None:
        query = query.where(table.c.request_id == request_id)
    with engine.connect() as conn:
        return list(conn.execute(query).all())


def test_an_input_over_the_cap_is_not_kept_but_its_row_is(engine):
    log = PredictionLog(engine, store_inputs=True)
    big = b"x" * (STORED_INPUT_MAX_BYTES + 1)
    just = b"y" * STORED_INPUT_MAX_BYTES
    log.enqueue("req-cap", "emotion", "1.3.0", [ROW, ROW], latency_ms=1.0, raw_inputs=[big, just])
    assert log.flush(10)
    rows = sorted(table_rows(engine, predictions), key=lambda r: r.instance)
    assert [r.input is None for r in rows] == [True, False] and bytes(rows[1].input) == just


def test_store_inputs_false_keeps_no_input_even_when_given(engine):
    log = PredictionLog(engine, store_inputs=False)
    log.enqueue("req-never", "digits", "1.0.1", [ROW], latency_ms=1.0, raw_inputs=[b"\x89PNG"])
    assert log.flush(10)
    assert table_rows(engine, predictions)[0].input is None


def test_purge_deletes_inputs_past_retention_in_batches_and_keeps_the_rows(engine):
    log = PredictionLog(engine, store_inputs=True)
    for i in range(7):
        log.enqueue(f"old-{i}", "digits", "1.0.1", [ROW], latency_ms=1.0, raw_inputs=[b"old"])
    log.enqueue("new", "digits", "1.0.1", [ROW], latency_ms=1.0, raw_inputs=[b"new"])
    assert log.flush(10)
    with engine.begin() as conn:
        conn.execute(update(predictions).where(predictions.c.request_id.like("old-%"))
                     .values(created_at=utcnow() - timedelta(days=31)))
    assert purge_inputs(engine, 30, batch=3) == 7  # three batches: 3 + 3 + 1
    rows = {r.request_id: r for r in table_rows(engine, predictions)}
    assert len(rows) == 8  # the summary rows stay
    assert all(rows[f"old-{i}"].input is None for i in range(7))
    assert bytes(rows["new"].input) == b"new"
    assert purge_inputs(engine, 30) == 0


def test_erasure_deletes_every_table_and_drops_rows_written_later(engine):
    log = PredictionLog(engine, store_inputs=True)
    log.enqueue("gone", "digits", "1.0.1", [ROW, ROW], latency_ms=1.0, raw_inputs=[b"a", b"b"])
    log.enqueue_shadow("gone", "digits", "1.0.0", [ROW, ROW], latency_ms=1.0)
    log.enqueue("kept", "digits", "1.0.1", [ROW], latency_ms=1.0)
    assert log.flush(10)
    with engine.begin() as conn:
        conn.execute(feedback.insert().values(created_at=utcnow(), request_id="gone", instance=0, label="7"))
    assert erase_request(engine, "gone") == 2
    for table in (predictions, shadow_predictions, feedback):
        assert table_rows(engine, table, "gone") == []
    assert len(table_rows(engine, predictions, "kept")) == 1
    # A late shadow row and a row from another worker's buffer: dropped, not written
    log.enqueue_shadow("gone", "digits", "1.0.0", [ROW], latency_ms=1.0)
    log.enqueue("gone", "digits", "1.0.1", [ROW], latency_ms=1.0, raw_inputs=[b"late"])
    log.enqueue("kept-2", "digits", "1.0.1", [ROW], latency_ms=1.0)
    assert log.flush(10)
    assert table_rows(engine, predictions, "gone") == [] and table_rows(engine, shadow_predictions, "gone") == []
    assert len(table_rows(engine, predictions, "kept-2")) == 1
    assert erase_request(engine, "gone") == 0  # erasing twice is harmless
    assert len(table_rows(engine, erasures)) == 1


def test_log_retention_deletes_old_rows_of_every_table_in_batches(engine):
    log = PredictionLog(engine)
    for i in range(7):
        log.enqueue(f"old-{i}", "digits", "1.0.1", [ROW], latency_ms=1.0)
        log.enqueue_shadow(f"old-{i}", "digits", "1.0.0", [ROW], latency_ms=1.0)
    log.enqueue("new", "digits", "1.0.1", [ROW], latency_ms=1.0)
    log.enqueue_shadow("new", "digits", "1.0.0", [ROW], latency_ms=1.0)
    assert log.flush(10)
    with engine.begin() as conn:
        conn.execute(feedback.insert(), [{"created_at": utcnow(), "request_id": r, "instance": 0, "label": "7"}
                                         for r in ("old-0", "new")])
        old = utcnow() - timedelta(days=91)
        for table in (predictions, shadow_predictions, feedback):
            conn.execute(update(table).where(table.c.request_id.like("old-%")).values(created_at=old))
    assert purge_rows(engine, 90, batch=3) == 7
    for table in (predictions, shadow_predictions, feedback):
        assert [r.request_id for r in table_rows(engine, table)] == ["new"], table.name
    assert purge_rows(engine, 90) == 0


def test_old_erasure_records_are_forgotten(engine):
    erase_request(engine, "long-ago")
    with engine.begin() as conn:
        conn.execute(update(erasures).values(erased_at=utcnow() - timedelta(days=2)))
    erase_request(engine, "recent")
    purge_inputs(engine, 30)
    assert [r.request_id for r in table_rows(engine, erasures)] == ["recent"]


class _Request:
    def __init__(self, headers):
        self.headers = Headers(headers)


@pytest.mark.parametrize(("headers", "expected"), [
    ({}, False), ({"X-Data-Consent": "granted"}, True), ({"X-Data-Consent": " Granted "}, True),
    ({"X-Data-Consent": "denied"}, False),
])
def test_consent_is_granted_only_by_the_word(headers, expected):
    assert consent(_Request({k.lower(): v for k, v in headers.items()})) is expected


@pytest.mark.parametrize("value", ["yes", "true", "1", "", "granted; really"])
def test_any_other_consent_value_is_a_422(value):
    with pytest.raises(ProblemError) as raised:
        consent(_Request({"x-data-consent": value}))
    assert raised.value.status == 422 and raised.value.code == "invalid-consent"


@pytest.mark.parametrize(("env", "expected"), [
    (None, "consented"), ("consented", "consented"), ("never", "never"), ("NEVER", "never"),
    ("false", "never"), ("true", "consented"),
])
def test_store_inputs_setting(monkeypatch, env, expected):
    if env is None:
        monkeypatch.delenv("STORE_INPUTS", raising=False)
    else:
        monkeypatch.setenv("STORE_INPUTS", env)
    assert Settings().store_inputs == expected


def test_store_inputs_refuses_other_words(monkeypatch):
    monkeypatch.setenv("STORE_INPUTS", "always")
    with pytest.raises(ValueError, match="store_inputs"):
        Settings()
