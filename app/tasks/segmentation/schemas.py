"""Parameters and response shapes of the segmentation endpoint."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from app.core.schemas import Envelope


class MaskFormat(StrEnum):
    png = "png"
    json = "json"
    overlay = "overlay"


class SegmentationParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: MaskFormat = Field(MaskFormat.png, description=(
        "png: the binary mask of one image (255 = membrane); json: the envelope with each mask as a "
        "base64 PNG; overlay: the mask tinted red over one image"))
    threshold: float | None = Field(None, gt=0.0, lt=1.0, description=(
        "membrane probability threshold; default: the one tuned on validation data (in GET /v1/models)"))


class SegmentationPrediction(BaseModel):
    width: int = Field(description="mask width in pixels (= the input's)")
    height: int = Field(description="mask height in pixels (= the input's)")
    membrane_fraction: float = Field(ge=0.0, le=1.0, description="fraction of pixels predicted as membrane")
    threshold: float = Field(description="probability threshold used for the mask")
    mask_png_b64: str = Field(description="the mask as a base64 PNG, 8-bit grayscale, the input's size: "
                                          "255 = membrane, 0 = background")


class SegmentationPredictResponse(Envelope):
    predictions: list[SegmentationPrediction]
