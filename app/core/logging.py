"""Structured logging: one JSON object per line on stdout (Heroku's log router and Docker read it)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def _timestamp(seconds: float) -> str:
    """ISO 8601 in UTC to the millisecond, as ``datetime.isoformat(timespec="milliseconds")`` writes
    it; the part up to the second is made once per second (every request logs a line)."""
    fraction, whole = math.modf(seconds)
    micros = round(fraction * 1e6)  # as datetime.fromtimestamp rounds
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    global _second
    second = _second  # one read: another thread may replace it meanwhile, never half of it
    if whole != second[0]:
        second = _second = (whole, datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{second[1]}.{micros // 1000:03d}+00:00"


_second: tuple[float | None, str] = (None, "")  # the last second a timestamp was made for, its text


def json_line(entry: dict[str, Any]) -> str:
    """One log entry as one line of ASCII JSON: orjson, or the standard library's encoder (``str``
    of values neither knows) when orjson cannot (a huge integer) or the line is not ASCII."""
    try:
        line = orjson.dumps(entry, default=str, option=_ORJSON_OPTIONS)
    except TypeError:
        line = b""
    if line and line.isascii():
        return line.decode("ascii")
    return json.dumps(entry, default=str, separators=(",", ":"))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json_line(entry)


def _sole_json_handler(logger: logging.Logger) -> logging.StreamHandler | None:
    """The root's :class:`JsonFormatter` stream handler when a record of ``logger`` would reach it
    and nothing else: no handler or filter on the way, and that handler the root's only one."""
    node: logging.Logger | None = logger
    while node is not None and node.parent is not None:  # up to, not including, the root
        if node.handlers or node.filters or not node.propagate or node.disabled:
            return None
        node = node.parent
    if node is None or node.filters or len(node.handlers) != 1:
        return None
    handler = node.handlers[0]
    if (type(handler) is not logging.StreamHandler or type(handler.formatter) is not JsonFormatter
            or handler.filters or handler.level > logging.INFO):
        return None
    return handler


def info_with_fields(logger: logging.Logger, msg: str, fields: dict[str, Any]) -> None:
    """``logger.info(msg, extra=fields)``, the same JSON line, written straight to the stream when
    our handler is the only place the record would go (as configured by :func:`configure_logging`).

    One of these is on every request's path (the access log), where a record, its dispatch through
    the logger tree and the formatter's copying of the record's attributes cost ~4x the line itself.
    Anywhere else (a test capturing records, another handler added) it is ``logger.info``."""
    if not logger.isEnabledFor(logging.INFO):
        return
    handler = _sole_json_handler(logger)
    if handler is None:
        logger.info(msg, extra=fields)
        return
    line = json_line({"ts": _timestamp(time.time()), "level": "info", "logger": logger.name,
                      "msg": msg, **fields})
    with handler.lock:  # type: ignore[union-attr]  # a StreamHandler always has its lock
        try:
            handler.stream.write(line + handler.terminator)
            handler.flush()
        except Exception:  # a closed or broken stream: reported as logging reports it, never raised
            handler.handleError(logging.makeLogRecord({"name": logger.name, "msg": msg}))


def configure_logging(level: str = "INFO") -> None:
    # Record attributes the JSON lines never show, so no record looks them up (the logging HOWTO's
    # "Optimization" section): the caller's frame, thread and process. One access-log line per
    # request is on every request's path.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own access log would duplicate ours; its error log goes through our formatter.
    logging.getLogger("uvicorn.access").handlers[:] = []
    logging.getLogger("uvicorn.access").propagate = False
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


@contextlib.contextmanager
def native_stderr_as_log(logger: str = "app.native") -> Iterator[None]:
    """Capture what native libraries write straight to file descriptor 2 inside the block (LiteRT
    prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." when a model loads, and no
    setting silences it) and log each line as JSON instead, so stdout stays one JSON object per
    line."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode("utf-8", "replace").splitlines():
                if line.strip():
                    logging.getLogger(logger).info(line.strip())
