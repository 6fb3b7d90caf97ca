"""The bare floor for digits: FastAPI + Pillow decode + one LiteRT call, nothing else.

No preprocessing beyond a resize to 28x28, no logging, metrics, limits or validation: what serving
this model cannot go below on this stack. Served like the project (gunicorn, one uvicorn worker) by
``bench/digits_floor.py``.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response

from bench.frameworks.digit import Digit

digit = Digit()  # Pillow decode, a resize to 28x28, one LiteRT call (the frameworks serve the same)
app = FastAPI()


@app.post("/predict")
async def predict(request: Request) -> Response:
    label = digit.label(await request.body())
    return Response(f'{{"label":"{label}"}}', media_type="application/json")
