"""LitServe serving the floor's digit (``python bench/frameworks/litserve_app.py PORT``).

A ``LitAPI`` as LitServe's documentation writes one: JSON ``{"image_b64": "..."}`` in (LitServe
reads JSON or forms, not a raw body), ``{"label": "7"}`` out; one API server and one inference
worker (LitServe always runs them as separate processes)."""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import litserve as ls

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digit import Digit  # noqa: E402


class DigitsAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.digit = Digit()

    def decode_request(self, request: dict) -> bytes:
        return base64.b64decode(request["image_b64"])

    def predict(self, png: bytes) -> int:
        return self.digit.label(png)

    def encode_response(self, label: int) -> dict:
        return {"label": str(label)}


if __name__ == "__main__":
    server = ls.LitServer(DigitsAPI(), accelerator="cpu", workers_per_device=1)
    server.run(port=int(sys.argv[1]), num_api_servers=1, generate_client_file=False)
