"""The served U-Net: a LiteRT interpreter for one fixed tile size behind overlap-tiled inference."""

from __future__ import annotations

import numpy as np

from app.core.execution import checkpoint
from app.core.registry import ServedModel
from app.core.runtime import TFLiteRunner
from app.core.spare import Helper
from app.tasks.segmentation.preprocess import (
    MARGIN,
    THRESHOLD,
    TILE,
    TiledSegmentation,
    predict_probability,
    segment_image,
)

# One tile per interpreter call: the interpreter's activation arena grows with the batch, and
# batching tiles buys no speed on a CPU (docs/performance.md).
TILES_PER_CALL = 1


class SegmentationModel(ServedModel):
    task = "segmentation"
    # A tile is ~35 ms of convolutions that split well between two threads: with IDLE_THREADS on, a
    # second one at idle priority nearly halves a lone request's time (app.core.runtime).
    idle_threads = 1

    def _load_artifacts(self) -> None:
        self.runner = TFLiteRunner(self.path / "model.tflite", **self.runner_threads())
        params = self.metadata.get("params", {})
        self.tile = int(params.get("tile", TILE))
        self.margin = int(params.get("margin", MARGIN))
        self.threshold = float(params.get("threshold", THRESHOLD))
        declared = self.runner.input_shape
        if tuple(declared[1:]) != (self.tile, self.tile, 1):
            raise ValueError(f"model.tflite takes {declared}, metadata says {self.tile}px tiles")

    def warm_up(self) -> None:
        self.probability(np.zeros((self.tile, self.tile), dtype=np.float32))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Tiles (n, tile, tile, 1) in [0, 1] -> membrane probabilities of the same shape.

        Stops (raises ``Cancelled``) before the tiles when the request is past its deadline or its
        client has gone: a 2048 x 2048 image is 64 tiles of 272 px (1.4.0), ~35 ms each."""
        checkpoint()
        return self.runner.run(batch)

    def probability(self, gray: np.ndarray) -> np.ndarray:
        """Membrane probability (H, W) for a normalised grayscale image of any size."""
        return predict_probability(gray, self.predict, tile=self.tile, margin=self.margin,
                                   batch_size=TILES_PER_CALL)

    def segment(self, gray: np.ndarray, threshold: float, keep_probability: bool = False,
                report: Helper | None = None) -> TiledSegmentation:
        """Mask and summary features of a uint8 or float image, tile by tile (the serving path); a
        big image's tiles also on a helper thread while another CPU is idle (``SPARE_CPU``)."""
        return segment_image(gray, self.predict, threshold=threshold, tile=self.tile,
                             margin=self.margin, keep_probability=keep_probability,
                             helper=self.spare_runner(), report=report)


MODEL_CLASS = SegmentationModel
