"""The bare floor for digits (issue 18): FastAPI + Pillow decode + one LiteRT call, nothing else.

No preprocessing beyond a resize to 28x28, no logging, metrics, limits or validation: what serving
this model cannot go below on this stack. Served like the project (gunicorn, one uvicorn worker) by
``bench/digits_floor.py``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter
from fastapi import FastAPI, Request
from fastapi.responses import Response
from PIL import Image

MODEL = Path(__file__).resolve().parents[1] / "models" / "digits" / "1.0.1" / "model.tflite"
interpreter = Interpreter(model_path=str(MODEL), num_threads=1)
interpreter.allocate_tensors()
INPUT = interpreter.get_input_details()[0]["index"]
OUTPUT = interpreter.get_output_details()[0]["index"]
app = FastAPI()


@app.post("/predict")
async def predict(request: Request) -> Response:
    image = Image.open(io.BytesIO(await request.body())).convert("L").resize((28, 28))
    x = (np.asarray(image, dtype=np.float32) / 255.0)[None, :, :, None]
    interpreter.set_tensor(INPUT, x)
    interpreter.invoke()
    label = int(interpreter.get_tensor(OUTPUT)[0].argmax())
    return Response(f'{{"label":"{label}"}}', media_type="application/json")
