"""Batch jobs: a job's request cut into requests of the synchronous size, answers joined in order.

A job may hold up to ``JOB_MAX_PARTS`` times an endpoint's synchronous instance limit (within
the request body limit): a multipart body is cut between its repeated file parts (the other
fields go with every part), a JSON body between its ``instances``, and a CSV body (``text/csv``,
for endpoints whose instances are rows of numbers, e.g. clustering) is read as those instances
first, with its header naming the fields. A raw single upload, a V2 request and an endpoint of
one instance run as one part. Each part is sent to the app as a synchronous request would be;
:func:`join` puts the answers back together as the one envelope the synchronous call would give
for the whole batch.
"""

from __future__ import annotations

import csv
import io
import json
import secrets
import types
import typing
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app.core.errors import ProblemError
from app.core.limits import JOB_MAX_PARTS
from app.core.pipeline import Endpoint


@dataclass(frozen=True)
class Part:
    content_type: str
    body: bytes
    first_instance: int  # index of its first instance in the whole job
    instances: int


def _too_many(endpoint: Endpoint, got: int) -> ProblemError:
    allowed = endpoint.max_instances * JOB_MAX_PARTS
    return ProblemError(413, "too-many-instances", f"A job takes at most {allowed:,} instances for this "
                        f"endpoint ({JOB_MAX_PARTS} x its synchronous limit of {endpoint.max_instances}); "
                        f"got {got:,}.", field="body", max_instances=allowed)


def _chunks(count: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, count)) for start in range(0, count, size)]


async def split(endpoint: Endpoint | None, content_type: str, body: bytes) -> list[Part]:
    """The parts of a job's request (see the module); one part when it cannot or need not be cut."""
    media = content_type.split(";")[0].strip().lower()
    whole = [Part(content_type, body, 0, 0)]
    if endpoint is None or endpoint.max_instances <= 1:
        return whole
    if media == "multipart/form-data" and endpoint.file_field:
        return await _split_multipart(endpoint, content_type, body) or whole
    if media == "text/csv" and _row_fields(endpoint):
        return _json_parts(endpoint, {"instances": _csv_instances(endpoint, body)})
    if media == "application/json" and endpoint.json_instances is not None:
        try:
            document = json.loads(body)
        except ValueError:
            return whole  # the synchronous path names the problem
        if isinstance(document, dict) and isinstance(document.get("instances"), list):
            return _json_parts(endpoint, document)
    return whole


def _json_parts(endpoint: Endpoint, document: dict[str, Any]) -> list[Part]:
    instances = document["instances"]
    if len(instances) > endpoint.max_instances * JOB_MAX_PARTS:
        raise _too_many(endpoint, len(instances))
    if not instances:
        return [Part("application/json", json.dumps(document).encode(), 0, 0)]
    return [Part("application/json", json.dumps({**document, "instances": instances[a:b]}).encode(), a, b - a)
            for a, b in _chunks(len(instances), endpoint.max_instances)]


def _row_fields(endpoint: Endpoint) -> list[str]:
    """The fields of a JSON instance when each is a number (a row of a table), else []."""
    schema = endpoint.json_schema
    field = schema.model_fields.get("instances") if schema is not None else None
    if field is None:
        return []
    item = next(iter(typing.get_args(field.annotation)), None)
    fields = getattr(item, "model_fields", None)
    if not fields:
        return []

    def numeric(annotation: Any) -> bool:
        options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
        return all(option in (int, float, type(None)) for option in options)

    return list(fields) if all(numeric(f.annotation) for f in fields.values()) else []


def _csv_instances(endpoint: Endpoint, body: bytes) -> list[dict[str, Any]]:
    fields = _row_fields(endpoint)
    try:
        reader = csv.DictReader(io.StringIO(body.decode("utf-8-sig")))
        header = [name.strip() for name in reader.fieldnames or []]
        unknown = sorted(set(header) - set(fields))
        if unknown or not header:
            raise ProblemError(422, "invalid-csv", f"The CSV header must name the instance fields "
                               f"({', '.join(fields)}); unknown: {', '.join(unknown) or 'no header'}.",
                               field="body")
        rows = []
        for number, row in enumerate(reader, start=2):
            try:
                rows.append({name.strip(): float(value) for name, value in row.items() if name is not None})
            except (TypeError, ValueError):
                raise ProblemError(422, "invalid-csv", f"CSV line {number}: every value must be a number.",
                                   field="body", line=number) from None
            if len(rows) > endpoint.max_instances * JOB_MAX_PARTS:
                raise _too_many(endpoint, len(rows))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ProblemError(422, "invalid-csv", f"The body is not UTF-8 CSV: {exc}.", field="body") from None
    return rows


async def _split_multipart(endpoint: Endpoint, content_type: str, body: bytes) -> list[Part] | None:
    async def stream() -> AsyncIterator[bytes]:
        yield body

    allowed = endpoint.max_instances * JOB_MAX_PARTS
    parser = MultiPartParser(Headers(raw=[(b"content-type", content_type.encode("latin-1"))]), stream(),
                             max_files=allowed + 1, max_fields=64)
    try:
        form = await parser.parse()
    except MultiPartException:
        return None  # the synchronous path names the problem
    try:
        files: list[tuple[str, str, bytes]] = []
        fields: list[tuple[str, str]] = []
        for name, value in form.multi_items():
            if name == endpoint.file_field and isinstance(value, UploadFile):
                files.append((value.filename or "upload", value.content_type or "application/octet-stream",
                              await value.read()))
            elif isinstance(value, str):
                fields.append((name, value))
            else:
                return None  # another file field: the synchronous path names the problem
    finally:
        await form.close()
    if len(files) > allowed:
        raise _too_many(endpoint, len(files))
    if len(files) <= endpoint.max_instances:
        return None
    return [_multipart(endpoint.file_field or "", files[a:b], fields, a)
            for a, b in _chunks(len(files), endpoint.max_instances)]


def _multipart(field_name: str, files: list[tuple[str, str, bytes]], fields: list[tuple[str, str]],
               first: int) -> Part:
    boundary = secrets.token_hex(16)
    out = io.BytesIO()
    for name, value in fields:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(value.encode() + b"\r\n")
    for filename, media_type, data in files:
        safe = filename.replace('"', "%22").replace("\r", "").replace("\n", "")
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; '
                  f'filename="{safe}"\r\nContent-Type: {media_type}\r\n\r\n'.encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return Part(f"multipart/form-data; boundary={boundary}", out.getvalue(), first, len(files))


def join(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """The envelopes of a job's parts as one: the first's, with every part's predictions in order."""
    if len(answers) == 1:
        return answers[0]
    return {**answers[0], "predictions": [p for answer in answers for p in answer.get("predictions", [])]}
