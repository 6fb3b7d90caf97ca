"""The clustering V2 model: its tensors and how they map onto its v1 endpoint."""

from __future__ import annotations

from typing import Any

import numpy as np

from app.core.limits import CLUSTERING_MAX_ROWS
from app.core.pipeline import Instance, Outcome
from app.core.registry import ServedModel
from app.openinference.models import (
    V2Model,
    batch_of,
    finite,
    labels_array,
    one_input,
    tensor_meta,
)
from app.openinference.protocol import InferenceRequest, Output


def clustering_job(request: InferenceRequest, model: ServedModel) -> tuple[list[Instance], Any]:
    tensor = one_input(request, ("features",))
    features = list(model.features)
    n = batch_of(
        tensor,
        (len(features),),
        ("FP32", "FP64", "INT64", "INT32"),
        CLUSTERING_MAX_ROWS,
    )
    rows = finite(tensor).reshape(n, len(features))
    return [
        Instance(f"features[{i}]", value=dict(zip(features, row.tolist(), strict=True))) for i, row in enumerate(rows)
    ], None


def clustering_outputs(outcome: Outcome, model: ServedModel, wanted: set[str]) -> list[Output]:
    p = outcome.predictions
    return [
        Output("cluster", "INT64", np.array([q["cluster"] for q in p], np.int64)),
        Output("distance", "FP32", np.array([q["distance"] for q in p], np.float32)),
        Output("segment", "BYTES", labels_array([q["segment"] for q in p])),
    ]


V2 = V2Model(
    "clustering",
    "clustering_predict",
    inputs=(tensor_meta("features", "FP32", -1, 2),),
    outputs=(
        tensor_meta("cluster", "INT64", -1),
        tensor_meta("distance", "FP32", -1),
        tensor_meta("segment", "BYTES", -1),
    ),
    default_outputs=("cluster", "distance", "segment"),
    max_batch=CLUSTERING_MAX_ROWS,
    to_job=clustering_job,
    to_outputs=clustering_outputs,
    platform="scikit-learn-kmeans",
    labels=lambda model: list(getattr(model, "segments", []) or []),
)
