"""The segmentation V2 model: its tensors and how they map onto its v1 endpoint."""

from __future__ import annotations

from typing import Any

from app.core.limits import SEGMENTATION_MAX_INSTANCES
from app.core.pipeline import Instance, Outcome
from app.core.registry import ServedModel
from app.openinference.models import (
    V2Model,
    batch_of,
    files_of,
    one_input,
    tensor_meta,
)
from app.openinference.protocol import InferenceRequest, Output, V2Error
from app.tasks.segmentation.schemas import MaskFormat, SegmentationParams


def segmentation_job(request: InferenceRequest, model: ServedModel) -> tuple[list[Instance], Any]:
    tensor = one_input(request, ("image",))
    batch_of(tensor, (), ("BYTES",), 1)
    threshold = request.parameters.get("threshold")
    try:
        params = SegmentationParams(format=MaskFormat.json, threshold=threshold)
    except ValueError:
        raise V2Error(400, f"parameter 'threshold' must be a number in [0, 1]; got {threshold!r}") from None
    return files_of(tensor, 1), params


def segmentation_outputs(outcome: Outcome, model: ServedModel, wanted: set[str]) -> list[Output]:
    arrays = (outcome.arrays or [{}])[0]
    out = [Output("mask", "UINT8", arrays["mask"])]
    if "probability" in wanted:
        out.append(Output("probability", "FP32", arrays["probability"]))
    return out


V2 = V2Model(
    "segmentation",
    "segmentation_predict",
    inputs=(tensor_meta("image", "BYTES", 1),),
    outputs=(
        tensor_meta("mask", "UINT8", -1, -1),
        tensor_meta("probability", "FP32", -1, -1),
    ),
    default_outputs=("mask",),
    max_batch=min(1, SEGMENTATION_MAX_INSTANCES),
    to_job=segmentation_job,
    to_outputs=segmentation_outputs,
)
