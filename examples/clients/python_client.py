"""Calling the service from Python with a client generated from its OpenAPI document.

    pip install openapi-python-client
    openapi-python-client generate --url http://localhost:8000/openapi.json --meta none \\
        --output-path inference_client
    python examples/clients/python_client.py http://localhost:8000

Only generated classes: typed instances, typed probabilities, file parts with or without a name.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

from inference_client import Client
from inference_client.api.clustering import clustering_predict
from inference_client.api.digits import digits_predict
from inference_client.api.emotion import emotion_predict
from inference_client.models import (
    ClusteringInstance,
    ClusteringPredictRequest,
    DigitsPredictFilesBody,
    EmotionPredictFilesBody,
)
from inference_client.types import File

EXAMPLES = Path(__file__).resolve().parents[1]


def main(base_url: str) -> dict:
    client = Client(base_url=base_url, raise_on_unexpected_status=True)

    # A digit: the file part needs no name.
    digits = digits_predict.sync(client=client, body=DigitsPredictFilesBody(
        image=[File(payload=io.BytesIO((EXAMPLES / "digit-7-drawn.png").read_bytes()))]))
    digit = digits.predictions[0]
    best = max(digit.classes, key=lambda c: c.probability)

    # The emotion of a clip, with the answer's headers (request id, version) beside the body.
    answer = emotion_predict.sync_detailed(client=client, body=EmotionPredictFilesBody(
        audio=[File(payload=io.BytesIO((EXAMPLES / "emodb-08a01Wa-anger.wav").read_bytes()), file_name="clip.wav")]))
    clip = answer.parsed.predictions[0]

    # Customer segments from typed instances.
    segments = clustering_predict.sync(client=client, body=ClusteringPredictRequest(instances=[
        ClusteringInstance(annual_income=15, spending_score=39),
        ClusteringInstance(annual_income=120, spending_score=85)]))

    return {"digit": digit.label, "digit_confidence": best.probability, "digit_best_class": best.label,
            "emotion": clip.label, "emotion_classes": [c.label for c in clip.classes],
            "emotion_version": answer.headers["X-Model-Version"], "request_id": answer.headers["X-Request-ID"],
            "segments": [p.segment for p in segments.predictions]}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1] if len(sys.argv) > 1 else "http://localhost:8000")))
