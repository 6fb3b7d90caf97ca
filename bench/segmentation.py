"""Segmentation through HTTP: held-out accuracy, IoU and Dice on slices 25-29, and latency.

Starts the real server (gunicorn, one worker), posts each held-out slice as a PNG to
``POST /v1/segmentation/predict`` and scores the returned masks (255 = membrane) against the labels
(0 = membrane) over all pixels together; then times one 512 x 512 image end to end.

    cd /work/main && .venv-train/bin/python -m bench.segmentation [--runs 10]
"""

from __future__ import annotations

import argparse
import io
import time

import httpx
import numpy as np
from PIL import Image

from app.tasks.segmentation.preprocess import segmentation_metrics
from bench.common import (
    SHARED_DATA,
    percentiles,
    png_bytes,
    serving_python,
    wait_for_model,
    write_results,
)
from bench.liveserver import running_server

URL = "/v1/segmentation/predict"
TEST_SLICES = [25, 26, 27, 28, 29]






def timed_post(client: httpx.Client, data: bytes) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = client.post(URL, files={"image": ("image.png", data, "image/png")})
    elapsed = (time.perf_counter() - started) * 1000.0
    response.raise_for_status()
    return elapsed, response


def held_out(client: httpx.Client) -> tuple[dict[str, float], dict[str, float]]:
    """Slices 25-29 through the endpoint, the masks scored against the labels over all their pixels
    together (metrics rounded to 4 places), and each slice's pixel accuracy."""
    data_dir = SHARED_DATA / "membrane" / "train"
    predicted, truth = [], []
    per_slice = {}
    for i in TEST_SLICES:
        image = np.asarray(Image.open(data_dir / "image" / f"{i}.png"))
        _, response = timed_post(client, png_bytes(image))
        mask = np.asarray(Image.open(io.BytesIO(response.content))) == 255
        membrane = np.asarray(Image.open(data_dir / "label" / f"{i}.png")) == 0
        assert mask.shape == membrane.shape
        predicted.append(mask)
        truth.append(membrane)
        per_slice[str(i)] = round(float(np.mean(mask == membrane)), 4)
        print(f"slice {i}: pixel accuracy {per_slice[str(i)]:.4f}", flush=True)
    scores = segmentation_metrics(np.stack(predicted), np.stack(truth))
    return {name: round(value, 4) for name, value in scores.items()}, per_slice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="timed requests of one 512x512 image")
    args = parser.parse_args()
    data_dir = SHARED_DATA / "membrane" / "train"

    with running_server(ready=False, python=serving_python()) as server, \
            httpx.Client(base_url=server.base_url, timeout=120.0) as client:
        version = wait_for_model(client, "segmentation")
        metrics, per_slice = held_out(client)

        one = png_bytes(np.asarray(Image.open(data_dir / "image" / "25.png")))
        for _ in range(2):  # warm-up: first requests pay for connection setup and allocation
            timed_post(client, one)
        latencies = [timed_post(client, one)[0] for _ in range(args.runs)]
        big = png_bytes(np.tile(np.asarray(Image.open(data_dir / "image" / "25.png")), (2, 2)))
        big_latencies = [timed_post(client, big)[0] for _ in range(3)]

    results = {
        "model": "segmentation",
        "version": version,
        "held_out_slices": TEST_SLICES,
        "held_out": {**metrics, "pixel_accuracy_per_slice": per_slice},
        "latency_512x512": {**percentiles(latencies), "runs": args.runs,
                            "note": "end to end over HTTP (PNG upload, 4 tiles of 320 px, PNG mask), "
                                    "one gunicorn worker, 1 LiteRT thread"},
        "latency_1024x1024": {**percentiles(big_latencies), "runs": 3},
        "server_python": serving_python() or "training venv",
    }
    path = write_results("segmentation", results)
    print(f"held-out pixel accuracy {metrics['pixel_accuracy']:.4f}, IoU membrane "
          f"{metrics['iou_membrane']:.4f}, IoU interior {metrics['iou_interior']:.4f}, Dice "
          f"{metrics['dice_membrane']:.4f}; 512x512 p50 {results['latency_512x512']['p50_ms']:.0f} ms "
          f"-> {path}")


if __name__ == "__main__":
    main()
