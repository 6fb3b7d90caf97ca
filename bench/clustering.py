"""Clustering latency through HTTP on the real server (the Procfile command, one worker):
predict with 100 rows, ad-hoc fit of 1 000 x 5 random data (k chosen over 2..10), and for
reference a palette of a 512 x 512 photo-like image and a 10 000 x 50 fit.

    python -m bench.clustering [--predict-runs 200] [--fit-runs 20]
"""

from __future__ import annotations

import argparse
import io
import time

import httpx
import numpy as np
from PIL import Image

from bench.common import (
    percentiles,
    serving_python,
    wait_for_model,
    write_results,
)
from bench.liveserver import running_server


def timed(client: httpx.Client, runs: int, warmup: int, send) -> tuple[list[float], list[httpx.Response]]:
    samples, responses = [], []
    for i in range(warmup + runs):
        started = time.perf_counter()
        response = send()
        elapsed = (time.perf_counter() - started) * 1000.0
        response.raise_for_status()
        if i >= warmup:
            samples.append(elapsed)
            responses.append(response)
    return samples, responses


def photo_png(size: int = 512) -> bytes:
    """Smooth colour gradients plus noise: many distinct colours, like a photograph."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.stack([200 * x + 30, 180 * y + 40, 120 * (1 - x * y) + 60], axis=-1)
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--predict-runs", type=int, default=200)
    parser.add_argument("--fit-runs", type=int, default=20)
    parser.add_argument("--big-fit-runs", type=int, default=3)
    parser.add_argument("--palette-runs", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    instances = [{"annual_income": float(a), "spending_score": float(s)}
                 for a, s in zip(rng.uniform(10, 140, 100), rng.uniform(1, 100, 100), strict=True)]
    fit_data = rng.normal(size=(1000, 5)).round(4).tolist()
    big_centres = rng.normal(0, 6, size=(4, 50))
    big_data = (big_centres[rng.integers(0, 4, 10_000)] + rng.normal(size=(10_000, 50))).round(3).tolist()
    picture = photo_png()

    python = serving_python()
    with running_server(workers=1, ready=False, python=python) as server, \
            httpx.Client(base_url=server.base_url, timeout=60.0) as client:
        version = wait_for_model(client, "clustering")
        predict_ms, _ = timed(client, args.predict_runs, 10, lambda: client.post(
            "/v1/clustering/predict", json={"instances": instances}))
        print(f"predict (100 rows): {percentiles(predict_ms)}")
        fit_ms, fits = timed(client, args.fit_runs, 2, lambda: client.post(
            "/v1/clustering/fit", json={"data": fit_data, "k": None, "k_min": 2, "k_max": 10}))
        print(f"fit (1000 x 5, k 2..10): {percentiles(fit_ms)}")
        big_ms, bigs = timed(client, args.big_fit_runs, 0, lambda: client.post(
            "/v1/clustering/fit", json={"data": big_data, "k_max": 10}))
        print(f"fit (10000 x 50, k 2..10): {percentiles(big_ms)}")
        palette_ms, palettes = timed(client, args.palette_runs, 1, lambda: client.post(
            "/v1/clustering/palette", data={"colors": "5"},
            files={"image": ("photo.png", picture, "image/png")}))
        print(f"palette (512 x 512, 5 colours): {percentiles(palette_ms)}")

    results = {
        "environment": "serving .venv (requirements.txt)" if python else "current interpreter",
        "server": "gunicorn + uvicorn worker, 1 worker, loopback HTTP",
        "model_version": version,
        "predict_100_rows": percentiles(predict_ms),
        "fit_1000x5_k2_10": {**percentiles(fit_ms), "chosen_k": answer(fits[-1])["k"],
                             "server_duration_ms_median": float(np.median(
                                 [answer(r)["duration_ms"] for r in fits]))},
        "fit_10000x50_k2_10": {**percentiles(big_ms), "chosen_k": answer(bigs[-1])["k"],
                               "server_duration_ms_median": float(np.median(
                                   [answer(r)["duration_ms"] for r in bigs]))},
        "palette_512x512_5_colours": {**percentiles(palette_ms),
                                      "colors": [c["hex"] for c in answer(palettes[-1])["colors"]]},
        "note": "2-core machine, the client on the same cores",
    }
    write_results("clustering", results)


def answer(response: httpx.Response) -> dict:
    """The one prediction of a fit or palette answer (the envelope's ``predictions``)."""
    return response.json()["predictions"][0]


if __name__ == "__main__":
    main()
