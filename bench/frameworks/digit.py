"""The floor's work on one PNG, shared by the framework apps: decode, resize, one LiteRT call."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter
from PIL import Image

DIGITS = Path(__file__).resolve().parents[2] / "models" / "digits"
# The version the service serves (the latest): every target of the comparison runs the same model.
MODEL = max((p for p in DIGITS.iterdir() if p.is_dir() and p.name[:1].isdigit()),
            key=lambda p: tuple(int(part) for part in p.name.split("."))) / "model.tflite"


class Digit:
    def __init__(self) -> None:
        self.interpreter = Interpreter(model_path=str(MODEL), num_threads=1)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]["index"]
        self.output = self.interpreter.get_output_details()[0]["index"]

    def label(self, png: bytes) -> int:
        image = Image.open(io.BytesIO(png)).convert("L").resize((28, 28))
        self.interpreter.set_tensor(self.input, (np.asarray(image, dtype=np.float32) / 255.0)[None, :, :, None])
        self.interpreter.invoke()
        return int(self.interpreter.get_tensor(self.output)[0].argmax())
