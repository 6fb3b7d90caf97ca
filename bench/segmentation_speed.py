"""A 512 x 512 segmentation end to end, model versions side by side on the same code, one run.

    .venv-dev/bin/python -m bench.segmentation_speed [--before 1.0.0] [--after 1.3.0 1.2.0 1.1.0] [--rounds 5]
                                                     [--code-before 2a37e37] [--idle-threads] [--no-spare]
                                                     [--threads 2] [--large 2]

One server per version (gunicorn, one worker, the serving environment, its default settings: one
LiteRT thread, and for a big job's tiles a helper thread while the other CPU is idle), the same
code, each pinned to its version with ``MODEL_VERSIONS``; with ``--idle-threads``, each
``--after`` version a second time with ``IDLE_THREADS=true`` (named ``VERSION + idle thread``: one
more thread at idle priority); with ``--no-spare``, each ``--after`` version a second time with
``SPARE_CPU=false`` (named ``VERSION, no spare CPU``: a 2048 x 2048 image, a big job, without the
helper thread that runs tiles on an idle CPU); with ``--threads N``, each ``--after`` version with
``INFERENCE_THREADS=N`` (named ``VERSION x N threads``); with ``--code-before REF``, one more
server running the code (and models) of commit ``REF`` as they were, extracted under ``var/``. For
each:

* **MACs per 512 x 512 image**, counted from the ``.tflite`` graph (every convolution, transposed
  convolution and dense layer: output elements x kernel size x input channels) times the number of
  tiles the server's overlap-tiling cuts a 512 x 512 image into;
* **held-out quality through HTTP**: slices 25-29 posted as PNGs, the returned masks scored against
  the labels over all pixels together (pixel accuracy, membrane IoU);
* **latency**: one 512 x 512 slice posted (a multipart file) ``--requests`` times per round, the servers taking turns
  ``--rounds`` times; medians of the rounds' medians, and each ratio to ``--before`` and to the code
  at ``--code-before``; with ``--large K``, the slice enlarged to 2048 x 2048 posted K times per
  round too.

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
    checkout,
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


def tiling(version: str) -> tuple[int, int]:
    """The tile and margin a committed version's server cuts images with (its metadata's)."""
    params = json.loads((MODELS / version / "metadata.json").read_text()).get("params", {})
    return int(params.get("tile", TILE)), int(params.get("margin", MARGIN))


def describe(version: str) -> dict:
    metadata = json.loads((MODELS / version / "metadata.json").read_text())
    params = metadata.get("params", {})
    tile, margin = tiling(version)
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
    parser.add_argument("--after", nargs="+", default=["1.4.0", "1.3.0", "1.2.0", "1.1.0"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--code-before", default=None, help="a commit whose code and models also serve")
    parser.add_argument("--threads", type=int, default=1, help="each --after version also on this many threads")
    parser.add_argument("--idle-threads", action="store_true",
                        help="each --after version also with IDLE_THREADS=true: a thread at idle priority")
    parser.add_argument("--no-spare", action="store_true",
                        help="each --after version also with SPARE_CPU=false: big jobs on one thread")
    parser.add_argument("--large", type=int, default=0, help="2048 x 2048 requests per round")
    args = parser.parse_args()
    slice_25 = Image.open(SHARED_DATA / "membrane" / "train" / "image" / "25.png").convert("L")
    image = png_bytes(np.asarray(slice_25))
    large = png_bytes(np.asarray(slice_25.resize((2048, 2048), Image.BILINEAR)))
    python = serving_python()
    versions = [args.before, *args.after]
    result: dict = {"before": args.before, "code_before": args.code_before, "threads": args.threads,
                    "versions": {version: describe(version) for version in versions}}
    # name -> (the version served, the server's settings, the checkout it runs)
    targets = {version: (version, {"MODEL_VERSIONS": json.dumps({"segmentation": version})}, REPO_ROOT)
               for version in versions}
    if args.idle_threads:
        for version in args.after:
            name = f"{version} + idle thread"
            targets[name] = (version, {**targets[version][1], "IDLE_THREADS": "true"}, REPO_ROOT)
            result["versions"][name] = {**result["versions"][version], "idle_threads": True}
    if args.no_spare:
        for version in args.after:
            name = f"{version}, no spare CPU"
            targets[name] = (version, {**targets[version][1], "SPARE_CPU": "false"}, REPO_ROOT)
            result["versions"][name] = {**result["versions"][version], "spare_cpu": False}
    if args.threads > 1:
        for version in args.after:
            name = f"{version} x {args.threads} threads"
            targets[name] = (version, {**targets[version][1], "INFERENCE_THREADS": str(args.threads)}, REPO_ROOT)
            result["versions"][name] = {**result["versions"][version], "inference_threads": args.threads}
    if args.code_before:
        name = f"code at {args.code_before}"
        targets[name] = (None, {}, checkout(args.code_before))
        result["versions"][name] = {"commit": args.code_before}
    samples: dict[str, list[list[float]]] = {name: [] for name in targets}
    samples_large: dict[str, list[float]] = {name: [] for name in targets}
    with contextlib.ExitStack() as stack:
        clients = {}
        for name, (version, env, tree) in targets.items():
            server = stack.enter_context(running_server(env, python=python, cwd=tree))
            clients[name] = stack.enter_context(httpx.Client(base_url=server.base_url, timeout=120.0))
        for name, client in clients.items():
            served = [m for m in client.get("/v1/models").json()["models"] if m["task"] == "segmentation"]
            assert targets[name][0] is None or any(m["version"] == targets[name][0] for m in served), served
            result["versions"][name]["served_version"] = served[0]["version"]
            metrics, _ = held_out(client)
            result["versions"][name]["held_out_http"] = {k: metrics[k] for k in ("pixel_accuracy", "iou_membrane")}
            print(f"{name}: held out {result['versions'][name]['held_out_http']}", flush=True)
        for _ in range(args.rounds):
            for name, client in clients.items():
                times = []
                for body, runs, kept in ((image, args.requests, times), (large, args.large, samples_large[name])):
                    for _ in range(runs):
                        started = time.perf_counter()
                        # multipart, as every version of the endpoint takes it (the raw body came later)
                        response = client.post(URL, files={"image": ("image.png", body, "image/png")}, timeout=60)
                        elapsed = (time.perf_counter() - started) * 1000.0
                        if body is large and response.status_code != 200:  # a code that refuses 2048 x 2048
                            result["versions"][name]["large_refused"] = f"{response.status_code} {response.text[:200]}"
                            break
                        response.raise_for_status()
                        kept.append(elapsed)
                samples[name].append(times)
                print(f"{name}: 512x512 median {statistics.median(times):.1f} ms", flush=True)
    for name in targets:
        result["versions"][name]["latency_512"] = {
            "median_ms": round(statistics.median(statistics.median(r) for r in samples[name]), 1),
            "rounds_median_ms": [round(statistics.median(r), 1) for r in samples[name]],
            **percentiles([t for r in samples[name] for t in r])}
        if samples_large[name]:
            result["versions"][name]["latency_2048_median_ms"] = round(statistics.median(samples_large[name]), 1)
    baseline = result["versions"][args.before]
    code_before = result["versions"].get(f"code at {args.code_before}")
    for name in targets:
        entry = result["versions"][name]
        if name != args.before and "gmacs_per_512" in entry:
            entry["ratio_to_before"] = round(entry["latency_512"]["median_ms"] / baseline["latency_512"]["median_ms"], 3)
            entry["macs_ratio_to_before"] = round(entry["gmacs_per_512"] / baseline["gmacs_per_512"], 3)
        if code_before is not None and entry is not code_before:
            entry["ratio_to_code_before"] = round(
                entry["latency_512"]["median_ms"] / code_before["latency_512"]["median_ms"], 3)
        print(f"{name}: 512 {entry['latency_512']['median_ms']} ms, 2048 {entry.get('latency_2048_median_ms')} ms, "
              f"to {args.before} {entry.get('ratio_to_before')}, to the old code {entry.get('ratio_to_code_before')}, "
              f"held out {entry['held_out_http']}", flush=True)
    write_results("segmentation_speed", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
