"""The REST side of the Open Inference Protocol (KServe V2), beside v1, on the same request path.

``POST /v2/models/{name}[/versions/{version}]/infer`` goes through :func:`app.core.pipeline.execute`
with the v1 endpoint of the model: the same access check, admission gate, deadline, decoding,
preprocessing, limits, prediction log, drift features and metrics. Only the reading of tensors and
the writing of outputs differ. Errors are the protocol's ``{"error": "..."}``: 400 for a bad request
(v1's 422s included), 404 for an unknown model or version, 503 when the model is not loaded or the
worker is busy, and v1's other statuses (401, 408, 413, 415, 429) as they are.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.core.errors import ProblemError, v2_error
from app.core.limits import JSON_INLINE_MAX_BYTES
from app.core.pipeline import (
    CONSENT_PARAMETER,
    IDEMPOTENCY_PARAMETER,
    EXTRA_SCHEMAS,
    REGISTERED,
    Endpoint,
    PathRoute,
    Read,
    execute,
    read_body,
)
from app.core.registry import ServedModel
from app.openinference.models import V2_MODELS, V2Model
from app.openinference.protocol import (
    HEADER_LENGTH,
    ErrorBody,
    InferenceRequest,
    InferenceRequestBody,
    InferenceResponse,
    Live,
    ModelMetadata,
    ModelReady,
    Ready,
    ServerMetadata,
    V2Error,
    encode_response,
    header_size,
    parse_request,
)

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])
INLINE_OUTPUT_ELEMENTS = 1 << 14  # smaller answers are encoded on the event loop: a thread costs more
EXTENSIONS = ["binary_tensor_data"]
ERRORS = {status: {"model": ErrorBody, "description": text} for status, text in {
    400: "a malformed request or an invalid input", 404: "no such model or version",
    503: "the model is not loaded, or the worker is busy (Retry-After)"}.items()}


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def from_problem(exc: ProblemError) -> JSONResponse:
    status, body = v2_error(exc.status, exc.code, exc.detail)
    return JSONResponse(body, status_code=status, headers=exc.headers)


def _spec(name: str) -> V2Model:
    spec = V2_MODELS.get(name)
    if spec is None:
        raise V2Error(404, f"unknown model '{name}'; models: {', '.join(V2_MODELS)}")
    return spec


def _model(request: Request, spec: V2Model, version: str | None) -> ServedModel:
    slot = request.app.state.registry.slots.get(spec.name)
    if version is not None and (slot is None or version not in slot.available_versions):
        raise V2Error(404, f"model '{spec.name}' has no version '{version}'")
    if slot is None or slot.model is None:
        reason = slot.error if slot is not None else "not loaded"
        raise V2Error(503, f"model '{spec.name}' is not ready ({reason})", {"Retry-After": "30"})
    if version is not None and version != slot.model.version:
        raise V2Error(404, f"model '{spec.name}' version '{version}' is not served; it serves "
                           f"'{slot.model.version}'")
    return slot.model


def _endpoint(spec: V2Model) -> Endpoint:
    return next(e for e in REGISTERED if e.operation_id == spec.operation_id)


@router.get("", response_model=ServerMetadata, operation_id="v2_server_metadata",
            summary="Server metadata")
async def server_metadata(request: Request) -> ServerMetadata:
    return ServerMetadata(name="ml-inference-service", version=request.app.version, extensions=EXTENSIONS)


@router.get("/health/live", response_model=Live, operation_id="v2_server_live", summary="Server liveness")
async def live() -> Live:
    return Live(live=True)


@router.get("/health/ready", response_model=Ready, operation_id="v2_server_ready",
            summary="Server readiness: every model loaded", responses={503: ERRORS[503]})
async def ready(request: Request) -> Any:
    registry = request.app.state.registry
    if not registry.ready:
        missing = [task for task, slot in registry.slots.items() if not slot.ready]
        return error(503, f"not ready: {', '.join(missing)} not loaded")
    return Ready(ready=True)


def _metadata(request: Request, name: str, version: str | None) -> Any:
    try:
        spec = _spec(name)
        model = _model(request, spec, version)
    except V2Error as exc:
        return error(exc.status, exc.message, exc.headers)
    return ModelMetadata(name=spec.name, versions=[model.version], platform=spec.platform,
                         inputs=list(spec.inputs), outputs=spec.outputs_of(model), parameters=spec.parameters(model))


def _config(request: Request, name: str, version: str | None) -> Any:
    try:
        spec = _spec(name)
        model = _model(request, spec, version)
    except V2Error as exc:
        return error(exc.status, exc.message, exc.headers)
    return JSONResponse(spec.config(model))


def _ready(request: Request, name: str, version: str | None) -> Any:
    try:
        _model(request, _spec(name), version)
    except V2Error as exc:
        return error(exc.status, exc.message, exc.headers)
    return ModelReady(name=name, ready=True)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    try:
        spec = _spec(name)
        model = _model(request, spec, version)
        endpoint = _endpoint(spec)
        parsed: dict[str, Any] = {}

        async def read(request: Request, endpoint: Endpoint, settings: Any) -> Read:
            header_length = request.headers.get(HEADER_LENGTH)
            body = await read_body(request, None if header_length is not None else settings.max_json_bytes)
            limits = spec.max_elements()

            def parse(raw: bytes) -> InferenceRequest:
                return parse_request(raw, header_length, limits, settings.max_json_bytes)

            if header_size(body, header_length) <= JSON_INLINE_MAX_BYTES:
                inference = parse(body)
            else:  # parsing a large JSON part takes time and memory: off the event loop
                inference = await asyncio.to_thread(parse, body)
            parsed["request"] = inference
            parsed["wanted"] = wanted = _wanted(spec, inference)
            instances, params = spec.to_job(inference, model)
            return Read(instances, params, tensors=frozenset(wanted))

        served = await execute(request, endpoint, read)
        inference, wanted = parsed["request"], parsed["wanted"]
        outputs = [o for o in spec.to_outputs(served.outcome, model, set(wanted)) if o.name in wanted]
        binary = {o.name: bool(wanted[o.name] if wanted[o.name] is not None else inference.binary_output)
                  for o in outputs}
        response = InferenceResponse(model_name=spec.name, model_version=served.version,
                                     id=inference.id if inference.id is not None else request.state.request_id,
                                     outputs=[])
        if sum(o.array.size for o in outputs) <= INLINE_OUTPUT_ELEMENTS:
            body, headers = encode_response(response, outputs, binary)
        else:  # off the event loop: a large output takes a while to serialise
            body, headers = await asyncio.to_thread(encode_response, response, outputs, binary)
        return Response(body, headers={**served.headers, **headers}, background=served.background())
    except V2Error as exc:
        return error(exc.status, exc.message, exc.headers)
    except ProblemError as exc:
        return from_problem(exc)


def _wanted(spec: V2Model, inference: InferenceRequest) -> dict[str, bool | None]:
    """Output name -> its ``binary_data`` parameter (None: the request's default)."""
    known = {o.name for o in spec.outputs}
    if not inference.outputs:  # none named (or an empty list): the model's default outputs
        return dict.fromkeys(spec.default_outputs)
    wanted: dict[str, bool | None] = {}
    for output in inference.outputs:
        if output.name not in known:
            raise V2Error(400, f"unknown output '{output.name}'; this model has {', '.join(sorted(known))}")
        flag = output.parameters.get("binary_data")
        wanted[output.name] = None if flag is None else bool(flag)
    return wanted


_request_schema = InferenceRequestBody.model_json_schema(ref_template="#/components/schemas/{model}")
EXTRA_SCHEMAS.update(_request_schema.pop("$defs", {}))
EXTRA_SCHEMAS["InferenceRequestBody"] = _request_schema
INFER_DOC: dict[str, Any] = {
    "parameters": [CONSENT_PARAMETER, IDEMPOTENCY_PARAMETER],
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequestBody"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description": (
            "binary tensor extension: Inference-Header-Content-Length bytes of the JSON request, then "
            "each binary input's bytes")}, "example": "(the JSON request's bytes, then the tensors' bytes)"}}},
}


def _routes(suffix: str, operation: str, versioned: bool) -> None:
    if versioned:
        async def infer(request: Request, name: str, version: str) -> Response:
            return await _infer(request, name, version)

        async def metadata(request: Request, name: str, version: str) -> Any:
            return _metadata(request, name, version)

        async def model_ready(request: Request, name: str, version: str) -> Any:
            return _ready(request, name, version)

        async def config(request: Request, name: str, version: str) -> Any:
            return _config(request, name, version)
    else:
        async def infer(request: Request, name: str) -> Response:  # type: ignore[misc]
            return await _infer(request, name, None)

        async def metadata(request: Request, name: str) -> Any:  # type: ignore[misc]
            return _metadata(request, name, None)

        async def model_ready(request: Request, name: str) -> Any:  # type: ignore[misc]
            return _ready(request, name, None)

        async def config(request: Request, name: str) -> Any:  # type: ignore[misc]
            return _config(request, name, None)

    router.add_api_route(f"/models/{{name}}{suffix}", metadata, methods=["GET"],
                         response_model=ModelMetadata, responses={404: ERRORS[404], 503: ERRORS[503]},
                         operation_id=f"v2_model_metadata{operation}",
                         summary="Model metadata: tensors, version, labels")
    router.add_api_route(f"/models/{{name}}{suffix}/config", config, methods=["GET"],
                         responses={200: {"description": "the model's configuration in Triton's JSON form "
                                                         "(max_batch_size, input and output dims), for "
                                                         "Triton's tools", "content": {"application/json": {
                                                             "example": {"name": "digits", "max_batch_size": 256,
                                                                         "input": [{"name": "pixels", "data_type": "TYPE_FP32", "dims": [28, 28]}]}}}},
                                    404: ERRORS[404], 503: ERRORS[503]},
                         operation_id=f"v2_model_config{operation}", summary="Model configuration (Triton's form)")
    router.add_api_route(f"/models/{{name}}{suffix}/ready", model_ready, methods=["GET"], response_model=ModelReady,
                         responses={404: ERRORS[404], 503: ERRORS[503]},
                         operation_id=f"v2_model_ready{operation}", summary="Model readiness")
    router.add_api_route(f"/models/{{name}}{suffix}/infer", infer, methods=["POST"],
                         response_model=InferenceResponse, responses=ERRORS,
                         operation_id=f"v2_infer{operation}", summary="Inference (JSON or binary tensors)",
                         openapi_extra=INFER_DOC)


_routes("", "", versioned=False)
_routes("/versions/{version}", "_version", versioned=True)


async def _infer_fast(request: Request) -> Response:
    params = request.path_params
    return await _infer(request, params["name"], params.get("version"))


# The inference paths on the prediction fast path (app.core.dispatch), as v1's are.
INFER_ROUTES = (PathRoute("/v2/models/{name}/infer", _infer_fast),
                PathRoute("/v2/models/{name}/versions/{version}/infer", _infer_fast))
