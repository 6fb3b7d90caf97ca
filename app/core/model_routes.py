"""``/v1/models``: what is served, and what an app needs to run a model on its own device.

- ``GET /v1/models`` and ``GET /v1/models/{name}``: version, spec, labels, metrics, limits,
  versions; for one model also ``on_device``: the artifact, the preprocessing to reproduce, the
  parity set's address.
- ``GET /v1/models/{name}/artifact``: the served ``.tflite`` (``model.json`` for clustering) with
  ``ETag`` (its SHA-256), ``Cache-Control``, and ``304`` on a matching ``If-None-Match``.
- ``GET /v1/models/{name}/parity``: a few inputs in the artifact's input space with what the
  server's runtime answers for them, so an app can check that its runtime gives the same.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from app.core.errors import ProblemError
from app.core.limits_table import limits_for
from app.core.registry import ModelRegistry, ServedModel
from app.core.schemas import ModelInfo, ModelList, ParitySet

router = APIRouter(tags=["models"])
ARTIFACT_CACHE = "public, max-age=300, must-revalidate"  # a new version is seen within minutes


def registry_of(request: Request) -> ModelRegistry:
    return request.app.state.registry


def info(request: Request, task: str) -> dict[str, Any]:
    registry = registry_of(request)
    slot = registry.slots[task]
    state = request.app.state
    extra = {"limits": limits_for(task, state.task_media.get(task, ""), state.limits_table),
             "versions": registry.versions(task)}
    if slot.model is not None:
        return {**slot.model.describe(), "ready": True, **extra}
    return {"name": task, "task": task, "version": slot.version, "ready": False, "error": slot.error, **extra}


def served(request: Request, name: str) -> ServedModel:
    registry = registry_of(request)
    if name not in registry.slots:
        raise ProblemError(404, "unknown-model", f"name: no model named {name!r}; models: "
                           f"{', '.join(registry.slots)}.", field="name")
    return registry.get(name)  # 503 while it is not loaded


def artifact_of(request: Request, name: str) -> tuple[ServedModel, Any]:
    model = served(request, name)
    path = model.artifact()
    if path is None:
        raise ProblemError(404, "no-artifact", f"{name} has no artifact an app can run itself.", field="name")
    return model, path


@router.get("/v1/models", operation_id="models_list", response_model=ModelList)
async def list_models(request: Request) -> dict[str, Any]:
    """Every task: the version serving it, input/output spec, labels, training metrics, created
    and the limits its endpoints enforce, or why it is not loaded; and its versions: which is
    primary (answers), which shadow (predicts after the answer, logged apart) and which are
    available to pin with MODEL_VERSIONS / SHADOW_VERSIONS."""
    return {"models": [info(request, task) for task in registry_of(request).slots]}


@router.get("/v1/models/{name}", operation_id="models_describe", response_model=ModelInfo,
            responses={404: {"description": "no model of that name"}, 503: {"description": "not loaded"}})
async def get_model(request: Request, name: str) -> dict[str, Any]:
    """One model as in the list, with ``on_device``: its artifact (address, SHA-256, size, runtime),
    the preprocessing an app must reproduce, and the address of its parity set."""
    model = served(request, name)
    return {**info(request, name), "on_device": model.on_device()}


@router.get("/v1/models/{name}/artifact", operation_id="models_artifact",
            responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                                                      "example": "(the .tflite file's bytes)"},
                                         "application/json": {"example": {"format": "kmeans-nearest-centroid/1",
                                                                          "features": ["annual_income", "spending_score"]}}},
                             "description": "the served model file; ETag is its SHA-256"},
                       304: {"description": "the If-None-Match ETag is the served file's"},
                       404: {"description": "no model of that name, or none with an artifact"},
                       503: {"description": "not loaded"}})
async def get_artifact(request: Request, name: str) -> Response:
    """The file the model is served from, for an app to run it on the device (LiteRT for the
    ``.tflite`` models). Revalidate with ``If-None-Match``: a new version has a new ETag."""
    model, path = artifact_of(request, name)
    etag = f'"{model.artifact_sha256}"'
    headers = {"ETag": etag, "Cache-Control": ARTIFACT_CACHE, "X-Model-Version": model.version}
    wanted = request.headers.get("if-none-match", "")
    if etag in [tag.strip() for tag in wanted.split(",")] or wanted.strip() == "*":
        return Response(status_code=304, headers=headers)
    return FileResponse(path, media_type=model.artifact_media_type(), headers=headers,
                        filename=f"{name}-{model.version}{path.suffix}")


def _tensor(array: np.ndarray) -> dict[str, Any]:
    return {"shape": list(array.shape), "dtype": str(array.dtype), "data": array.reshape(-1).tolist()}


@router.get("/v1/models/{name}/parity", operation_id="models_parity", response_model=ParitySet,
            responses={404: {"description": "no model of that name, or none with an artifact"},
                       503: {"description": "not loaded"}})
async def get_parity(request: Request, name: str) -> dict[str, Any]:
    """Inputs in the artifact's own input space (the same every time) and the outputs the server's
    runtime gives for them: an app that runs the artifact should get the same, to about 1e-5."""
    model, _ = artifact_of(request, name)
    inputs = model.parity_inputs()
    outputs = model.parity_outputs(inputs)
    return {"model": name, "version": model.version, "artifact_sha256": model.artifact_sha256,
            "tolerance": 1e-5, "cases": [{"input": _tensor(np.asarray(x)), "output": _tensor(np.asarray(y))}
                                        for x, y in zip(inputs, outputs, strict=True)]}
