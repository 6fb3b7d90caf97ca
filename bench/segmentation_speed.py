"""A 512 x 512 segmentation end to end, model versions side by side on the same code, one run.

    .venv-dev/bin/python -m bench.segmentation_speed [--before 1.0.0] [--after 1.2.0 1.1.0] [--rounds 5]

One server per version (gunicorn, one worker, the serving environment), the same code, each pinned
to its version with ``MODEL_VERSIONS``. For each version:

* **MACs per 512 x 512 image**, counted from the ``.tflite`` graph (every convolution, transposed
  convolution and dense layer: output elements x kernel size x input channels) times the number of
  tiles the server's overlap-tiling cuts a 512 x 512 image into;
* **held-out quality through HTTP**: slices 25-29 posted as PNGs, the returned masks scored against
  the labels over all pixels together (pixel accuracy, membrane IoU);
* **latency**: one 512 x 512 slice posted ``--requests`` times per round, the servers taking turns
  ``--rounds`` times; medians of the rounds' medians, and each ratio to ``--before``.

An int8 model does the same MACs as its fp32 parent, in 8-bit arithmetic.

Writes ``bench/results/segmentation_speed.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import httpx
import numpy as np
from PIL import Image

from app.tasks.segmentation.preprocess import (
    MARGIN,
    TILE,
    TileLayout,
)
from bench.common import (
    REPO_ROOT,
    SHARED_DATA,
    percentiles,
    png_bytes,
    serving_python,
    write_results,
)
from bench.liveserver import running_server
from bench.segmentation import URL, held_out

MODELS = REPO_ROOT / "models" / "segmentation"


def macs_per_call(model_path) -> int:
    """Multiply-accumulates of one interpreter call, from the graph's convolutions and dense layers."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(model_path), num_threads=1)
    interpreter.allocate_tensors()
    shapes = {t["index"]: tuple(int(d) for d in t["shape"]) for t in interpreter.get_tensor_details()}
    total = 0
    for op in interpreter._get_ops_details():  # noqa: SLF001 (the public API has no graph walk)
        name, inputs, outputs = op["op_name"], list(op["inputs"]), list(op["outputs"])
        if name == "CONV_2D":
            out, weights = shapes[outputs[0]], shapes[inputs[1]]  # weights: (out, kh, kw, in)
            total += int(np.prod(out)) * weights[1] * weights[2] * weights[3]
        elif name == "DEPTHWISE_CONV_2D":
            out, weights = shapes[outputs[0]], shapes[inputs[1]]  # weights: (1, kh, kw, out)
            total += int(np.prod(out)) * weights[1] * weights[2]
        elif name == "TRANSPOSE_CONV":
            weights, source = shapes[inputs[1]], shapes[inputs[2]]  # weights: (out, kh, kw, in)
            total += int(np.prod(source)) * weights[0] * weights[1] * weights[2]
        elif name == "FULLY_CONNECTED":
            out, weights = shapes[outputs[0]], shapes[inputs[1]]
            total += int(np.prod(out)) * weights[1]
    return total


def describe(version: str) -> dict:
    metadata = json.loads((MODELS / version / "metadata.json").read_text())
    params = metadata.get("params", {})
    tile, margin = int(params.get("tile", TILE)), int(params.get("margin", MARGIN))
    tiles = len(TileLayout(512, 512, tile, margin))
    per_call = macs_per_call(MODELS / version / "model.tflite")
    return {"version": version, "base_filters": params.get("base_filters"), "tile": tile, "margin": margin,
            "tiles_per_512": tiles, "gmacs_per_tile": round(per_call / 1e9, 3),
            "gmacs_per_512": round(per_call * tiles / 1e9, 3),
            "model_bytes": (MODELS / version / "model.tflite").stat().st_size,
            "training_held_out": {k: metadata["metrics"][k] for k in
                                  ("held_out_pixel_accuracy", "held_out_iou_membrane")}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="1.0.0")
    parser.add_argument("--after", nargs="+", default=["1.2.0", "1.1.0"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=10)
    args = parser.parse_args()
    image = png_bytes(np.asarray(Image.open(SHARED_DATA / "membrane" / "train" / "image" / "25.png").convert("L")))
    python = serving_python()
    versions = [args.before, *args.after]
    result: dict = {"before": args.before, "versions": {version: describe(version) for version in versions}}
    samples: dict[str, list[list[float]]] = {version: [] for version in versions}
    with contextlib.ExitStack() as stack:
        clients = {}
        for version in versions:
            server = stack.enter_context(running_server({"MODEL_VERSIONS": json.dumps({"segmentation": version})},
                                                        python=python))
            clients[version] = stack.enter_context(httpx.Client(base_url=server.base_url, timeout=120.0))
        for version, client in clients.items():
            served = client.get("/v1/models").json()["models"]
            assert any(m["task"] == "segmentation" and m["version"] == version for m in served), served
            metrics, _ = held_out(client)
            result["versions"][version]["held_out_http"] = {k: metrics[k] for k in ("pixel_accuracy", "iou_membrane")}
            print(f"{version}: held out {result['versions'][version]['held_out_http']}", flush=True)
        for _ in range(args.rounds):
            for version, client in clients.items():
                times = []
                for _ in range(args.requests):
                    started = time.perf_counter()
                    response = client.post(URL, content=image, headers={"Content-Type": "image/png"}, timeout=60)
                    times.append((time.perf_counter() - started) * 1000.0)
                    response.raise_for_status()
                samples[version].append(times)
                print(f"{version}: 512x512 median {statistics.median(times):.1f} ms", flush=True)
    for version in versions:
        result["versions"][version]["latency_512"] = {
            "median_ms": round(statistics.median(statistics.median(r) for r in samples[version]), 1),
            "rounds_median_ms": [round(statistics.median(r), 1) for r in samples[version]],
            **percentiles([t for r in samples[version] for t in r])}
    baseline = result["versions"][args.before]
    for version in args.after:
        entry = result["versions"][version]
        entry["ratio_to_before"] = round(entry["latency_512"]["median_ms"] / baseline["latency_512"]["median_ms"], 3)
        entry["macs_ratio_to_before"] = round(entry["gmacs_per_512"] / baseline["gmacs_per_512"], 3)
        print(f"{version}: {entry['ratio_to_before']}x the time of {args.before}, held out "
              f"{entry['held_out_http']}", flush=True)
    write_results("segmentation_speed", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
