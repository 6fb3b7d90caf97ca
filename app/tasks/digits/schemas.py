"""Request and response shapes of ``POST /v1/digits/predict`` (the contract ``/docs`` shows)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.core.limits import DIGITS_MAX_INSTANCES as MAX_INSTANCES
from app.core.schemas import ClassProbability, Envelope

LABELS = [str(d) for d in range(10)]
Row = Annotated[list[Annotated[float, Field(strict=True, allow_inf_nan=False)]],
                Field(min_length=28, max_length=28)]


class DigitsInstance(BaseModel):
    """Exactly one of ``pixels`` or ``image_b64``."""

    model_config = ConfigDict(extra="forbid")

    pixels: list[Row] | None = Field(
        None, min_length=28, max_length=28,
        description="28 rows of 28 values, white digit on black as in MNIST: 0-255, or 0-1 floats "
                    "(used when every value is within 0..1)")
    image_b64: str | None = Field(None, description="a PNG, JPEG, WebP, BMP or GIF file, base64-encoded "
                                                    "(a `data:image/...;base64,` prefix is accepted)")

    @model_validator(mode="after")
    def _exactly_one(self) -> DigitsInstance:
        if (self.pixels is None) == (self.image_b64 is None):
            raise ValueError('give exactly one of "pixels" or "image_b64"')
        return self


class DigitsPredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"instances": [{"image_b64": "data:image/png;base64,iVBORw0KGgo..."}]}]})

    instances: list[DigitsInstance] = Field(min_length=1, json_schema_extra={"maxItems": MAX_INSTANCES})


class DigitPrediction(BaseModel):
    label: str = Field(description="the digit, as a string like every classifier's label")
    digit: int = Field(ge=0, le=9, description="the same digit as an integer")
    confidence: float = Field(ge=0.0, le=1.0, description="probability of the predicted digit")
    probabilities: dict[str, float] = Field(description="probability of each digit '0'..'9'")
    classes: list[ClassProbability] = Field(description="the same probabilities as a list, digits in order: "
                                                        "typed fields for generated clients")


class DigitsPredictResponse(Envelope):
    predictions: list[DigitPrediction]
