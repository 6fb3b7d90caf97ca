"""One request pipeline for every prediction endpoint.

A task declares an :class:`Endpoint` (compare LitServe's ``LitAPI`` and Seldon MLServer's codecs +
``MLModel``): where its inputs come from (a multipart file field, a raw ``image/*`` or ``audio/*``
body, a JSON schema), its parameters, its limits, its admission gate and one blocking ``run(job)``
that decodes, predicts and encodes each instance (or a generator that yields its model call, which
core makes with other requests' calls: ``execution.ModelCalls``). The core owns everything around it:

1. the model (503 while it is not loaded) and the parameters (query string or multipart text
   fields, validated by the endpoint's schema: 422 naming the parameter);
2. the body, read by its media type: ``multipart/form-data`` (repeated file fields, one instance
   each, in order), ``application/json`` (the endpoint's schema; at most ``MAX_JSON_MB``, its values
   counted before any is parsed, large bodies parsed off the event loop) or one raw upload
   (``Content-Type: image/png``, ``audio/wav``..., or ``application/octet-stream``: the codecs read
   the format from the bytes); anything else is the same 415 everywhere;
   more instances than the endpoint takes is a 422, never a silently dropped file;
3. a place in the admission gate's queue, taken once the body has arrived (503 ``overloaded``; a
   gate already full refuses before the body is read), so a slow upload never holds a place;
4. ``run(job)`` on the gate's thread within the request's deadline (:mod:`app.core.execution`);
5. the predictions told to the observers (:mod:`app.core.events`; the monitoring keeps the
   prediction log there, the raw inputs too when the client sent ``X-Data-Consent: granted`` and
   ``STORE_INPUTS`` is ``consented``), then the envelope ``{"model", "version", "request_id", "predictions"}`` (or
   one binary image) with ``X-Request-ID``, ``X-Model-Version`` and ``Server-Timing`` headers.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from app.core.errors import ProblemError, problem_answer, problem_from_validation
from app.core.events import Observers
from app.core.execution import Call, Deadline, Offload, execution_of
from app.core.limits import DB_CALL_TIMEOUT_S as SETTLE_MAX_S
from app.core.idempotency import IDEMPOTENCY_PARAMETER
from app.core.jsonbody import strict_json
from app.core.limits import BIG_JOB_BYTES, JSON_INLINE_MAX_BYTES, JSON_VALUES_SLACK, MAX_CLIENT_VERSIONS
from app.core.registry import ServedModel
from app.core.uploads import read_upload

T = TypeVar("T")
RAW_MEDIA_TYPE = "application/octet-stream"  # a raw upload of any accepted format
CONSENT_HEADER = "X-Data-Consent"  # "granted": the service may keep this request's raw inputs
CONSENT_VALUES = ("granted", "denied")
PROBLEM_STATUSES = {
    400: "malformed JSON or multipart body, or a malformed Idempotency-Key",
    409: "a request with this Idempotency-Key is still running (`idempotency-key-in-use`)",
    401: "API_KEYS is set and no valid key was sent (Authorization: Bearer <key> or X-API-Key)",
    408: "the request body was still arriving at the request's deadline (`upload-timeout`)",
    429: "over RATE_LIMIT for this key or client; see Retry-After and the RateLimit headers",
    413: "a body, file, image or request over its limit (see the limits table)",
    415: "a media type this endpoint does not take, or a file in an unsupported format",
    422: "well-formed but invalid input (or an X-Data-Consent other than granted/denied, or an "
         "Idempotency-Key used for another request); the problem's `field` names it",
    503: "the model is not loaded, the worker is busy (`overloaded`, with Retry-After), the request "
         "ran out of time (`deadline-exceeded`) or, with LOG_DURABLE, could not be recorded "
         "(`log-unavailable`)",
}


@dataclass
class Instance:
    """One input as received; ``field`` is how problems name it (``image[1]``, ``instances[0]``)."""

    field: str
    data: bytes | None = None  # an uploaded file
    value: Any = None  # a JSON instance, already validated by the endpoint's schema


class Timing:
    """Durations for the ``Server-Timing`` header (decode, inference; total is added at the end)."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    def measure(self, stage: str) -> _Stage:
        """``with timing.measure("decode"): ...`` adds the block's duration to ``stage``; a block
        that raised counts too, except one that hands its job to a thread (:class:`Offload`),
        which starts again there, its timings with it."""
        return _Stage(self.ms, stage)

    def header(self, total_ms: float) -> str:
        stages = {"decode": 0.0, "inference": 0.0, **self.ms, "total": total_ms}
        return ", ".join(f"{name};dur={ms:.2f}" for name, ms in stages.items())


class _Stage:
    """One timed block of :meth:`Timing.measure` (a class, not a generator: on every request)."""

    __slots__ = ("ms", "stage", "started")

    def __init__(self, ms: dict[str, float], stage: str) -> None:
        self.ms, self.stage = ms, stage

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None and issubclass(kind, Offload):
            return
        elapsed_ms = (time.perf_counter() - self.started) * 1000.0
        self.ms[self.stage] = self.ms.get(self.stage, 0.0) + elapsed_ms


@dataclass
class Job:
    model: ServedModel | None
    instances: list[Instance]
    params: Any
    timing: Timing
    settings: Any
    # Tensors the caller wants as arrays (the V2 protocol: "mask", "probability"); a run that has
    # them puts them in ``Outcome.arrays`` and may skip encoding files nobody will read.
    tensors: frozenset[str] = frozenset()
    # The client consented to its inputs being kept (and the server keeps them): a run whose
    # instances are not files (JSON pixels) builds ``Outcome.raw_inputs`` only then.
    store_inputs: bool = False
    body_bytes: int = 0  # the request body's size


@dataclass
class Outcome:
    """What ``run`` returns: one prediction per instance (plain JSON values) and one log row each,
    or a binary answer (a mask PNG) for endpoints that have one."""

    predictions: list[dict[str, Any]]
    log_rows: list[dict[str, Any]]
    raw_inputs: list[bytes] | None = None
    binary: tuple[bytes, str] | None = None  # (content, media type)
    headers: dict[str, str] = field(default_factory=dict)
    arrays: list[dict[str, Any]] | None = None  # per instance, the ``Job.tensors`` it could give


@dataclass(frozen=True)
class Endpoint:
    operation_id: str
    path: str
    tag: str
    summary: str
    description: str
    run: Callable[[Job], Outcome | Generator[Call, Any, Outcome]]
    response_schema: type[BaseModel]
    gate: str = "light"
    # Run on the event loop while the job stays within ``execution.inline_budget`` (which ``run``
    # must call once it knows the job's size): for sub-millisecond work a thread costs more.
    inline: bool = False
    model: str | None = None  # registry slot; None for operations without a trained model
    name: str | None = None  # the envelope's "model" when there is no trained model
    version: str | None = None  # ... and its "version"
    file_field: str | None = None  # multipart field holding the files, one instance each
    file_description: str = ""
    raw_media: tuple[str, ...] = ()  # media-type prefixes of a single raw upload: ("image/",)
    json_schema: type[BaseModel] | None = None
    json_instances: Callable[[Any], list[Instance]] | None = None
    # Numbers and strings one JSON instance holds at most: with max_instances, bounds a JSON body's
    # size in values before it is parsed.
    json_values_per_instance: int = 1
    # The endpoint's own problem code for a kind of JSON validation error (pydantic's error type,
    # e.g. {"missing": "missing-feature"}); others are invalid-request.
    json_error_codes: dict[str, str] = field(default_factory=dict)
    params_schema: type[BaseModel] | None = None
    max_instances: int = 1
    binary_media: tuple[str, ...] = ()  # media types of a binary answer (documented)
    binary_description: str = ""
    request_examples: dict[str, Any] = field(default_factory=dict)  # media type -> example
    response_example: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------
# Reading the request


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _accepted(endpoint: Endpoint) -> list[str]:
    kinds = []
    if endpoint.file_field:
        kinds.append(f"multipart/form-data (field '{endpoint.file_field}')")
    if endpoint.json_schema is not None:
        kinds.append("application/json")
    kinds += [f"{prefix}*" for prefix in endpoint.raw_media]
    if endpoint.raw_media:
        kinds.append(RAW_MEDIA_TYPE)
    return kinds


def unsupported_media_type(endpoint: Endpoint, media_type: str) -> ProblemError:
    return ProblemError(415, "unsupported-media-type",
                        f"This endpoint takes {', '.join(_accepted(endpoint))}; got "
                        f"{media_type or 'no Content-Type'}.", field="content-type",
                        accepted=_accepted(endpoint))


def too_many(endpoint: Endpoint, got: int, field_name: str) -> ProblemError:
    return ProblemError(422, "too-many-instances", f"{field_name}: at most {endpoint.max_instances} "
                        f"instance(s) per request; got {got}.", field=field_name,
                        max_instances=endpoint.max_instances)


def parse_params(endpoint: Endpoint, values: dict[str, Any]) -> Any:
    if endpoint.params_schema is None:
        return None
    try:
        return endpoint.params_schema.model_validate(values)
    except ValidationError as exc:
        raise problem_from_validation(exc.errors(include_url=False)) from None


async def read_multipart(request: Request, endpoint: Endpoint,
                         max_bytes: int) -> tuple[list[Instance], dict[str, str]]:
    """The files of the endpoint's field, in order, and the text fields (parameters)."""
    params = set(endpoint.params_schema.model_fields) if endpoint.params_schema else set()
    try:
        form = await request.form(max_files=endpoint.max_instances + 1,
                                  max_fields=len(params) + endpoint.max_instances + 8,
                                  max_part_size=max_bytes)
    except (MultiPartException, HTTPException) as exc:
        # Inside an app Starlette re-raises the parser's MultiPartException as a 400 HTTPException.
        reason = exc.detail if isinstance(exc, HTTPException) else exc.message
        raise ProblemError(400, "malformed-multipart", f"The multipart body could not be parsed: "
                           f"{reason}", field="body") from exc
    unexpected = sorted(set(form.keys()) - {endpoint.file_field} - params)
    uploads = form.getlist(endpoint.file_field)
    if not uploads:
        got = f" (got {', '.join(repr(u) for u in unexpected)})" if unexpected else ""
        raise ProblemError(422, "missing-file", f"Send one or more files in the form field "
                           f"'{endpoint.file_field}'{got}.", field=endpoint.file_field)
    if unexpected:
        raise ProblemError(422, "unexpected-field", f"Unexpected form field {unexpected[0]!r}; send "
                           f"files in the field '{endpoint.file_field}'.", field=unexpected[0])
    if len(uploads) > endpoint.max_instances:
        raise too_many(endpoint, len(uploads), endpoint.file_field)
    instances = []
    for i, upload in enumerate(uploads):
        name = f"{endpoint.file_field}[{i}]" if endpoint.max_instances > 1 else endpoint.file_field
        if isinstance(upload, UploadFile):
            data = await read_upload(upload, name, max_bytes)
        else:  # a part without a file name (generated clients send them): the file all the same
            data = part_bytes(upload)
            if not data:
                raise ProblemError(422, "empty-file", f"{name} is empty.", field=name)
        instances.append(Instance(name, data=data))
    for key, value in form.multi_items():
        if key in params and not isinstance(value, str):  # a parameter sent as a file is not ignored
            raise ProblemError(422, "not-a-value", f"{key} is a parameter: send it as a text field or in "
                               "the query string, not as a file.", field=key)
    text = {k: v for k, v in form.multi_items() if k in params and isinstance(v, str)}
    return instances, text


def part_bytes(text: str) -> bytes:
    """The bytes of a multipart part that came without a file name. Starlette hands such a part
    over as text: decoded as UTF-8 when it is valid UTF-8, else as Latin-1 (one character per
    byte). Text beyond Latin-1, or whose Latin-1 bytes are valid UTF-8, can only have come as UTF-8.
    Otherwise either way is possible (``é`` is one Latin-1 byte or two UTF-8 ones): control
    characters mark a binary file (images and audio hold them within their first bytes), restored
    byte for byte as Latin-1; text without them is taken as the UTF-8 that text almost always is."""
    try:
        latin = text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")
    if text.isascii():
        return latin
    try:
        latin.decode("utf-8")
    except UnicodeDecodeError:  # either way is possible
        return latin if _BINARY_CHARACTER.search(text) else text.encode("utf-8")
    return text.encode("utf-8")  # Latin-1 decodes only bytes that are not UTF-8


# C0 controls but tab, line feed and carriage return; DEL and the C1 controls.
_BINARY_CHARACTER = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def too_many_values(found: int, allowed: int) -> ProblemError:
    return ProblemError(413, "too-many-values", f"The JSON body holds about {found:,} values; this "
                        f"endpoint reads at most {allowed:,} (its instance limit).", field="body",
                        max_values=allowed)


def json_values_bound(raw: bytes) -> int:
    """At least as many as the values (numbers, strings, arrays, objects) a JSON text holds: every
    one after the first in an array or object is preceded by a comma. Counted in C, unparsed."""
    return raw.count(b",") + 1


async def parse_json(raw: bytes, parse: Callable[[bytes], T]) -> T:
    """``parse(raw)``, off the event loop when the body is large: parsing allocates and takes time
    in proportion to the body, and the loop serves every other connection meanwhile."""
    if len(raw) <= JSON_INLINE_MAX_BYTES:
        return parse(raw)
    return await asyncio.to_thread(parse, raw)


async def read_json(request: Request, endpoint: Endpoint, max_bytes: int) -> list[Instance]:
    assert endpoint.json_schema is not None and endpoint.json_instances is not None
    raw = await read_body(request, max_bytes)
    if not raw.strip():
        raise ProblemError(422, "empty-body", "The request body is empty.", field="body")
    allowed = endpoint.max_instances * endpoint.json_values_per_instance + JSON_VALUES_SLACK
    found = json_values_bound(raw)
    if found > allowed:
        raise too_many_values(found, allowed)
    try:
        body = await parse_json(raw, endpoint.json_schema.model_validate_json)
    except ValidationError as exc:
        raise problem_from_validation(exc.errors(include_url=False), endpoint.json_error_codes) from None
    except (RecursionError, ValueError) as exc:
        raise ProblemError(400, "malformed-json", "The body's JSON could not be read.",
                           field="body") from exc
    instances = endpoint.json_instances(body)
    if len(instances) > endpoint.max_instances:
        raise too_many(endpoint, len(instances), "instances")
    return instances


async def read_body(request: Request, max_bytes: int | None = None) -> bytes:
    """The whole body, refused (413) as soon as it passes ``max_bytes`` (the JSON limit; the
    middleware applies MAX_UPLOAD_MB to every body). Read with ``receive`` directly: for a small
    upload, which arrives in one message, Starlette's stream generator is most of the cost."""
    if max_bytes is not None:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise json_too_large(max_bytes)
    chunks, size = [], 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            raise json_too_large(max_bytes)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def json_too_large(max_bytes: int) -> ProblemError:
    return ProblemError(413, "json-too-large", f"A JSON body is limited to {max_bytes / 1048576:g} MiB "
                        "(MAX_JSON_MB); send large inputs as files or binary tensors.", field="body")


async def read_raw(request: Request, endpoint: Endpoint, max_bytes: int) -> list[Instance]:
    data = await read_body(request)
    if not data:
        raise ProblemError(422, "empty-file", "The request body is empty.", field="body")
    if len(data) > max_bytes:  # the middleware caps the body already; kept for clarity
        raise ProblemError(413, "file-too-large", "The body is over the upload limit.", field="body")
    return [Instance("body", data=data)]


# ---------------------------------------------------------------------------------------------
# The route


@dataclass
class Served:
    """A request run through the pipeline: what the protocol layer turns into a response."""

    job: Job
    outcome: Outcome
    name: str  # the model's name in answers and in the prediction log
    version: str
    headers: dict[str, str]  # X-Model-Version, Server-Timing, RateLimit-*, the run's own
    after: Callable[[], None] | None = None  # to run once the response has gone (the shadow)

    def background(self) -> BackgroundTask | None:
        return BackgroundTask(self.after) if self.after is not None else None


@dataclass
class Read:
    """What a protocol read from a request: the instances, the parameters, the tensors wanted."""

    instances: list[Instance]
    params: Any
    tensors: frozenset[str] = frozenset()


Reader = Callable[[Request, Endpoint, Any], Awaitable[Read]]


async def read_v1(request: Request, endpoint: Endpoint, settings: Any) -> Read:
    """The instances and parameters of a v1 request, by its media type."""
    media_type = _media_type(request)
    query = dict(request.query_params) if request.scope.get("query_string") else {}
    if media_type == "multipart/form-data" and endpoint.file_field:
        instances, text = await read_multipart(request, endpoint, settings.max_upload_bytes)
        return Read(instances, parse_params(endpoint, {**query, **text}))
    if media_type == "application/json" and endpoint.json_schema is not None:
        params = parse_params(endpoint, query)
        return Read(await read_json(request, endpoint, settings.max_json_bytes), params)
    if endpoint.raw_media and (media_type.startswith(endpoint.raw_media) or media_type == RAW_MEDIA_TYPE):
        params = parse_params(endpoint, query)
        return Read(await read_raw(request, endpoint, settings.max_upload_bytes), params)
    raise unsupported_media_type(endpoint, media_type)


def observers_of(request: Request) -> Observers:
    """The app's observers (the monitoring registers there); none in an app that has not any."""
    observers = getattr(request.app.state, "observers", None)
    return observers if observers is not None else NO_OBSERVERS


NO_OBSERVERS = Observers()


def job_deadline(request: Request) -> Deadline:
    return execution_of(request).deadline(request)


def body_bytes(request: Request) -> int:
    """The request body's size as received (counted by the request context)."""
    return int(request.scope.get("state", {}).get("body_bytes", 0))


CLIENT_VERSION_HEADER = "X-Client-Version"  # the app's release, e.g. "app/1.4.2": drift per release
_CLIENT_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/+\-]{0,39}$")


class ClientReleases:
    """The releases a worker has seen, bounded: the first ``MAX_CLIENT_VERSIONS`` distinct values
    are kept as sent, later new ones are logged as ``other``, malformed ones as ``invalid`` and
    requests without the header as null. Reports then group by a bounded set."""

    def __init__(self, limit: int = MAX_CLIENT_VERSIONS) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def of(self, request: Request) -> str | None:
        value = request.headers.get(CLIENT_VERSION_HEADER)
        if value is None:
            return None
        value = value.strip()
        if not _CLIENT_VERSION.match(value):
            return "invalid"
        if value in self.seen:
            return value
        if len(self.seen) >= self.limit:
            return "other"
        self.seen.add(value)
        return value


client_releases = ClientReleases()


def consent(request: Request) -> bool:
    """Whether the client allowed this request's raw inputs to be kept: ``X-Data-Consent: granted``.
    No header is no. Sent more than once (or as a list), every value must be ``granted`` for a yes
    and every value ``denied`` for a no; any other value, or values that disagree, is a 422: never
    a guess either way."""
    values = request.headers.getlist(CONSENT_HEADER)
    if not values:
        return False
    words = {word.strip().lower() for value in values for word in value.split(",")}
    if not words <= set(CONSENT_VALUES):
        shown = ", ".join(values)
        raise ProblemError(422, "invalid-consent", f"{CONSENT_HEADER} must be 'granted' or 'denied'; "
                           f"got {shown[:64]!r}.", field=CONSENT_HEADER)
    if len(words) > 1:
        raise ProblemError(422, "invalid-consent", f"{CONSENT_HEADER} was sent with values that "
                           "disagree ('granted' and 'denied'); send it once.", field=CONSENT_HEADER)
    return words == {"granted"}


async def execute(request: Request, endpoint: Endpoint, read: Reader) -> Served:
    """The one request path of every protocol: the model, the access check (401/429), a place in
    the endpoint's gate (503), ``read`` (the protocol's decoding), ``endpoint.run`` within the
    deadline, and the prediction log; the shadow version, if any, runs after the response."""
    shadows = getattr(request.app.state, "shadows", None)
    if shadows is None or not shadows.active:
        return await _execute(request, endpoint, read, None)
    shadows.request_started()  # the shadow waits while predictions are in progress
    try:
        return await _execute(request, endpoint, read, shadows)
    finally:
        shadows.request_finished()


async def _execute(request: Request, endpoint: Endpoint, read: Reader, shadows: Any) -> Served:
    started = time.perf_counter()
    settings = request.app.state.settings
    keep_inputs = consent(request) and settings.store_inputs == "consented"
    model = None
    if endpoint.model is not None:
        model = request.app.state.registry.get(endpoint.model)
        request.state.model_name = endpoint.model
        request.state.model_version = model.version
    else:
        request.state.model_name = endpoint.tag
        request.state.model_version = endpoint.version
    name = endpoint.model or endpoint.name or endpoint.tag
    version = model.version if model is not None else str(endpoint.version)
    access_headers = request.app.state.access.check(request)  # 401 / 429 before any work
    execution = execution_of(request)
    execution.admissible(request, endpoint.gate)  # a full gate refuses before the body is read
    got = await read(request, endpoint, settings)
    async with execution.ticket(request, endpoint.gate) as ticket:
        job = Job(model, got.instances, got.params, Timing(), settings, got.tensors, keep_inputs,
                  body_bytes(request))
        outcome = await ticket.run(endpoint.run, job, inline=endpoint.inline,
                                   big=job.body_bytes >= BIG_JOB_BYTES)
    total_ms = (time.perf_counter() - started) * 1000.0
    observers = observers_of(request)
    kept = observers.predictions(request.state.request_id, name, version, outcome.log_rows,
                                 total_ms, outcome.raw_inputs if keep_inputs else None,
                                 client_releases.of(request)) > 0
    if observers.settles and not await observers.settle(request.state.request_id,
                                                        min(SETTLE_MAX_S, job_deadline(request).remaining())):
        raise ProblemError(503, "log-unavailable", "The prediction could not be recorded in time "
                           "(LOG_DURABLE is set, so it is not answered unrecorded); retry shortly.",
                           headers={"Retry-After": "5"})
    headers = {"X-Model-Version": version, "Server-Timing": job.timing.header(total_ms),
               "X-Inputs-Stored": "true" if kept else "false", **access_headers, **outcome.headers}
    after = None
    if shadows is not None and model is not None:
        request_id = request.state.request_id
        after = lambda: shadows.submit(endpoint, job, request_id)
    return Served(job, outcome, name, version, headers, after)


def handler(endpoint: Endpoint) -> Callable[[Request], Any]:
    async def predict(request: Request) -> Response:
        served = await execute(request, endpoint, read_v1)
        outcome = served.outcome
        if outcome.binary is not None:
            content, binary_type = outcome.binary
            return Response(content, media_type=binary_type, headers=served.headers,
                            background=served.background())
        body = {"model": served.name, "version": served.version, "request_id": request.state.request_id,
                "predictions": outcome.predictions}
        return Response(strict_json(body), media_type="application/json", headers=served.headers,
                        background=served.background())

    predict.__name__ = endpoint.operation_id
    predict.__doc__ = endpoint.description
    return predict


# ---------------------------------------------------------------------------------------------
# The contract (OpenAPI)


def request_body_doc(endpoint: Endpoint) -> dict[str, Any]:
    content: dict[str, Any] = {}
    if endpoint.file_field:
        files: dict[str, Any] = {"type": "string", "format": "binary"}
        if endpoint.max_instances > 1:
            files = {"type": "array", "items": files, "minItems": 1, "maxItems": endpoint.max_instances}
        properties: dict[str, Any] = {endpoint.file_field: {**files, "description": endpoint.file_description}}
        if endpoint.params_schema is not None:
            properties.update(_param_schemas(endpoint))
        content["multipart/form-data"] = {"schema": {"type": "object", "required": [endpoint.file_field],
                                                     "properties": properties}}
    if endpoint.json_schema is not None:
        content["application/json"] = {"schema": {"$ref": f"#/components/schemas/{endpoint.json_schema.__name__}"}}
    if endpoint.raw_media:
        # Documented as octet-stream, the media type generic clients send raw files with; the
        # specific image/* or audio/* types of mobile upload APIs are accepted the same way.
        kinds = " or ".join(f"{prefix}*" for prefix in endpoint.raw_media)
        content[RAW_MEDIA_TYPE] = {"schema": {"type": "string", "format": "binary", "description": (
            f"one file as the whole body; Content-Type {kinds} is accepted too")}}
    if endpoint.file_field:  # what a client sends, the files shown by name (curl -F image=@7.png)
        example_files = [f"{endpoint.file_field}-{i}.bin" for i in range(min(2, endpoint.max_instances))]
        content["multipart/form-data"]["example"] = {
            endpoint.file_field: example_files if endpoint.max_instances > 1 else example_files[0]}
    if endpoint.raw_media:
        content[RAW_MEDIA_TYPE]["example"] = "(the file's bytes)"
    if endpoint.json_schema is not None:
        examples = endpoint.json_schema.model_json_schema().get("examples")
        if examples:
            content["application/json"]["example"] = examples[0]
    for media, example in endpoint.request_examples.items():
        content.setdefault(media, {})["example"] = example
    return {"required": True, "content": content}


def _param_schemas(endpoint: Endpoint) -> dict[str, Any]:
    """The parameters' JSON schemas; the enums they use become components (``EXTRA_SCHEMAS``)."""
    assert endpoint.params_schema is not None
    schema = endpoint.params_schema.model_json_schema(ref_template="#/components/schemas/{model}")
    EXTRA_SCHEMAS.update(schema.get("$defs", {}))
    return schema["properties"]


def register(router: APIRouter, endpoint: Endpoint) -> None:
    """Add ``endpoint`` to ``router``: the route, its request body, parameters and answers."""
    responses: dict[int | str, Any] = {status: {"description": text} for status, text in PROBLEM_STATUSES.items()}
    success: dict[str, Any] = {"description": "one prediction per instance, in the order sent"}
    if endpoint.binary_media:
        success["content"] = {media: {"schema": {"type": "string", "format": "binary"}}
                              for media in endpoint.binary_media}
        success["description"] += "; " + endpoint.binary_description
    if endpoint.response_example is not None:
        success.setdefault("content", {})["application/json"] = {"example": endpoint.response_example}
    success["headers"] = ANSWER_HEADERS
    responses[200] = success
    openapi_extra: dict[str, Any] = {"requestBody": request_body_doc(endpoint),
                                     "parameters": [CORRELATION_HEADER, CONSENT_PARAMETER,
                                                    CLIENT_VERSION_PARAMETER, IDEMPOTENCY_PARAMETER]}
    if endpoint.params_schema is not None:
        openapi_extra["parameters"] += [
            {"name": name, "in": "query", "required": False, "schema": schema,
             "description": schema.get("description", "")}
            for name, schema in _param_schemas(endpoint).items()]
    predict = handler(endpoint)
    HANDLERS[endpoint.path] = predict
    router.add_api_route(endpoint.path, predict, methods=["POST"],
                         response_model=endpoint.response_schema, responses=responses,
                         summary=endpoint.summary, description=endpoint.description,
                         operation_id=endpoint.operation_id, tags=[endpoint.tag],
                         openapi_extra=openapi_extra)
    REGISTERED.append(endpoint)


@dataclass(frozen=True)
class PathRoute:
    """A prediction path with parameters, e.g. ``/v2/models/{name}/infer``, and its handler."""

    path: str  # the template: what logs and metrics read as the route
    handler: Callable[[Request], Awaitable[Response]]

    def match(self, path: str) -> dict[str, str] | None:
        """The path's parameters when ``path`` fits the template (each ``{name}`` one segment)."""
        want, got = self.path.split("/"), path.split("/")
        if len(want) != len(got):
            return None
        params = {}
        for w, g in zip(want, got, strict=True):
            if w.startswith("{"):
                if not g:
                    return None
                params[w[1:-1]] = g
            elif w != g:
                return None
        return params


class PredictionRoutes:
    """Pure ASGI, innermost of the app's own middleware: ``POST`` to a prediction endpoint's path
    (or to a :class:`PathRoute`, the V2 protocol's inference paths) goes straight to its handler,
    the same function FastAPI's route calls.

    The routes stay registered with FastAPI (the contract, any other method on those paths), but a
    prediction skips the framework's per-request work it has no use for: matching the path against
    every route, the dependency solver, two exception-handling layers and an exit stack. Problems
    are answered by the same :func:`problem_answer` as FastAPI's exception handler; anything else
    propagates to :class:`~app.core.middleware.RequestContextMiddleware` (logged, 500), as it does
    from a route."""

    def __init__(self, app: ASGIApp, endpoints: list[Endpoint], patterns: tuple[PathRoute, ...] = ()) -> None:
        self.app = app
        # path -> (what logs and metrics read as the route: its path; the handler)
        self.routes = {e.path: (_Route(e.path), HANDLERS[e.path]) for e in endpoints}
        self.patterns = patterns

    def find(self, path: str) -> tuple[Any, Callable[[Request], Awaitable[Response]], dict[str, str]] | None:
        """The route, handler and path parameters of a prediction POST to ``path``, if it is one."""
        found = self.routes.get(path)
        if found is not None:
            return found[0], found[1], {}
        for pattern in self.patterns:
            params = pattern.match(path)
            if params is not None:
                return pattern, pattern.handler, params
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self.find(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if found is None:
            await self.app(scope, receive, send)
            return
        route, predict, params = found
        scope["route"] = route
        scope["endpoint"] = predict
        if params:
            scope["path_params"] = params
        request = Request(scope, receive, send)
        try:
            response = await predict(request)
        except ProblemError as exc:
            response = problem_answer(request, exc)
        await response(scope, receive, send)


ANSWER_HEADERS = {
    "X-Request-ID": {"schema": {"type": "string"}, "description": "the request id (also request_id in "
                     "the body): the key for feedback and erasure"},
    "X-Model-Version": {"schema": {"type": "string"}, "description": "the version that answered"},
    "X-Inputs-Stored": {"schema": {"type": "string", "enum": ["true", "false"]},
                        "description": "whether the raw inputs were kept (X-Data-Consent: granted)"},
    "Server-Timing": {"schema": {"type": "string"}, "description": "decode, inference and total, in ms"},
    "Idempotent-Replayed": {"schema": {"type": "string", "enum": ["true"]},
                            "description": "the stored answer to an earlier request with this Idempotency-Key"},
}
CLIENT_VERSION_PARAMETER = {
    "name": CLIENT_VERSION_HEADER, "in": "header", "required": False,
    "schema": {"type": "string", "pattern": _CLIENT_VERSION.pattern},
    "description": "your app's release (e.g. app/1.4.2): logged with the prediction, so drift and "
                   "accuracy can be split by release (client_version on the monitoring endpoints)."}
CORRELATION_HEADER = {
    "name": "X-Request-ID", "in": "header", "required": False,
    "schema": {"type": "string", "pattern": r"^[A-Za-z0-9._:\-]{1,128}$"},
    "description": "your own correlation id: logged with the request and echoed as X-Correlation-ID. "
                   "The request id of the answer (request_id, X-Request-ID) is issued by the server."}
CONSENT_PARAMETER = {
    "name": CONSENT_HEADER, "in": "header", "required": False,
    "schema": {"type": "string", "enum": list(CONSENT_VALUES)},
    "description": "'granted' lets the service keep this request's raw inputs (files, pixels, rows) "
                   "for retraining, up to INPUT_RETENTION_DAYS, unless the operator set "
                   "STORE_INPUTS=never; without it only a summary row (prediction, confidence, "
                   "numeric features) is logged. Sent more than once, the values must agree (else "
                   "422). DELETE /v1/predictions/{request_id} erases both."}
REGISTERED: list[Endpoint] = []  # every endpoint declared, for the OpenAPI components
HANDLERS: dict[str, Callable[[Request], Awaitable[Response]]] = {}  # path -> the route's function


@dataclass(frozen=True)
class _Route:
    path: str
EXTRA_SCHEMAS: dict[str, Any] = {}  # schemas the parameters refer to (enums)
