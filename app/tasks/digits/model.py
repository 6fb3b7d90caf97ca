"""The digits CNN behind the registry's small model interface (LiteRT, no TensorFlow)."""

from __future__ import annotations

import numpy as np

from app.core.registry import ServedModel
from app.core.runtime import TFLiteRunner
from app.tasks.digits.preprocess import SIZE


class DigitsModel(ServedModel):
    task = "digits"

    def _load_artifacts(self) -> None:
        self.runner = TFLiteRunner(self.path / "model.tflite", self.settings.inference_threads)
        expected = (SIZE, SIZE, 1)
        if self.runner.input_shape[1:] != expected or self.runner.output_shape[-1] != 10:
            raise ValueError(f"model.tflite takes {self.runner.input_shape} -> {self.runner.output_shape}; "
                             f"expected (-1, {SIZE}, {SIZE}, 1) -> (-1, 10)")

    def warm_up(self) -> None:
        self.predict(np.zeros((1, SIZE, SIZE), dtype=np.float32))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, 28, 28) or (N, 28, 28, 1) normalised digits -> (N, 10) probabilities."""
        batch = np.asarray(batch, dtype=np.float32)
        if batch.ndim == 3:
            batch = batch[..., None]
        return self.runner.run(batch)


MODEL_CLASS = DigitsModel
