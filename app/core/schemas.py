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

    status: str
    models: dict[str, dict[str, Any]] = Field(description="per task: ready, version, error, load_seconds")
    gates: dict[str, dict[str, Any]] = Field(description="per kind of work: running, waiting, saturated")


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
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str
    task: str
    version: str | None
    ready: bool
    error: str | None = None
    labels: list[str] | None = None
    limits: list[LimitRow] = Field(description="the limits this task's endpoints enforce (as in the README)")
    versions: ModelVersions | None = None


class ModelList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"models": [{
        "name": "digits", "task": "digits", "version": "1.0.1", "ready": True,
        "labels": [str(d) for d in range(10)],
        "limits": [{"applies_to": "digits", "what": "images or instances per request", "value": "1-256",
                    "refusal": "422 `too-many-instances`", "setting": ""}]}]}]})

    models: list[ModelInfo]
