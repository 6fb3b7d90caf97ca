"""``POST /v1/segmentation/predict``: an EM image in, a membrane mask of the same size out."""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.responses import Response
from PIL import Image

from app.core.codecs.image import load_image, open_image
from app.core.errors import ProblemError
from app.core.execution import execution_of
from app.core.limits import SEGMENTATION_MAX_SIDE as MAX_SIDE
from app.core.registry import model_dependency
from app.core.uploads import read_upload
from app.monitoring.log import log_predictions
from app.tasks.segmentation.model import SegmentationModel
from app.tasks.segmentation.preprocess import overlay, to_gray_u8, to_grayscale
from app.tasks.segmentation.schemas import MaskFormat, SegmentationResult

router = APIRouter(prefix="/v1/segmentation", tags=["segmentation"])

IMAGE_FORMATS = frozenset({"PNG", "JPEG", "TIFF"})
PNG_RESPONSE = {"content": {"image/png": {}}, "description": "the mask (or overlay) as a PNG"}


@dataclass
class Segmentation:
    mask: np.ndarray
    features: dict[str, float]
    compute_ms: float
    picture: bytes  # the response image (mask or overlay PNG); the mask PNG for format=json


def segment(data: bytes, model: SegmentationModel, threshold: float, max_pixels: int,
            output_format: MaskFormat) -> Segmentation:
    """Check the header against the limits, decode, run the tiled U-Net, threshold and encode the
    answer (blocking: runs on the heavy gate's thread, stopping between tiles at the deadline)."""
    image = open_image(data, "image", max_pixels=max_pixels, formats=IMAGE_FORMATS)
    if image.width > MAX_SIDE or image.height > MAX_SIDE:
        raise ProblemError(413, "image-too-large", f"image is {image.width}x{image.height} pixels; "
                           f"each side may be at most {MAX_SIDE}.", field="image", max_side=MAX_SIDE)
    image = load_image(image, "image")
    started = time.perf_counter()
    gray = to_gray_u8(image)
    if gray is None:  # 16-bit or float images keep their precision
        gray = to_grayscale(image)
    del image
    result = model.segment(gray, threshold)
    compute_ms = (time.perf_counter() - started) * 1000.0
    if output_format is MaskFormat.overlay:
        scaled = gray.astype(np.float32) / 255.0 if gray.dtype == np.uint8 else gray
        picture = png_bytes(overlay(scaled, result.mask))
    else:
        picture = png_bytes(Image.fromarray(result.mask, mode="L"))
    return Segmentation(result.mask, result.features, compute_ms, picture)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


@router.post(
    "/predict",
    response_model=SegmentationResult,
    responses={200: PNG_RESPONSE, 413: {"description": "file or image too large"},
               415: {"description": "not a PNG, JPEG or TIFF"},
               422: {"description": "empty or corrupt image, threshold out of (0, 1)"}},
    summary="Membrane mask of an EM image",
)
async def predict(
    request: Request,
    response: Response,
    image: Annotated[UploadFile, File(description="PNG, JPEG or TIFF; grayscale or RGB; each side "
                                                  f"at most {MAX_SIDE} pixels")],
    model: Annotated[SegmentationModel, Depends(model_dependency("segmentation"))],
    output_format: Annotated[MaskFormat, Query(alias="format", description=(
        "png: the binary mask (255 = membrane); json: the mask as base64 PNG with its size and "
        "foreground fraction; overlay: the mask tinted red over the image"))] = MaskFormat.png,
    threshold: Annotated[float | None, Query(gt=0.0, lt=1.0, description=(
        "membrane probability threshold; default: the one tuned on validation data"))] = None,
) -> Response | SegmentationResult:
    """Segment cell membranes: the mask has exactly the input's width and height; 255 = membrane.

    Images of any size are cut into overlapping tiles (reflect padding, centre of each tile kept).
    """
    settings = model.settings
    data = await read_upload(image, "image", settings.max_upload_bytes)
    cut = model.threshold if threshold is None else threshold
    max_pixels = min(settings.max_image_pixels, MAX_SIDE * MAX_SIDE)
    result = await execution_of(request).run(request, "heavy", segment, data, model, cut,
                                             max_pixels, output_format)
    log_predictions(request, model, [{"prediction": "mask",
                                      "confidence": result.features["mean_certainty"],
                                      "features": result.features}],
                    latency_ms=result.compute_ms, raw_inputs=[data])

    headers = {"X-Model-Version": model.version,
               "X-Foreground-Fraction": f"{result.features['foreground_fraction']:.6f}"}
    if output_format is not MaskFormat.json:
        return Response(result.picture, media_type="image/png", headers=headers)
    mask_png = result.picture
    response.headers.update(headers)
    return SegmentationResult(
        width=result.mask.shape[1], height=result.mask.shape[0],
        foreground_fraction=result.features["foreground_fraction"], threshold=cut,
        mask_png_b64=base64.b64encode(mask_png).decode("ascii"), model=model.task,
        version=model.version, request_id=getattr(request.state, "request_id", ""))
