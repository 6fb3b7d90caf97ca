"""The served model: a logistic regression on two features, from plain JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from app.core.registry import ServedModel


class FaultModel(ServedModel):
    task = "fault"

    def _load_artifacts(self) -> None:
        spec = json.loads((self.path / "model.json").read_text())
        self.features: list[str] = spec["features"]
        self.weights = np.asarray(spec["weights"], dtype=np.float64)
        self.bias = float(spec["bias"])

    def warm_up(self) -> None:
        self.predict(np.zeros((1, len(self.features))))

    def artifact(self) -> Path:
        return self.path / "model.json"

    def artifact_media_type(self) -> str:
        return "application/json"

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Rows (n, 2) -> the probability of a fault for each."""
        return 1.0 / (1.0 + np.exp(-(batch @ self.weights + self.bias)))


MODEL_CLASS = FaultModel
