"""The fault V2 model: a [n, 2] FP32 tensor of readings to each one's probability of a fault."""

from __future__ import annotations

from typing import Any

import numpy as np

from app.core.pipeline import Instance, Outcome
from app.core.registry import ServedModel
from app.openinference.models import V2Model, batch_of, finite, one_input, tensor_meta
from app.openinference.protocol import InferenceRequest, Output
from tests.fifth_task.router import MAX_READINGS


def to_job(request: InferenceRequest, model: ServedModel) -> tuple[list[Instance], Any]:
    tensor = one_input(request, ("readings",))
    n = batch_of(tensor, (2,), ("FP32", "FP64"), MAX_READINGS)
    rows = finite(tensor).reshape(n, 2)
    return [Instance(f"readings[{i}]", value={"temperature": t, "vibration": v})
            for i, (t, v) in enumerate(rows.tolist())], None


def to_outputs(outcome: Outcome, model: ServedModel, wanted: set[str]) -> list[Output]:
    return [Output("probability", "FP32", np.array([p["probability"] for p in outcome.predictions], np.float32))]


V2 = V2Model("fault", "fault_predict", inputs=(tensor_meta("readings", "FP32", -1, 2),),
             outputs=(tensor_meta("probability", "FP32", -1),), default_outputs=("probability",),
             max_batch=MAX_READINGS, to_job=to_job, to_outputs=to_outputs, platform="numpy")
