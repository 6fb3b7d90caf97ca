"""Digits through HTTP on a real server: accuracy on the full MNIST test set, and latency.

    .venv-train/bin/python -m bench.digits [--requests 200] [--batch 256] [--workers 1]

1. Accuracy: all 10,000 MNIST test digits as JSON ``pixels`` in batches of ``--batch`` (the same
   preprocessing and model a client gets), compared with the labels.
2. Latency: ``--requests`` sequential single-image requests, each one 28x28 MNIST test digit as a
   PNG upload (multipart), end to end from the client (connection kept alive), after a warm-up.
3. Batch latency: the accuracy run's per-request times (256 digits each).
"""

from __future__ import annotations

import argparse
import time

import httpx
import numpy as np

from bench.common import (
    SHARED_DATA,
    percentiles,
    png_bytes,
    serving_python,
    wait_for_model,
    write_results,
)
from bench.liveserver import running_server

URL = "/v1/digits/predict"






def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED_DATA / "mnist" / "mnist.npz"))
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    with np.load(args.data) as data:
        images, labels = data["x_test"], data["y_test"].astype(int)
    pngs = [png_bytes(images[i]) for i in range(args.requests)]

    python = serving_python()
    # ready=False: this bench needs the digits model only, not every task's.
    with running_server(workers=args.workers, python=python, ready=False) as server, \
            httpx.Client(base_url=server.base_url, timeout=60.0) as client:
        version = wait_for_model(client, "digits")
        print(f"server up in {server.boot_seconds:.1f}s ({python or 'this interpreter'}), digits {version}",
              flush=True)

        predicted: list[int] = []
        batch_ms: list[float] = []
        started = time.perf_counter()
        for start in range(0, len(images), args.batch):
            body = {"instances": [{"pixels": image.tolist()} for image in images[start:start + args.batch]]}
            t0 = time.perf_counter()
            response = client.post(URL, json=body)
            batch_ms.append((time.perf_counter() - t0) * 1000.0)
            response.raise_for_status()
            predicted.extend(p["digit"] for p in response.json()["predictions"])
            if (start // args.batch) % 10 == 0:
                print(f"  {start + args.batch:>5}/{len(images)} digits", flush=True)
        accuracy_seconds = time.perf_counter() - started
        correct = int((np.asarray(predicted) == labels).sum())
        accuracy = correct / len(labels)
        print(f"accuracy through HTTP: {accuracy:.4%} ({correct}/{len(labels)}) in {accuracy_seconds:.1f}s",
              flush=True)

        for i in range(10):  # warm-up: connection, worker, interpreter at batch size 1
            client.post(URL, files={"image": ("w.png", pngs[i], "image/png")}).raise_for_status()
        single_ms: list[float] = []
        agree = 0
        for i, data in enumerate(pngs):
            t0 = time.perf_counter()
            response = client.post(URL, files={"image": (f"{i}.png", data, "image/png")})
            single_ms.append((time.perf_counter() - t0) * 1000.0)
            response.raise_for_status()
            agree += response.json()["predictions"][0]["digit"] == labels[i]
        single = percentiles(single_ms)
        print(f"one 28x28 PNG: p50 {single['p50_ms']:.1f} ms, p95 {single['p95_ms']:.1f} ms "
              f"({args.requests} sequential requests)", flush=True)

    write_results("digits", {
        "model": "digits", "version": version, "workers": args.workers,
        "serving_python": python or "training venv",
        "accuracy": {"dataset": "MNIST test set", "n": len(labels), "correct": correct,
                     "accuracy": round(accuracy, 6), "batch_size": args.batch, "api": "JSON pixels",
                     "seconds": round(accuracy_seconds, 2),
                     "digits_per_second": round(len(labels) / accuracy_seconds, 1)},
        "latency_single_png": {**single, "image": "28x28 MNIST test digit, PNG, multipart",
                               "correct": int(agree)},
        "latency_batch": {**percentiles(batch_ms), "batch_size": args.batch, "api": "JSON pixels"},
    })


if __name__ == "__main__":
    main()
