"""Reference statistics for drift monitoring.

Training calls :func:`build_reference` on the summary features of its held-out data and writes the
result as ``reference.json`` next to the model; serving compares recent prediction-log rows with it.
The features are the same privacy-safe summaries the prediction log stores (one function per task,
``summary_features`` in ``app/tasks/<task>/preprocess.py``), so reference and live values are
computed by one piece of code.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

REFERENCE_SAMPLE_SIZE = 2000
PSI_BINS = 10


def numeric_reference(values: Sequence[float], *, sample_size: int = REFERENCE_SAMPLE_SIZE,
                      seed: int = 0) -> dict[str, Any]:
    """Distribution summary of one numeric feature: moments, decile bin edges and a sample for KS."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        raise ValueError("numeric_reference needs at least one finite value")
    rng = np.random.default_rng(seed)
    sample = arr if arr.size <= sample_size else rng.choice(arr, size=sample_size, replace=False)
    edges = np.unique(np.quantile(arr, np.linspace(0.0, 1.0, PSI_BINS + 1)))
    return {
        "kind": "numeric",
        "n": int(arr.size),
        "mean": float(arr.mean()),
        "std": float(arr.std()),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "bin_edges": [float(e) for e in edges],
        "sample": [float(v) for v in np.sort(sample)],
    }


def categorical_reference(values: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Class prior over ``labels`` (labels that never occur get probability 0)."""
    counts = Counter(str(v) for v in values)
    total = sum(counts.values())
    if total == 0:
        raise ValueError("categorical_reference needs at least one value")
    return {
        "kind": "categorical",
        "n": total,
        "labels": [str(label) for label in labels],
        "prior": {str(label): counts.get(str(label), 0) / total for label in labels},
    }


def build_reference(features: Mapping[str, Sequence[float]], predictions: Sequence[str],
                    labels: Sequence[str], *, true_labels: Sequence[str] | None = None,
                    source: str = "", seed: int = 0) -> dict[str, Any]:
    """The content of ``reference.json``.

    ``features`` maps each summary-feature name to its values over the reference data (held-out
    data the model did not train on); ``predictions`` are the model's predicted labels on the same
    data, the distribution the live predicted-class distribution is compared with.
    """
    reference: dict[str, Any] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": source,
        "features": {name: numeric_reference(vals, seed=seed) for name, vals in features.items()},
        "prediction": categorical_reference(predictions, labels),
    }
    if true_labels is not None:
        reference["label"] = categorical_reference(true_labels, labels)
    return reference
