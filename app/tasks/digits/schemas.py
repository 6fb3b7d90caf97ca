"""Request and response shapes of ``POST /v1/digits/predict`` (also what ``/docs`` shows).

The JSON body is checked by hand in the router (so each problem names ``instances[i].pixels``
precisely, and NaN or out-of-range pixels are caught); these models document it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.core.limits import DIGITS_MAX_INSTANCES as MAX_INSTANCES


class PixelsInstance(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pixels: list[list[float]] = Field(
        description="28 rows of 28 values, white digit on black as in MNIST: 0-255 integers, or "
                    "0-1 floats (used when every value is within 0..1).",
        min_length=28, max_length=28)


class ImageInstance(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_b64: str = Field(description="A PNG, JPEG, WebP, BMP or GIF file, base64-encoded (a "
                                       "`data:image/...;base64,` prefix is accepted).")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instances: list[PixelsInstance | ImageInstance] = Field(min_length=1, max_length=MAX_INSTANCES)


class DigitPrediction(BaseModel):
    digit: int = Field(ge=0, le=9)
    confidence: float = Field(ge=0.0, le=1.0, description="probability of the predicted digit")
    probabilities: list[float] = Field(min_length=10, max_length=10,
                                       description="probability of each digit 0-9")


class PredictResponse(BaseModel):
    model: str = "digits"
    version: str
    request_id: str
    predictions: list[DigitPrediction]


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its ``$defs`` inlined, so it stands alone inside ``openapi_extra``
    (FastAPI does not register models that appear only there under ``components``)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


REQUEST_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": {
                        "type": "array", "maxItems": MAX_INSTANCES,
                        "items": {"type": "string", "format": "binary"},
                        "description": "one or more image files (PNG, JPEG, WebP, BMP, GIF first "
                                       "frame): any size, dark-on-light or light-on-dark"}},
                },
            },
            "application/json": {"schema": inline_schema(PredictRequest)},
        },
    },
}
