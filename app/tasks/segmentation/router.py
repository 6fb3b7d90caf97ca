"""``POST /v1/segmentation/predict``: EM images in, membrane masks of the same size out.

``format=png`` (default) and ``overlay`` answer one PNG for one image; ``format=json`` answers the
envelope with a mask per image (up to 4). Each image's size is checked from its header before it is
decoded; the U-Net runs tile by tile on the heavy gate and stops between tiles at the deadline.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from fastapi import APIRouter
from PIL import Image

from app.core.codecs.image import load_image, open_image
from app.core.errors import ProblemError
from app.core.execution import checkpoint
from app.core.limits import SEGMENTATION_MAX_INSTANCES as MAX_INSTANCES
from app.core.limits import SEGMENTATION_MAX_SIDE as MAX_SIDE
from app.core.pipeline import Endpoint, Job, Outcome, register
from app.tasks.segmentation.preprocess import overlay, to_gray_u8, to_grayscale
from app.tasks.segmentation.schemas import (
    MaskFormat,
    SegmentationParams,
    SegmentationPredictResponse,
)

router = APIRouter()
IMAGE_FORMATS = frozenset({"PNG", "JPEG", "TIFF"})


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def run(job: Job) -> Outcome:
    params: SegmentationParams = job.params
    model = job.model
    threshold = model.threshold if params.threshold is None else params.threshold
    if params.format is not MaskFormat.json and len(job.instances) > 1:
        raise ProblemError(422, "too-many-instances", f"format={params.format.value} answers one image; "
                           f"got {len(job.instances)}. Use format=json for several.", field="format")
    with job.timing.measure("decode"):  # the same per-image limit as every task, then the side limit
        images = [open_image(i.data, i.field, max_pixels=job.settings.max_image_pixels, formats=IMAGE_FORMATS)
                  for i in job.instances]
        for instance, image in zip(job.instances, images, strict=True):
            if image.width > MAX_SIDE or image.height > MAX_SIDE:
                raise ProblemError(413, "image-too-large", f"{instance.field} is {image.width}x"
                                   f"{image.height} pixels; each side may be at most {MAX_SIDE}.",
                                   field=instance.field, max_side=MAX_SIDE)
    predictions, rows = [], []
    picture = None
    arrays: list[dict[str, np.ndarray]] = []
    for instance, image in zip(job.instances, images, strict=True):
        checkpoint()
        with job.timing.measure("decode"):
            image = load_image(image, instance.field)
            gray = to_gray_u8(image)
            if gray is None:  # 16-bit or float images keep their precision
                gray = to_grayscale(image)
            del image
        with job.timing.measure("inference"):
            result = model.segment(gray, threshold, keep_probability="probability" in job.tensors)
        if job.tensors:  # the V2 protocol: the arrays themselves, no PNG
            arrays.append({"mask": result.mask, "probability": result.probability})
        elif params.format is MaskFormat.overlay:
            scaled = gray.astype(np.float32) / 255.0 if gray.dtype == np.uint8 else gray
            picture = png_bytes(overlay(scaled, result.mask))
        else:
            picture = png_bytes(Image.fromarray(result.mask, mode="L"))
        features = result.features
        rows.append({"prediction": "mask", "confidence": features["mean_certainty"], "features": features})
        prediction = {"width": int(result.mask.shape[1]), "height": int(result.mask.shape[0]),
                      "membrane_fraction": round(features["foreground_fraction"], 6), "threshold": threshold}
        if picture is not None:
            prediction["mask_png_b64"] = base64.b64encode(picture).decode("ascii")
        predictions.append(prediction)
    raw = [i.data for i in job.instances]
    if job.tensors:
        return Outcome(predictions, rows, raw_inputs=raw, arrays=arrays)
    if params.format is MaskFormat.json:
        return Outcome(predictions, rows, raw_inputs=raw)
    headers = {"X-Foreground-Fraction": f"{predictions[0]['membrane_fraction']:.6f}"}
    return Outcome(predictions, rows, raw_inputs=raw, binary=(picture, "image/png"), headers=headers)


register(router, Endpoint(
    operation_id="segmentation_predict", path="/v1/segmentation/predict", tag="segmentation",
    model="segmentation", summary="Membrane masks of EM images",
    description="Segments cell membranes: each mask has exactly its input's width and height; 255 = "
                "membrane. Images of any size up to 2048 px a side are cut into overlapping tiles "
                "(reflect padding, the centre of each tile kept).",
    run=run, response_schema=SegmentationPredictResponse, gate="heavy",
    file_field="image", file_description=f"PNG, JPEG or TIFF; grayscale or RGB; each side at most "
                                         f"{MAX_SIDE} px", raw_media=("image/",),
    params_schema=SegmentationParams, max_instances=MAX_INSTANCES,
    binary_media=("image/png",), binary_description="with format=png or overlay: one PNG (the mask, "
                                                     "or the mask over the image), X-Foreground-Fraction",
    response_example={"model": "segmentation", "version": "1.0.0",
                      "request_id": "019ab2c3d4e5f60718293a4b5c6d7e8f",
                      "predictions": [{"width": 512, "height": 512, "membrane_fraction": 0.21,
                                       "threshold": 0.45, "mask_png_b64": "iVBORw0KGgo..."}]},
))
