"""Shapes every task shares: the prediction envelope and the problem (error) document."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Envelope(BaseModel):
    """Every prediction answer: which model and version answered, the request id (the key to this
    prediction for feedback), and one prediction per instance in the order sent. Each task
    subclasses it with its own ``predictions`` item."""

    model_config = ConfigDict(protected_namespaces=())

    model: str = Field(description="the task's model, or the operation for fit and palette")
    version: str = Field(description="the model version (or the algorithm's version) that answered; "
                                     "also in the X-Model-Version header")
    request_id: str = Field(pattern=r"^[0-9a-f]{32}$", description="issued by the server; also in the "
                            "X-Request-ID header; the key for POST /v1/feedback")
    predictions: list[Any]


class ClassProbability(BaseModel):
    label: str
    probability: float = Field(ge=0.0, le=1.0)


def class_list(probabilities: dict[str, float]) -> list[dict[str, Any]]:
    """``{label: probability}`` as ``[{"label", "probability"}]``, in the model's label order."""
    return [{"label": label, "probability": p} for label, p in probabilities.items()]


class Problem(BaseModel):
    """An RFC 9457 problem (``application/problem+json``)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="URI naming the kind of problem (ends with `code`)")
    title: str
    status: int = Field(ge=400, le=599)
    detail: str = Field(description="what is wrong, naming the field")
    code: str = Field(description="short kebab-case identifier, e.g. `blank-image`")
    field: str | None = Field(None, description="the input to blame, e.g. `image[2]`")
    instance: str | None = Field(None, description="the request path")
    request_id: str | None = None


class Liveness(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok"}]})

    status: str


class Readiness(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "status": "ready",
        "models": {"digits": {"ready": True, "version": "1.0.1", "error": None, "load_seconds": 0.01}},
        "gates": {"heavy": {"running": 0, "waiting": 0, "concurrency": 1, "queue": 2, "saturated": False}}}]})

    status: str = Field(description="`ready`, or `degraded` while the prediction log's database is "
                        "down (predictions are answered; their rows wait in memory, bounded)")
    models: dict[str, dict[str, Any]] = Field(description="per task: ready, version, error, load_seconds")
    gates: dict[str, dict[str, Any]] = Field(description="per kind of work: running, waiting, saturated")
    places: dict[str, int] | None = Field(None, description="the dyno's places for big requests (0: not "
                                          "bounded), those this worker holds, and its refusals for want "
                                          "of one")
    model_calls: dict[str, int] | None = Field(None, description="this worker's model calls made "
                                               "together on the event loop: `groups` run, `calls` "
                                               "made in them (calls / groups is the mean group size) "
                                               "and those of them `batched`: answered by one call on "
                                               "their rows joined (a batchable model)")
    prediction_log: dict[str, Any] | None = Field(None, description="database (`ok` or `unavailable`), "
                                                  "buffered_rows, buffered_input_bytes")


class LimitRow(BaseModel):
    applies_to: str
    what: str
    value: str
    refusal: str = Field(description="status and problem code beyond the limit")
    setting: str = Field(description="the environment variable that sets it, if any")


class ModelVersions(BaseModel):
    primary: str | None = Field(description="the version that answers (MODEL_VERSIONS, else the latest)")
    shadow: str | None = Field(None, description="the version predicting every request after its "
                               "answer (SHADOW_VERSIONS), logged apart; null when none")
    shadow_ready: bool | None = None
    shadow_error: str | None = None
    available: list[str] = Field(description="every version under models/<task>/, oldest first")
    pinned: bool = Field(description="whether MODEL_VERSIONS names the primary version")


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=(), json_schema_extra={"examples": [{
        "name": "digits", "task": "digits", "version": "1.0.1", "ready": True, "labels": [str(d) for d in range(10)],
        "limits": [], "on_device": {"artifact": {"url": "/v1/models/digits/artifact", "file": "model.tflite",
                                                 "sha256": "9f2c...", "bytes": 796000,
                                                 "media_type": "application/octet-stream",
                                                 "runtime": "LiteRT (TensorFlow Lite)"},
                                    "parity": "/v1/models/digits/parity", "preprocessing": {}}}]})

    name: str
    task: str
    version: str | None
    ready: bool
    error: str | None = None
    labels: list[str] | None = None
    card: dict[str, Any] | None = Field(None, description="what the model is for, where the version says: "
                                        "languages, the data it was trained on, its licence, its figures "
                                        "on held-out data per data set, and its model card")
    limits: list[LimitRow] = Field(description="the limits this task's endpoints enforce (as in the README)")
    versions: ModelVersions | None = None
    on_device: dict[str, Any] | None = Field(None, description="GET /v1/models/{name} only: the artifact an "
                                             "app can run itself (url, file, sha256, bytes, media_type, "
                                             "runtime), the preprocessing to reproduce and the parity set's url")


class ModelList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"models": [{
        "name": "digits", "task": "digits", "version": "1.0.1", "ready": True,
        "labels": [str(d) for d in range(10)],
        "limits": [{"applies_to": "digits", "what": "images or instances per request", "value": "1-256",
                    "refusal": "422 `too-many-instances`", "setting": ""}]}]}]})

    models: list[ModelInfo]


class ParityTensor(BaseModel):
    shape: list[int]
    dtype: str
    data: list[float] = Field(description="the values, row-major")


class ParityCase(BaseModel):
    input: ParityTensor
    output: ParityTensor


class ParitySet(BaseModel):
    model_config = ConfigDict(protected_namespaces=(), json_schema_extra={"examples": [{
        "model": "digits", "version": "1.0.1", "artifact_sha256": "9f2c...", "tolerance": 1e-5,
        "cases": [{"input": {"shape": [1, 28, 28, 1], "dtype": "float32", "data": [0.0, 0.1]},
                   "output": {"shape": [1, 10], "dtype": "float32", "data": [0.01, 0.9]}}]}]})

    model: str
    version: str
    artifact_sha256: str | None
    tolerance: float = Field(description="the largest difference an app's runtime should show")
    cases: list[ParityCase]
