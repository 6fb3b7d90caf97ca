"""Response and query schemas of the segmentation endpoint."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field


class MaskFormat(StrEnum):
    png = "png"
    json = "json"
    overlay = "overlay"


class SegmentationResult(BaseModel):
    """``?format=json``: the mask as a base64 PNG plus what a client needs to use it."""

    width: int = Field(description="mask width in pixels (= the input's)")
    height: int = Field(description="mask height in pixels (= the input's)")
    foreground_fraction: float = Field(description="fraction of pixels predicted as membrane")
    threshold: float = Field(description="probability threshold used for the mask")
    mask_png_b64: str = Field(description="base64 PNG, 8-bit grayscale: 255 = membrane, 0 = background")
    model: str
    version: str
    request_id: str
