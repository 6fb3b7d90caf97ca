"""The digits CNN behind the registry's small model interface (LiteRT, no TensorFlow)."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from app.core.execution import batchable
from app.core.registry import ServedModel
from app.core.runtime import TFLiteRunner
from app.tasks.digits.preprocess import PREPROCESSING_PARAMS, SIZE, prepare_image


class DigitsModel(ServedModel):
    task = "digits"

    def _load_artifacts(self) -> None:
        self.runner = TFLiteRunner(self.path / "model.tflite", **self.runner_threads())
        expected = (SIZE, SIZE, 1)
        if self.runner.input_shape[1:] != expected or self.runner.output_shape[-1] != 10:
            raise ValueError(f"model.tflite takes {self.runner.input_shape} -> {self.runner.output_shape}; "
                             f"expected (-1, {SIZE}, {SIZE}, 1) -> (-1, 10)")

    def preprocessing(self) -> dict[str, Any]:
        return {"code": "app/tasks/digits/preprocess.py", "parameters": PREPROCESSING_PARAMS,
                "steps": ["to grayscale in [0, 1] (transparent pixels on white)",
                          "invert dark ink on light paper to light on dark (the border's median decides)",
                          "stretch so the background is 0 and the ink 1 (robust percentiles)",
                          "crop to the ink's bounding box, ignoring specks",
                          "scale to fit 20x20 keeping the aspect ratio",
                          "paste into 28x28 with the centre of mass at (14, 14)",
                          "float32, shape (1, 28, 28, 1)"]}

    def parity_inputs(self) -> list[np.ndarray]:
        """Strokes drawn as a finger draws them on the page (a 1, a 7, a 0, a 4), through the
        serving preprocessing: inputs the model answers with spread probabilities, not noise."""
        strokes = [[(50, 15, 50, 85)], [(20, 20, 80, 20), (80, 20, 40, 90)],
                   [(50, 15, 20, 50), (20, 50, 50, 85), (50, 85, 80, 50), (80, 50, 50, 15)],
                   [(60, 10, 15, 60), (15, 60, 85, 60), (60, 10, 60, 90)]]
        inputs = []
        for lines in strokes:
            canvas = Image.new("L", (100, 100), 255)
            draw = ImageDraw.Draw(canvas)
            for line in lines:
                draw.line(line, fill=0, width=9)
            inputs.append(prepare_image(canvas, "parity").array.reshape(1, SIZE, SIZE, 1).astype(np.float32))
        return inputs

    def warm_up(self) -> None:
        self.predict(np.zeros((1, SIZE, SIZE), dtype=np.float32))

    @batchable  # rows in, rows out: the same probabilities in any batch (tests/unit/test_digits_model.py)
    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, 28, 28) or (N, 28, 28, 1) normalised digits -> (N, 10) probabilities."""
        batch = np.asarray(batch, dtype=np.float32)
        if batch.ndim == 3:
            batch = batch[..., None]
        return self.runner.run(batch)


MODEL_CLASS = DigitsModel
