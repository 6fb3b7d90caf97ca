"""``POST /v1/digits/predict``: handwritten digits in, a digit with probabilities out, per instance.

Inputs: image files (multipart field ``image``, repeated; or one raw ``image/*`` body), or JSON
``{"instances": [{"pixels": [[...]]} | {"image_b64": "..."}]}``. Every image's header is checked
against the limits before any is decoded; each instance is normalised as MNIST was built
(``preprocess``), then all go through the model in one batch: ``run`` yields that call, which core
makes together with other requests' calls (``app.core.execution.ModelCalls``).
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Generator
from typing import Any

import numpy as np
from fastapi import APIRouter
from PIL import Image

from app.core.codecs.image import check_request_pixels, load_image, open_image
from app.core.errors import ProblemError
from app.core.execution import Call, checkpoint, inline_budget
from app.core.limits import MAX_REQUEST_PIXELS
from app.core.pipeline import Endpoint, Instance, Job, Outcome, register
from app.tasks.digits.preprocess import (
    SIZE,
    DigitInputError,
    prepare_image,
    prepare_pixels,
    summary_features,
)
from app.tasks.digits.schemas import (
    LABELS,
    MAX_INSTANCES,
    DigitsPredictRequest,
    DigitsPredictResponse,
)

router = APIRouter()
IMAGE_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP", "GIF"})


def json_instances(body: DigitsPredictRequest) -> list[Instance]:
    out = []
    for i, item in enumerate(body.instances):
        if item.pixels is not None:
            out.append(Instance(f"instances[{i}].pixels", value=item.pixels))
        else:
            out.append(Instance(f"instances[{i}].image_b64", data=decode_b64(item.image_b64 or "",
                                                                             f"instances[{i}].image_b64")))
    return out


def decode_b64(value: str, field: str) -> bytes:
    if value.startswith("data:"):  # a data URL from a browser canvas: data:image/png;base64,....
        value = value.partition(",")[2]
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProblemError(422, "invalid-base64", f"{field} is not valid base64: {exc}.", field=field) from exc
    if not data:
        raise ProblemError(422, "empty-file", f"{field} is empty.", field=field)
    return data


def pixels_png(pixels: Any) -> bytes:
    """A ``pixels`` instance as an 8-bit PNG, so stored inputs are all images."""
    arr = np.asarray(pixels, dtype=np.float64)
    arr = arr * 255.0 if arr.max(initial=0.0) <= 1.0 else arr
    buffer = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def run(job: Job) -> Generator[Call, np.ndarray, Outcome]:
    settings = job.settings
    with job.timing.measure("decode"):
        images = [open_image(i.data, i.field, max_pixels=settings.max_image_pixels, formats=IMAGE_FORMATS)
                  if i.data is not None else None for i in job.instances]
        opened = [image for image in images if image is not None]
        pixels = check_request_pixels(opened, job.instances[0].field.split("[")[0], MAX_REQUEST_PIXELS)
        inline_budget(pixels=pixels, instances=len(job.instances))
        digits = []
        for instance, image in zip(job.instances, images, strict=True):
            checkpoint()
            try:
                digits.append(prepare_image(load_image(image, instance.field), instance.field)
                              if image is not None else prepare_pixels(instance.value, instance.field))
            except DigitInputError as exc:
                raise ProblemError(422, exc.code, str(exc), field=exc.field or instance.field) from exc
    with job.timing.measure("inference"):  # core makes the call: on the event loop, with other requests' calls
        batch = (digits[0].array.reshape(1, SIZE, SIZE, 1) if len(digits) == 1
                 else np.stack([d.array for d in digits]).reshape(len(digits), SIZE, SIZE, 1))
        probabilities = yield job.model.predict, batch
    predictions, rows = [], []
    for digit, probs in zip(digits, probabilities.tolist(), strict=True):
        label = max(range(len(probs)), key=probs.__getitem__)  # the first of the largest, as argmax
        if not job.tensors:  # the v1 answer; the V2 protocol answers with the tensors below
            rounded = [round(p, 6) for p in probs]  # 6 decimals in the answer
            predictions.append({"label": LABELS[label], "digit": label, "confidence": rounded[label],
                                "probabilities": dict(zip(LABELS, rounded, strict=True)),
                                "classes": [{"label": d, "probability": p}
                                            for d, p in zip(LABELS, rounded, strict=True)]})
        rows.append({"prediction": LABELS[label], "confidence": probs[label],
                     "features": summary_features(digit)})
    raw = None
    if job.store_inputs:
        raw = [i.data if i.data is not None else pixels_png(i.value) for i in job.instances]
    # The V2 protocol's tensors come from the model's own float32 answer, not the rounded JSON.
    arrays = [{"probabilities": row} for row in np.asarray(probabilities, np.float32)] if job.tensors else None
    return Outcome(predictions, rows, raw_inputs=raw, arrays=arrays)


register(router, Endpoint(
    operation_id="digits_predict", path="/v1/digits/predict", tag="digits", model="digits",
    summary="Classify handwritten digits",
    description="One prediction per image, in the order sent. Images may be any size, photo or "
                "drawing, dark ink on light paper or light on dark (detected and inverted), RGB/RGBA "
                "(transparent pixels count as white paper) or grayscale: each is cropped to its ink, "
                "scaled to fit 20x20 and centred by centre of mass in 28x28, as MNIST was built. "
                "`pixels` are 28x28, white digit on black, normalised the same way. A blank image "
                "(no ink) is a 422, not a guess.",
    run=run, response_schema=DigitsPredictResponse, gate="light", inline=True,
    file_field="image", file_description="image files (PNG, JPEG, WebP, BMP, GIF first frame), one "
                                         "digit each", raw_media=("image/",),
    json_schema=DigitsPredictRequest, json_instances=json_instances, max_instances=MAX_INSTANCES,
    json_values_per_instance=SIZE * SIZE + SIZE + 4,  # 28 rows of 28 pixels, or one base64 string
    response_example={"model": "digits", "version": "1.0.1", "request_id": "019ab2c3d4e5f60718293a4b5c6d7e8f",
                      "predictions": [{"label": "7", "digit": 7, "confidence": 0.999,
                                       "probabilities": {d: (0.999 if d == "7" else 0.0001) for d in LABELS}}]},
))
