"""``POST /v1/digits/predict``: handwritten digits in, a digit with probabilities out, per instance.

Two request shapes, told apart by the Content-Type:

- ``multipart/form-data``: one or more image files in the field ``image``;
- ``application/json``: ``{"instances": [{"pixels": [[...]]} | {"image_b64": "..."}, ...]}``.

Every instance is decoded and normalised (``preprocess``) off the event loop, then all of them go
through the model in one batch. A problem with one instance fails the request with a problem naming
it (``image[2]``, ``instances[3].pixels``); nothing is guessed.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from PIL import Image
from PIL.Image import Image as PILImage
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from app.core.codecs.image import check_request_pixels, load_image, open_image
from app.core.config import Settings
from app.core.errors import ProblemError
from app.core.execution import checkpoint, execution_of
from app.core.limits import MAX_REQUEST_PIXELS
from app.core.registry import model_dependency
from app.core.uploads import read_upload
from app.monitoring.log import log_predictions
from app.tasks.digits.model import DigitsModel
from app.tasks.digits.preprocess import (
    DigitInputError,
    PreparedDigit,
    prepare_image,
    prepare_pixels,
    summary_features,
)
from app.tasks.digits.schemas import (
    MAX_INSTANCES,
    REQUEST_BODY_DOC,
    DigitPrediction,
    PredictResponse,
)

router = APIRouter(prefix="/v1/digits", tags=["digits"])

IMAGE_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP", "GIF"})
INSTANCE_KEYS = ("pixels", "image_b64")


@dataclass(frozen=True)
class RawInstance:
    """One input as received: image bytes or a pixels array, and the field that names it."""

    field: str
    image_bytes: bytes | None = None
    pixels: Any = None


# ---------------------------------------------------------------------------------------------
# Reading the two request shapes


async def read_multipart(request: Request, settings: Settings) -> list[RawInstance]:
    try:
        form = await request.form(max_files=MAX_INSTANCES + 1, max_fields=MAX_INSTANCES + 16)
    except MultiPartException as exc:
        raise ProblemError(400, "malformed-multipart", f"The multipart body could not be parsed: {exc}.",
                           field="body") from exc
    unexpected = sorted(set(form.keys()) - {"image"})
    if unexpected:
        raise ProblemError(422, "unexpected-field", f"Unexpected form field {unexpected[0]!r}; send "
                           "image files in the field 'image'.", field=unexpected[0])
    uploads = form.getlist("image")
    if not uploads:
        raise ProblemError(422, "missing-image", "Send one or more image files in the form field "
                           "'image'.", field="image")
    if len(uploads) > MAX_INSTANCES:
        raise ProblemError(422, "too-many-instances", f"At most {MAX_INSTANCES} images per request; "
                           f"got {len(uploads)}.", field="image")
    instances = []
    for i, upload in enumerate(uploads):
        field = f"image[{i}]"
        if not isinstance(upload, UploadFile):
            raise ProblemError(422, "not-a-file", f"{field} must be a file upload, not a text value.",
                               field=field)
        instances.append(RawInstance(field, image_bytes=await read_upload(upload, field,
                                                                           settings.max_upload_bytes)))
    return instances


def decode_b64(value: Any, field: str, max_bytes: int) -> bytes:
    if not isinstance(value, str):
        raise ProblemError(422, "invalid-base64", f"{field} must be a base64 string.", field=field)
    if value.startswith("data:"):  # a data URL from a browser canvas: data:image/png;base64,....
        value = value.partition(",")[2]
    if len(value) > max_bytes * 4 // 3 + 4:
        raise ProblemError(413, "file-too-large", f"{field} is larger than the "
                           f"{max_bytes / 1048576:g} MiB limit.", field=field)
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProblemError(422, "invalid-base64", f"{field} is not valid base64: {exc}.",
                           field=field) from exc
    if not data:
        raise ProblemError(422, "empty-file", f"{field} is empty.", field=field)
    return data


async def read_json(request: Request, settings: Settings) -> list[RawInstance]:
    raw = await request.body()
    if not raw.strip():
        raise ProblemError(422, "empty-body", "The request body is empty; send "
                           '{"instances": [...]}.', field="body")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProblemError(400, "malformed-json", f"The body is not valid JSON: {exc}.",
                           field="body") from exc
    except RecursionError as exc:
        raise ProblemError(400, "malformed-json", "The body's JSON is nested too deeply.",
                           field="body") from exc
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ProblemError(400, "malformed-json", f"The body's JSON holds a number that cannot be "
                           f"read: {str(exc).split(';')[0]}.", field="body") from exc
    if not isinstance(body, dict):
        raise ProblemError(422, "invalid-request", 'The body must be a JSON object {"instances": [...]}.',
                           field="body")
    unexpected = sorted(set(body) - {"instances"})
    if unexpected:
        raise ProblemError(422, "unexpected-field", f"Unexpected field {unexpected[0]!r}; the body "
                           'is {"instances": [...]}.', field=unexpected[0])
    instances = body.get("instances")
    if not isinstance(instances, list) or not instances:
        raise ProblemError(422, "invalid-request", "instances must be a non-empty list of "
                           '{"pixels": ...} or {"image_b64": ...} objects.', field="instances")
    if len(instances) > MAX_INSTANCES:
        raise ProblemError(422, "too-many-instances", f"At most {MAX_INSTANCES} instances per "
                           f"request; got {len(instances)}.", field="instances")
    out = []
    for i, instance in enumerate(instances):
        field = f"instances[{i}]"
        if not isinstance(instance, dict) or len(instance) != 1 or next(iter(instance)) not in INSTANCE_KEYS:
            raise ProblemError(422, "invalid-instance", f'{field} must be exactly one of {{"pixels": '
                               '[[...28x28...]]} or {"image_b64": "..."}.', field=field)
        if "pixels" in instance:
            out.append(RawInstance(f"{field}.pixels", pixels=instance["pixels"]))
        else:
            data = decode_b64(instance["image_b64"], f"{field}.image_b64", settings.max_upload_bytes)
            out.append(RawInstance(f"{field}.image_b64", image_bytes=data))
    return out


# ---------------------------------------------------------------------------------------------
# Prediction (blocking: runs on the thread pool)


def prepare(instance: RawInstance, image: PILImage | None) -> PreparedDigit:
    try:
        if image is not None:
            return prepare_image(load_image(image, instance.field), instance.field)
        return prepare_pixels(instance.pixels, instance.field)
    except DigitInputError as exc:
        raise ProblemError(422, exc.code, str(exc), field=exc.field or instance.field) from exc


def pixels_png(digit_input: Any) -> bytes:
    """A ``pixels`` instance as an 8-bit PNG, so stored inputs (STORE_INPUTS) are all images."""
    arr = np.asarray(digit_input, dtype=np.float64)
    arr = arr * 255.0 if arr.max(initial=0.0) <= 1.0 else arr
    buffer = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Outcome:
    digits: list[PreparedDigit]
    probabilities: np.ndarray


def run_batch(instances: list[RawInstance], model: DigitsModel, max_pixels: int) -> Outcome:
    """Check every image's header and the request's pixel budget before decoding any of them, then
    decode and normalise one at a time (the deadline is checked between instances) and predict."""
    images = [open_image(i.image_bytes, i.field, max_pixels=max_pixels, formats=IMAGE_FORMATS)
              if i.image_bytes is not None else None for i in instances]
    opened = [image for image in images if image is not None]
    if opened:
        check_request_pixels(opened, "image" if instances[0].field.startswith("image") else "instances",
                             MAX_REQUEST_PIXELS)
    digits = []
    for instance, image in zip(instances, images, strict=True):
        checkpoint()
        digits.append(prepare(instance, image))
    probabilities = model.predict(np.stack([d.array for d in digits]))
    return Outcome(digits, probabilities)


# ---------------------------------------------------------------------------------------------
# The endpoint


@router.post(
    "/predict",
    response_model=PredictResponse,
    openapi_extra=REQUEST_BODY_DOC,
    responses={400: {"description": "malformed JSON or multipart body"},
               413: {"description": "file or image too large"},
               415: {"description": "neither multipart/form-data nor application/json, or an image "
                                    "format other than PNG, JPEG, WebP, BMP, GIF"},
               422: {"description": "blank, empty or corrupt image; pixels of the wrong shape or "
                                    "range; no instances or more than 256"}},
    summary="Classify handwritten digits",
)
async def predict(
    request: Request,
    model: Annotated[DigitsModel, Depends(model_dependency("digits"))],
) -> PredictResponse:
    """Classify one or more handwritten digits, returned in the order sent.

    Images may be any size, photo or drawing, dark ink on light paper or light on dark (detected
    and inverted), RGB/RGBA (transparent pixels count as white paper) or grayscale: each is cropped
    to its ink, scaled to fit 20x20 and centred by centre of mass in 28x28, as MNIST was built.
    ``pixels`` are 28x28, white digit on black as in MNIST, and are normalised the same way. A blank
    image (no ink) is a 422, not a guess.
    """
    started = time.perf_counter()
    settings = model.settings
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        instances = await read_multipart(request, settings)
    elif media_type == "application/json":
        instances = await read_json(request, settings)
    else:
        raise ProblemError(415, "unsupported-media-type", "Send images as multipart/form-data (field "
                           "'image') or JSON instances as application/json; got "
                           f"{media_type or 'no Content-Type'}.", field="content-type")
    outcome = await execution_of(request).run(request, "light", run_batch, instances, model,
                                              settings.max_image_pixels)

    predictions, rows = [], []
    for digit, probs in zip(outcome.digits, outcome.probabilities, strict=True):
        label = int(np.argmax(probs))
        confidence = float(probs[label])
        predictions.append(DigitPrediction(digit=label, confidence=round(confidence, 6),
                                           probabilities=[round(float(p), 6) for p in probs]))
        rows.append({"prediction": str(label), "confidence": confidence,
                     "features": summary_features(digit)})
    raw_inputs = None
    if settings.store_inputs:
        raw_inputs = [i.image_bytes if i.image_bytes is not None else pixels_png(i.pixels)
                      for i in instances]
    log_predictions(request, model, rows, latency_ms=(time.perf_counter() - started) * 1000.0,
                    raw_inputs=raw_inputs)
    return PredictResponse(version=model.version, request_id=getattr(request.state, "request_id", ""),
                           predictions=predictions)
