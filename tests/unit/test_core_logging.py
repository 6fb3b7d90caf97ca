"""The JSON log lines and answers the request path writes quickly are the ones it wrote before.

The access log skips the ``logging`` record machinery when our handler is the only place a record
would go, timestamps are made once per second, and envelopes are written by orjson unless they hold
a ``null``: each is checked here against the slow, obvious way.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from app.core import logging as app_logging
from app.core.logging import JsonFormatter, info_with_fields, json_line
from app.core.jsonbody import strict_json


@pytest.fixture()
def json_stream() -> Iterator[io.StringIO]:
    """The root logger as ``configure_logging`` leaves it, writing to a string."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


FIELDS = {"request_id": "0" * 32, "correlation_id": None, "method": "POST", "status": 200,
          "latency_ms": 1.25, "model": "digits", "note": "caf\u00e9", "big": 2**70, "ratio": math.inf}


def entries(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_the_direct_line_is_the_records_line(json_stream):
    logger = logging.getLogger("app.test_direct")
    info_with_fields(logger, "request", FIELDS)
    logger.info("request", extra=FIELDS)
    direct, record = entries(json_stream)
    assert direct.pop("ts")[:16] == record.pop("ts")[:16]
    assert direct == record
    assert list(direct) == ["level", "logger", "msg", *FIELDS]
    assert direct["note"] == "caf\u00e9" and direct["big"] == 2**70
    assert json_stream.getvalue().isascii()  # one ASCII line each, as json.dumps writes them


def test_anything_else_listening_gets_the_record(json_stream, caplog):
    caplog.set_level(logging.INFO, logger="app.test_direct")
    info_with_fields(logging.getLogger("app.test_direct"), "request", {"status": 201})
    assert [r.status for r in caplog.records if r.name == "app.test_direct"] == [201]
    assert entries(json_stream)[-1]["status"] == 201


def test_a_disabled_level_writes_nothing(json_stream):
    logger = logging.getLogger("app.test_direct")
    logger.setLevel(logging.WARNING)
    try:
        info_with_fields(logger, "request", {"status": 200})
    finally:
        logger.setLevel(logging.NOTSET)
    assert json_stream.getvalue() == ""


def test_timestamps_are_datetimes_to_the_millisecond():
    rng = random.Random(7)
    values = [rng.uniform(1.7e9, 2.1e9) for _ in range(50_000)]
    values += [int(v) + f for v in values[:2000] for f in (0.0, 0.0005, 0.9994999, 0.9999996)]
    for seconds in values:
        expected = datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
        assert app_logging._timestamp(seconds) == expected, seconds


def test_a_line_orjson_cannot_write_is_the_standard_encoders():
    entry = {"big": 2**80, "when": datetime(2026, 12, 3, tzinfo=UTC), 3: "int key"}
    assert json.loads(json_line(entry)) == {"big": 2**80, "when": "2026-12-03 00:00:00+00:00", "3": "int key"}


@pytest.mark.parametrize("body", [
    {"model": "digits", "predictions": [{"label": "7", "confidence": 0.999999, "p": 1e-07}]},
    {"model": "echo", "predictions": [{"size": None}]},  # a null: the standard encoder writes it
    {"model": "big", "predictions": [{"count": 2**70, "\u00e9": "\u00e9"}]},
])
def test_envelopes_parse_as_the_standard_encoders(body):
    expected = json.dumps(body, separators=(",", ":"), allow_nan=False)
    assert json.loads(strict_json(body)) == json.loads(expected)
    if None in body["predictions"][0].values():
        assert strict_json(body) == expected.encode()


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_an_envelope_with_nan_or_infinity_is_refused(value):
    with pytest.raises(ValueError):
        strict_json({"predictions": [{"score": value}]})
