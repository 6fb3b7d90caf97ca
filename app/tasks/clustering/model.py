"""The served customer-segment model: standard scaling + nearest centroid, from plain JSON.

``model.json`` (written by ``training/clustering.py``) holds the scaler's mean/scale, the centroids in
the scaled space, the feature names and the segment names; no pickles, no scikit-learn object.
Assigning each row to its nearest centroid is exactly what ``KMeans.predict`` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from app.core.registry import ServedModel
from app.tasks.clustering.preprocess import Scaler, nearest_centroid


class Assignments(NamedTuple):
    labels: np.ndarray      # (n,) nearest-centroid index
    distances: np.ndarray   # (n, k) Euclidean distances in the scaled space


class ClusteringModel(ServedModel):
    task = "clustering"

    def _load_artifacts(self) -> None:
        spec = json.loads((self.path / "model.json").read_text())
        self.features: list[str] = [str(f) for f in spec["features"]]
        self.segments: list[str] = [str(s) for s in spec["segments"]]
        self.scaler = Scaler(mean=np.asarray(spec["scaler"]["mean"], dtype=np.float64),
                             scale=np.asarray(spec["scaler"]["scale"], dtype=np.float64))
        self.centroids = np.asarray(spec["centroids_scaled"], dtype=np.float64)
        k, d = self.centroids.shape
        if len(self.features) != d or self.scaler.mean.shape != (d,) or self.scaler.scale.shape != (d,):
            raise ValueError(f"model.json: {d}-dimensional centroids but {len(self.features)} features "
                             f"and a scaler of shape {self.scaler.mean.shape}")
        if len(self.segments) != k:
            raise ValueError(f"model.json: {k} centroids but {len(self.segments)} segment names")
        if not (np.isfinite(self.centroids).all() and np.all(self.scaler.scale > 0)):
            raise ValueError("model.json: non-finite centroids or a non-positive scale")

    def warm_up(self) -> None:
        self.predict(self.scaler.mean[None, :])

    def artifact(self) -> Path:
        return self.path / "model.json"

    def artifact_media_type(self) -> str:
        return "application/json"

    def preprocessing(self) -> dict[str, Any]:
        return {"features": self.features, "units": "original (unscaled) values",
                "steps": ["scale each feature: (x - scaler.mean) / scaler.scale",
                          "the cluster is the nearest of centroids_scaled (Euclidean distance, first on ties)",
                          "its name is segments[cluster]"]}

    def parity_inputs(self) -> list[np.ndarray]:
        rng = np.random.default_rng(self.PARITY_SEED)
        spread = self.scaler.mean + self.scaler.scale * rng.uniform(-2, 2, (self.PARITY_SAMPLES, len(self.features)))
        return [row[None, :] for row in spread]

    def parity_outputs(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return [self.predict(x).distances for x in inputs]

    def predict(self, batch: np.ndarray) -> Assignments:  # type: ignore[override]
        """Rows (n, d) in the features' original units -> nearest centroid and all distances."""
        labels, distances = nearest_centroid(self.scaler.transform(batch), self.centroids)
        return Assignments(labels, distances)


MODEL_CLASS = ClusteringModel
