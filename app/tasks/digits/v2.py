"""The digits V2 model: its tensors and how they map onto its v1 endpoint."""

from __future__ import annotations

from typing import Any

import numpy as np

from app.core.pipeline import Instance, Outcome
from app.core.registry import ServedModel
from app.openinference.models import (
    V2Model,
    batch_of,
    files_of,
    finite,
    labels_array,
    one_input,
    tensor_meta,
)
from app.openinference.protocol import InferenceRequest, Output
from app.tasks.digits.schemas import LABELS as DIGIT_LABELS
from app.tasks.digits.schemas import MAX_INSTANCES as DIGITS_MAX_INSTANCES


def digits_job(request: InferenceRequest, model: ServedModel) -> tuple[list[Instance], Any]:
    tensor = one_input(request, ("pixels", "image"))
    if tensor.name == "pixels":
        n = batch_of(tensor, (28, 28), ("FP32", "FP64", "UINT8"), DIGITS_MAX_INSTANCES)
        pixels = finite(tensor).reshape(n, 28, 28)
        return [Instance(f"pixels[{i}]", value=pixels[i]) for i in range(n)], None
    n = batch_of(tensor, (), ("BYTES",), DIGITS_MAX_INSTANCES)
    return files_of(tensor, n), None


def digits_outputs(outcome: Outcome, model: ServedModel, wanted: set[str]) -> list[Output]:
    """The model's float32 probabilities (the run's arrays, unrounded), their argmax as the label
    and its probability as the confidence."""
    assert outcome.arrays is not None, "a V2 run asks for tensors"
    probabilities = np.stack([a["probabilities"] for a in outcome.arrays]).astype(np.float32, copy=False)
    best = probabilities.argmax(axis=1)
    return [
        Output("probabilities", "FP32", probabilities),
        Output("label", "BYTES", labels_array([DIGIT_LABELS[i] for i in best])),
        Output("confidence", "FP32", probabilities[np.arange(len(best)), best]),
    ]


V2 = V2Model(
    "digits",
    "digits_predict",
    inputs=(tensor_meta("pixels", "FP32", -1, 28, 28),),
    alternative_inputs=(tensor_meta("image", "BYTES", -1),),
    outputs=(
        tensor_meta("probabilities", "FP32", -1, 10),
        tensor_meta("label", "BYTES", -1),
        tensor_meta("confidence", "FP32", -1),
    ),
    default_outputs=("probabilities", "label", "confidence"),
    max_batch=DIGITS_MAX_INSTANCES,
    to_job=digits_job,
    to_outputs=digits_outputs,
)
