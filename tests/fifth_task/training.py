"""The fault task's evaluation gate: accuracy on held-out readings, labelled by the rule the
readings were made with (hot and shaking is a fault)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from training.common import Comparison, HeldOut


def held_out_readings(n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = np.column_stack([rng.uniform(10, 100, n), rng.uniform(0, 15, n)])
    return x, (0.08 * x[:, 0] + 0.5 * x[:, 1] - 8.0 > 0).astype(np.int64)


def accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    return float(((model.predict(x) >= 0.5).astype(np.int64) == y).mean())


def compare_sets(baseline: Any, candidate: Any, production: Path | None, limit: int) -> list[HeldOut]:
    x, y = held_out_readings()
    if limit:
        x, y = x[:limit], y[:limit]
    return [HeldOut("fault readings (held out)", len(y), lambda m: accuracy(m, x, y))]


COMPARISON = Comparison("accuracy", 0.01, compare_sets)
