"""An MLServer custom runtime serving the floor's digit over the V2 protocol (a ``BYTES`` input
holding the PNG in base64, as V2 JSON carries bytes), ``mlserver start bench/frameworks/mlserver``."""

from __future__ import annotations

import base64
import sys
from pathlib import Path

from mlserver import MLModel
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digit import Digit  # noqa: E402


class DigitsRuntime(MLModel):
    async def load(self) -> bool:
        self.digit = Digit()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        png = base64.b64decode(payload.inputs[0].data[0])
        label = self.digit.label(png)
        return InferenceResponse(model_name=self.name, outputs=[
            ResponseOutput(name="label", shape=[1], datatype="INT64", data=[label])])
