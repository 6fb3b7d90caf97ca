"""Each model's V2 tensors, and how they map onto the v1 endpoint that serves them.

A V2 request becomes the same :class:`~app.core.pipeline.Instance` list a v1 request would (an
encoded file, or a JSON value), runs through the v1 endpoint's ``run`` on its gate, and its
predictions become output tensors. Tensor names are part of the contract.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.core.limits import (
    CLUSTERING_MAX_ROWS,
    EMOTION_MAX_INSTANCES,
    SEGMENTATION_MAX_INSTANCES,
)
from app.core.pipeline import Instance, Outcome
from app.core.registry import ServedModel
from app.openinference.protocol import (
    InferenceRequest,
    Output,
    Tensor,
    TensorMetadata,
    V2Error,
    file_bytes,
)
from app.tasks.digits.schemas import LABELS as DIGIT_LABELS
from app.tasks.digits.schemas import MAX_INSTANCES as DIGITS_MAX_INSTANCES
from app.tasks.segmentation.schemas import MaskFormat, SegmentationParams


@dataclass(frozen=True)
class V2Model:
    name: str  # the registry slot and the v1 endpoint's model
    operation_id: str  # the v1 endpoint whose run, gate and limits serve it
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]
    default_outputs: tuple[str, ...]
    max_batch: int
    to_job: Callable[[InferenceRequest, ServedModel], tuple[list[Instance], Any]]
    to_outputs: Callable[[Outcome, ServedModel, set[str]], list[Output]]

    def max_elements(self) -> dict[str, int]:
        """Each input's largest element count: the batch limit times one instance's elements."""
        return {t.name: self.max_batch * math.prod(d for d in t.shape[1:] if d > 0) for t in self.inputs}

    def parameters(self, model: ServedModel) -> dict[str, Any]:
        labels = model.metadata.get("labels")
        if self.name == "clustering":
            labels = list(getattr(model, "segments", []) or [])
        return {"labels": labels, "max_batch_size": self.max_batch,
                "v1_endpoint": self.operation_id}


def _t(name: str, datatype: str, *shape: int) -> TensorMetadata:
    return TensorMetadata(name=name, datatype=datatype, shape=list(shape))


def _one_input(request: InferenceRequest, allowed: tuple[str, ...]) -> Tensor:
    unknown = sorted(set(request.inputs) - set(allowed))
    if unknown:
        raise V2Error(400, f"unexpected input '{unknown[0]}'; this model takes {' or '.join(allowed)}")
    if len(request.inputs) != 1:
        raise V2Error(400, f"send exactly one input: {' or '.join(allowed)}")
    return next(iter(request.inputs.values()))


def _batch(tensor: Tensor, dims: tuple[int, ...], datatypes: tuple[str, ...], max_batch: int) -> int:
    """Check ``tensor`` is [n, *dims] of one of ``datatypes`` with 1 <= n <= ``max_batch``."""
    if tensor.datatype not in datatypes:
        raise V2Error(400, f"input '{tensor.name}' must be {' or '.join(datatypes)}; got {tensor.datatype}")
    want = [-1, *dims]
    if len(tensor.shape) != len(want) or tuple(tensor.shape[1:]) != dims:
        raise V2Error(400, f"input '{tensor.name}' must have shape {want}; got {list(tensor.shape)}")
    n = tensor.shape[0]
    if not 1 <= n <= max_batch:
        raise V2Error(400, f"input '{tensor.name}': batch of {n}; this model takes 1 to {max_batch}")
    return n


def _finite(tensor: Tensor) -> np.ndarray:
    values = tensor.data.astype(np.float64)
    if not np.isfinite(values).all():
        raise V2Error(400, f"input '{tensor.name}' holds NaN or infinity")
    return values


def _files(tensor: Tensor, n: int) -> list[Instance]:
    return [Instance(f"{tensor.name}[{i}]", data=file_bytes(tensor, i)) for i in range(n)]


def _labels(values: list[str]) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype=object)


# ---- digits ------------------------------------------------------------------------------------

def digits_job(request: InferenceRequest, model: ServedModel) -> tuple[list[Instance], Any]:
    tensor = _one_input(request, ("pixels", "image"))
    if tensor.name == "pixels":
        n = _batch(tensor, (28, 28), ("FP32", "FP64", "UINT8"), DIGITS_MAX_INSTANCES)
        pixels = _finite(tensor).reshape(n, 28, 28)
        return [Instance(f"pixels[{i}]", value=pixels[i]) for i in range(n)], None
    n = _batch(tensor, (), ("BYTES",), DIGITS_MAX_INSTANCES)
    return _files(tensor, n), None


def digits_outputs(outcome: Outcome, model: ServedModel, wanted: set[str]) -> list[Output]:
    p = outcome.predictions
    return [
        Output("probabilities", "FP32",
               np.array([[q["probabilities"][label] for label in DIGIT_LABELS] for q in p], np.float32)),
        Output("label", "BYTES", _labels([q["label"] for q in p])),
        Output("confidence", "FP32", np.array([q["confidence"] for q in p], np.float32)),
    ]


# ---- emotion -----------------------------------------------------------------------------------

def emotion_job(request: InferenceRequest, model: ServedModel) -> tuple[list[Instance], Any]:
    tensor = _one_input(request, ("audio",))
    n = _batch(tensor, (), ("BYTES",), EMOTION_MAX_INSTANCES)
    return _files(tensor, n), None


def emotion_outputs(outcome: Outcome, model: ServedModel, wanted: set[str]) -> list[Output]:
    p = outcome.predictions
    labels = [str(label) for label in model.metadata["labels"]]
    return [
        Output("label", "BYTES", _labels([q["label"] for q in p])),
        Output("probabilities", "FP32",
               np.array([[q["probabilities"][label] for label in labels] for q in p], np.float32)),
        Output("confidence", "FP32", np.array([q["confidence"] for q in p], np.float32)),
    ]


# ---- segmentation ------------------------------------------------------------------------------

def segmentation_job(request: InferenceRequest, model: ServedModel) -> tuple[list[Instance], Any]:
    tensor = _one_input(request, ("image",))
    _batch(tensor, (), ("BYTES",), 1)
    threshold = request.parameters.get("threshold")
    try:
        params = SegmentationParams(format=MaskFormat.json, threshold=threshold)
    except ValueError:
        raise V2Error(400, f"parameter 'threshold' must be a number in [0, 1]; got {threshold!r}") from None
    return _files(tensor, 1), params


def segmentation_outputs(outcome: Outcome, model: ServedModel, wanted: set[str]) -> list[Output]:
    arrays = (outcome.arrays or [{}])[0]
    out = [Output("mask", "UINT8", arrays["mask"])]
    if "probability" in wanted:
        out.append(Output("probability", "FP32", arrays["probability"]))
    return out


# ---- clustering --------------------------------------------------------------------------------

def clustering_job(request: InferenceRequest, model: ServedModel) -> tuple[list[Instance], Any]:
    tensor = _one_input(request, ("features",))
    features = list(model.features)
    n = _batch(tensor, (len(features),), ("FP32", "FP64", "INT64", "INT32"), CLUSTERING_MAX_ROWS)
    rows = _finite(tensor).reshape(n, len(features))
    return [Instance(f"features[{i}]", value=dict(zip(features, row.tolist(), strict=True)))
            for i, row in enumerate(rows)], None


def clustering_outputs(outcome: Outcome, model: ServedModel, wanted: set[str]) -> list[Output]:
    p = outcome.predictions
    return [
        Output("cluster", "INT64", np.array([q["cluster"] for q in p], np.int64)),
        Output("distance", "FP32", np.array([q["distance"] for q in p], np.float32)),
        Output("segment", "BYTES", _labels([q["segment"] for q in p])),
    ]


V2_MODELS: dict[str, V2Model] = {m.name: m for m in (
    V2Model("digits", "digits_predict",
            inputs=(_t("pixels", "FP32", -1, 28, 28), _t("image", "BYTES", -1)),
            outputs=(_t("probabilities", "FP32", -1, 10), _t("label", "BYTES", -1), _t("confidence", "FP32", -1)),
            default_outputs=("probabilities", "label", "confidence"), max_batch=DIGITS_MAX_INSTANCES,
            to_job=digits_job, to_outputs=digits_outputs),
    V2Model("emotion", "emotion_predict",
            inputs=(_t("audio", "BYTES", -1),),
            outputs=(_t("label", "BYTES", -1), _t("probabilities", "FP32", -1, 7), _t("confidence", "FP32", -1)),
            default_outputs=("label", "probabilities", "confidence"), max_batch=EMOTION_MAX_INSTANCES,
            to_job=emotion_job, to_outputs=emotion_outputs),
    V2Model("segmentation", "segmentation_predict",
            inputs=(_t("image", "BYTES", 1),),
            outputs=(_t("mask", "UINT8", -1, -1), _t("probability", "FP32", -1, -1)),
            default_outputs=("mask",), max_batch=min(1, SEGMENTATION_MAX_INSTANCES),
            to_job=segmentation_job, to_outputs=segmentation_outputs),
    V2Model("clustering", "clustering_predict",
            inputs=(_t("features", "FP32", -1, 2),),
            outputs=(_t("cluster", "INT64", -1), _t("distance", "FP32", -1), _t("segment", "BYTES", -1)),
            default_outputs=("cluster", "distance", "segment"), max_batch=CLUSTERING_MAX_ROWS,
            to_job=clustering_job, to_outputs=clustering_outputs),
)}
