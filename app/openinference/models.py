"""A model's V2 tensors, and how they map onto the v1 endpoint that serves them.

Each task declares its :class:`V2Model` in its own folder (``app/tasks/<task>/v2.py``): a V2 request
becomes the same :class:`~app.core.pipeline.Instance` list a v1 request would (an encoded file, or a
JSON value), runs through the v1 endpoint's ``run`` on its gate, and its predictions become output
tensors. Tensor names are part of the contract. The helpers below check a request's tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

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


@dataclass(frozen=True)
class V2Model:
    name: str  # the registry slot and the v1 endpoint's model
    operation_id: str  # the v1 endpoint whose run, gate and limits serve it
    inputs: tuple[TensorMetadata, ...]  # the model's inputs: one of them per request
    outputs: tuple[TensorMetadata, ...]
    default_outputs: tuple[str, ...]
    max_batch: int
    to_job: Callable[[InferenceRequest, ServedModel], tuple[list[Instance], Any]]
    to_outputs: Callable[[Outcome, ServedModel, set[str]], list[Output]]
    # Taken instead of ``inputs`` (an encoded image instead of pixels): listed in the metadata's
    # parameters, not as inputs, so tools that fill every listed input (perf_analyzer) can.
    alternative_inputs: tuple[TensorMetadata, ...] = ()
    platform: str = "litert"  # the runtime, as Triton's metadata names it
    labels: Callable[[ServedModel], list[Any] | None] = lambda model: model.metadata.get("labels")
    # Outputs with one value per class: their last axis is the served version's label count.
    per_class_outputs: tuple[str, ...] = ()

    def outputs_of(self, model: ServedModel) -> list[TensorMetadata]:
        """The output tensors as the served version gives them."""
        labels = self.labels(model) if self.per_class_outputs else None
        return [t.model_copy(update={"shape": [*t.shape[:-1], len(labels)]})
                if labels and t.name in self.per_class_outputs else t for t in self.outputs]

    def max_elements(self) -> dict[str, int]:
        """Each input's largest element count: the batch limit times one instance's elements."""
        return {t.name: self.max_batch * math.prod(d for d in t.shape[1:] if d > 0)
                for t in (*self.inputs, *self.alternative_inputs)}

    def config(self, model: ServedModel) -> dict[str, Any]:
        """The model's configuration as Triton writes it (``GET .../config``): what Triton's tools
        (perf_analyzer, model analyzer) read for batching and tensor shapes. A batched model's
        ``dims`` leave out the batch dimension; segmentation answers one image, unbatched."""
        batched = self.max_batch > 1

        def tensors(items: tuple[TensorMetadata, ...]) -> list[dict[str, Any]]:
            return [{"name": t.name, "data_type": TRITON_TYPES[t.datatype],
                     "dims": t.shape[1:] if batched else t.shape} for t in items]

        return {"name": self.name, "platform": self.platform, "backend": self.platform,
                "max_batch_size": self.max_batch if batched else 0,
                "input": tensors(self.inputs), "output": tensors(tuple(self.outputs_of(model))),
                "version_policy": {"specific": {"versions": [model.version]}},
                "parameters": {"v1_endpoint": {"string_value": self.operation_id}}}

    def parameters(self, model: ServedModel) -> dict[str, Any]:
        parameters = {"labels": self.labels(model), "max_batch_size": self.max_batch, "v1_endpoint": self.operation_id}
        if self.alternative_inputs:
            parameters["alternative_inputs"] = [t.model_dump() for t in self.alternative_inputs]
        return parameters


TRITON_TYPES = {"BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32",
                "UINT64": "TYPE_UINT64", "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32",
                "INT64": "TYPE_INT64", "FP16": "TYPE_FP16", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64",
                "BYTES": "TYPE_STRING"}


def tensor_meta(name: str, datatype: str, *shape: int) -> TensorMetadata:
    return TensorMetadata(name=name, datatype=datatype, shape=list(shape))


def one_input(request: InferenceRequest, allowed: tuple[str, ...]) -> Tensor:
    unknown = sorted(set(request.inputs) - set(allowed))
    if unknown:
        raise V2Error(400, f"unexpected input '{unknown[0]}'; this model takes {' or '.join(allowed)}")
    if len(request.inputs) != 1:
        raise V2Error(400, f"send exactly one input: {' or '.join(allowed)}")
    return next(iter(request.inputs.values()))


def batch_of(tensor: Tensor, dims: tuple[int, ...], datatypes: tuple[str, ...], max_batch: int) -> int:
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


def finite(tensor: Tensor) -> np.ndarray:
    values = tensor.data.astype(np.float64)
    if not np.isfinite(values).all():
        raise V2Error(400, f"input '{tensor.name}' holds NaN or infinity")
    return values


def files_of(tensor: Tensor, n: int) -> list[Instance]:
    return [Instance(f"{tensor.name}[{i}]", data=file_bytes(tensor, i)) for i in range(n)]


def labels_array(values: list[str]) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype=object)


V2_MODELS: dict[str, V2Model] = {}  # filled from the tasks when the app is made (app.main)
