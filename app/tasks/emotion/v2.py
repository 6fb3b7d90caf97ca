"""The emotion V2 model: its tensors and how they map onto its v1 endpoint."""

from __future__ import annotations

from typing import Any

import numpy as np

from app.core.limits import EMOTION_MAX_INSTANCES
from app.core.pipeline import Instance, Outcome
from app.core.registry import ServedModel
from app.openinference.models import (
    V2Model,
    batch_of,
    files_of,
    labels_array,
    one_input,
    tensor_meta,
)
from app.openinference.protocol import InferenceRequest, Output


def emotion_job(request: InferenceRequest, model: ServedModel) -> tuple[list[Instance], Any]:
    tensor = one_input(request, ("audio",))
    n = batch_of(tensor, (), ("BYTES",), EMOTION_MAX_INSTANCES)
    return files_of(tensor, n), None


def emotion_outputs(outcome: Outcome, model: ServedModel, wanted: set[str]) -> list[Output]:
    p = outcome.predictions
    labels = [str(label) for label in model.metadata["labels"]]
    return [
        Output("label", "BYTES", labels_array([q["label"] for q in p])),
        Output(
            "probabilities",
            "FP32",
            np.array([[q["probabilities"][label] for label in labels] for q in p], np.float32),
        ),
        Output("confidence", "FP32", np.array([q["confidence"] for q in p], np.float32)),
    ]


V2 = V2Model(
    "emotion",
    "emotion_predict",
    inputs=(tensor_meta("audio", "BYTES", -1),),
    outputs=(
        tensor_meta("label", "BYTES", -1),
        tensor_meta("probabilities", "FP32", -1, -1),
        tensor_meta("confidence", "FP32", -1),
    ),
    default_outputs=("label", "probabilities", "confidence"),
    per_class_outputs=("probabilities",),
    max_batch=EMOTION_MAX_INSTANCES,
    to_job=emotion_job,
    to_outputs=emotion_outputs,
)
