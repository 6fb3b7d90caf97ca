"""The model life cycle's endpoints: erasure, the labelled-dataset export and the shadow report.

- ``DELETE /v1/predictions/{request_id}`` (open, like feedback: the unguessable request id is the
  client's key to its own data) removes the request's stored inputs, summary rows, shadow
  predictions and feedback: 204, or 404 when nothing was logged under that id.
- ``GET /v1/monitoring/dataset`` (admin) streams a zip of the consented inputs: ``manifest.jsonl``
  (one line per stored input, with its label when feedback gave one) and the files it names; read
  from the database in batches, so memory stays bounded however large the export.
- ``GET /v1/monitoring/shadow`` (admin) compares the shadow version with the primary one over a
  window: agreement, and accuracy of each on the labelled instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import tempfile
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import Engine, and_, select

from app.core.errors import ProblemError
from app.core.limits import EXPORT_BATCH_ROWS
from app.monitoring.drift import parse_window
from app.monitoring.reports import shadow_report
from app.monitoring.router import (
    ADMIN_RESPONSES,
    Admin,
    admin_responses,
    find_prediction,
    in_database,
    known_model,
    monitoring_state,
    parse_window_param,
    unknown_request,
)
from app.monitoring.service import Monitoring
from app.monitoring.store import (
    as_utc,
    erase_request,
    feedback,
    predictions,
    utcnow,
)

router = APIRouter(tags=["monitoring"])

# ---- erasure ----------------------------------------------------------------------------------


@router.delete("/v1/predictions/{request_id}", status_code=204, operation_id="prediction_erase",
               responses={404: {"description": "nothing is logged under that request id"},
                          503: {"description": "the prediction-log database is unavailable"}})
async def erase_prediction(
        request: Request, monitoring: Annotated[Monitoring, Depends(monitoring_state)],
        request_id: Annotated[str, Path(min_length=1, max_length=128,
                                        description="the request_id returned with the prediction")]) -> Response:
    """Erase everything logged for one request: its stored inputs, summary rows (prediction,
    confidence, features), shadow predictions and feedback. A prediction made a moment ago may still
    be in a worker's buffer: it is waited for, and anything of that request written later (another
    worker's buffer, a shadow version) is dropped instead of stored."""
    rows = await find_prediction(request, monitoring, request_id)
    if not rows:
        raise unknown_request(request_id)
    await in_database(request, monitoring, erase_request, monitoring.engine, request_id)
    task = asyncio.get_running_loop().create_task(_erase_again(monitoring, request_id))
    _rechecks.add(task)
    task.add_done_callback(_rechecks.discard)
    return Response(status_code=204)


ERASE_RECHECK_S = 2.0  # longer than any one writer transaction that raced the erasure
_rechecks: set[asyncio.Task] = set()


async def _erase_again(monitoring: Monitoring, request_id: str) -> None:
    """A row inserted by a writer transaction that raced the erasure is deleted here; the hourly
    purge catches any this misses (the process stopping in between)."""
    await asyncio.sleep(ERASE_RECHECK_S)
    with contextlib.suppress(Exception):  # a failure here is caught by the hourly purge
        await in_database(None, monitoring, functools.partial(erase_request, remember=False),
                          monitoring.engine, request_id)


# ---- the dataset export ------------------------------------------------------------------------

_SIGNATURES = [(b"\x89PNG", ".png", False), (b"\xff\xd8\xff", ".jpg", False), (b"GIF8", ".gif", False),
               (b"BM", ".bmp", True), (b"fLaC", ".flac", False), (b"OggS", ".ogg", False),
               (b"ID3", ".mp3", False), (b"II*\x00", ".tif", True), (b"MM\x00*", ".tif", True)]


def file_kind(data: bytes) -> tuple[str, bool]:
    """The extension of a stored input (from its bytes) and whether deflating it is worth it."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return ".wav", True
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp", False
    for magic, ext, compress in _SIGNATURES:
        if data.startswith(magic):
            return ext, compress
    if data[:1] in (b"{", b"["):
        return ".json", True
    return ".bin", True


class _Sink(io.RawIOBase):
    """A write-only, unseekable stream: zipfile then writes data descriptors and never seeks back,
    so each member can be sent as soon as it is written."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._chunks.append(chunk)
        self._position += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._position

    def take(self) -> bytes:
        out = b"".join(self._chunks)
        self._chunks.clear()
        return out


def _export_query(model: str | None, since: datetime | None, labelled: bool | None, after_id: int,
                  last_id: int) -> Any:
    query = (select(predictions.c.id, predictions.c.request_id, predictions.c.instance, predictions.c.model,
                    predictions.c.version, predictions.c.created_at, predictions.c.prediction,
                    predictions.c.confidence, predictions.c.input, feedback.c.label)
             .outerjoin(feedback, and_(feedback.c.request_id == predictions.c.request_id,
                                       feedback.c.instance == predictions.c.instance))
             .where(predictions.c.input.is_not(None), predictions.c.id > after_id, predictions.c.id <= last_id))
    if model is not None:
        query = query.where(predictions.c.model == model)
    if since is not None:
        query = query.where(predictions.c.created_at >= since)
    if labelled is True:
        query = query.where(feedback.c.label.is_not(None))
    elif labelled is False:
        query = query.where(feedback.c.label.is_(None))
    return query.order_by(predictions.c.id).limit(EXPORT_BATCH_ROWS)


def _last_id(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(predictions.c.id).order_by(predictions.c.id.desc()).limit(1)).scalar() or 0)


def export_zip(engine: Engine, model: str | None, since: datetime | None, labelled: bool | None,
               last_id: int) -> Iterator[bytes]:
    """The zip, chunk by chunk: the input files in id order, then ``manifest.jsonl`` (spooled to a
    temporary file on the way, so neither is held in memory)."""
    sink = _Sink()
    manifest = tempfile.SpooledTemporaryFile(max_size=1 << 20, mode="w+b")
    with zipfile.ZipFile(sink, mode="w", allowZip64=True) as archive:
        after = 0
        while True:
            with engine.connect() as conn:
                rows = conn.execute(_export_query(model, since, labelled, after, last_id)).all()
            for row in rows:
                data = bytes(row.input)
                ext, compress = file_kind(data)
                name = f"inputs/{row.model}/{row.request_id}-{row.instance}{ext}"
                info = zipfile.ZipInfo(name, date_time=as_utc(row.created_at).timetuple()[:6])
                info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
                archive.writestr(info, data)
                manifest.write(json.dumps({
                    "request_id": row.request_id, "instance": row.instance, "model": row.model,
                    "version": row.version, "created_at": as_utc(row.created_at).isoformat(),
                    "prediction": row.prediction, "confidence": row.confidence, "label": row.label,
                    "file": name}, separators=(",", ":")).encode() + b"\n")
                yield sink.take()
            if len(rows) < EXPORT_BATCH_ROWS:
                break
            after = rows[-1].id
        manifest.seek(0)
        with archive.open(zipfile.ZipInfo("manifest.jsonl", date_time=utcnow().timetuple()[:6]), "w",
                          force_zip64=True) as member:
            for chunk in iter(lambda: manifest.read(1 << 16), b""):
                member.write(chunk)
                yield sink.take()
        manifest.close()
    yield sink.take()


def _since(text: str | None) -> datetime | None:
    """An ISO 8601 time (``2026-11-01``, ``2026-11-25T12:00:00Z``) or a duration back from now (``7d``)."""
    if text is None or not text.strip():
        return None
    try:
        window = parse_window(text, 1)
    except ValueError:
        window = None
    if window is not None and window.since is not None:
        return utcnow() - window.since
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ProblemError(422, "invalid-since", "since: give an ISO 8601 time (2026-11-01 or "
                           "2026-11-25T12:00:00Z) or a duration back from now (30m, 7d).",
                           field="since") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


@router.get("/v1/monitoring/dataset", dependencies=[Admin], operation_id="monitoring_dataset",
            response_class=StreamingResponse,
            responses={200: {"content": {"application/zip": {"schema": {"type": "string", "format": "binary"},
                                                             "example": "(the zip's bytes)"}},
                             "description": "a zip: manifest.jsonl and inputs/<model>/<request_id>-<instance>.<ext>"},
                       **ADMIN_RESPONSES})
async def export_dataset(
        request: Request, monitoring: Annotated[Monitoring, Depends(monitoring_state)],
        model: Annotated[str | None, Query(description="one model (default: all)")] = None,
        since: Annotated[str | None, Query(description="ISO 8601 time, or a duration back from now "
                                                       "(7d)")] = None,
        labelled: Annotated[bool | None, Query(description="true: only inputs with feedback; false: "
                                                           "only those without; omitted: all")] = None,
) -> StreamingResponse:
    """The consented inputs as a dataset for retraining (``python -m training.digits
    --production-data export.zip``): ``manifest.jsonl`` has one line per stored input
    (``request_id``, ``instance``, ``model``, ``version``, ``created_at``, ``prediction``,
    ``confidence``, ``label`` or null, ``file``) and the zip holds the files it names."""
    if model is not None:
        known_model(request, model)
    moment = _since(since)

    def last_written() -> int:  # also: the database answers
        monitoring.prediction_log.flush(1.0)
        return _last_id(monitoring.engine)

    last_id = await in_database(request, monitoring, last_written)
    stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
    filename = f"dataset-{model or 'all'}-{stamp}.zip"
    return StreamingResponse(export_zip(monitoring.engine, model, moment, labelled, last_id),
                             media_type="application/zip",
                             headers={"Content-Disposition": f'attachment; filename="{filename}"',
                                      "Cache-Control": "no-store"})


# ---- the shadow report -------------------------------------------------------------------------


class VersionScore(BaseModel):
    version: str | None
    n: int = Field(description="instances both versions predicted in the window")
    labelled: int = Field(description="of those, instances with feedback")
    accuracy: float | None = Field(description="over the labelled instances; null when none")


class ShadowReport(BaseModel):
    model_config = {"json_schema_extra": {"examples": [{
        "model": "digits", "window": {"kind": "count", "last": 500}, "n": 500, "agreement": 0.982,
        "primary": {"version": "1.0.1", "n": 500, "labelled": 120, "accuracy": 0.71},
        "shadow": {"version": "1.1.0", "n": 500, "labelled": 120, "accuracy": 0.93}}]}}

    model: str
    window: dict[str, Any]
    n: int = Field(description="instances predicted by both versions")
    agreement: float | None = Field(description="fraction of them both versions predicted the same")
    primary: VersionScore
    shadow: VersionScore


@router.get("/v1/monitoring/shadow", dependencies=[Admin], operation_id="monitoring_shadow",
            response_model=ShadowReport,
            responses=admin_responses(ShadowReport.model_config["json_schema_extra"]["examples"][0]))
async def get_shadow(request: Request, monitoring: Annotated[Monitoring, Depends(monitoring_state)],
                     model: Annotated[str, Query(description="the task whose versions to compare")],
                     window: str | None = None) -> dict[str, Any]:
    """How the shadow version (``SHADOW_VERSIONS``) compares with the primary one over ``window``
    (a count of recent shadowed instances, e.g. ``500``, or a duration, e.g. ``1h``): how often both
    predicted the same, and the accuracy of each on the instances that have feedback."""
    known_model(request, model)
    registry = getattr(request.app.state, "registry", None)
    win = parse_window_param(window, monitoring)
    shadow = registry.shadows.get(model) if registry is not None else None
    shadows = getattr(request.app.state, "shadows", None)

    def read() -> dict[str, Any]:
        if shadows is not None:
            shadows.drain(1.0)
        monitoring.prediction_log.flush(1.0)
        return shadow_report(monitoring.engine, model, win, shadow.version if shadow is not None else None)

    return await in_database(request, monitoring, read)
