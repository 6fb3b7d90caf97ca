"""What an idle thread gives segmentation, and what it takes from other work, on two workers.

    .venv-dev/bin/python -m bench.idle_threads [--rounds 3] [--seconds 12]

Two servers take turns, ``--rounds`` times: ``IDLE_THREADS=true`` (segmentation's interpreter has
one thread and one at idle priority, ``app.core.runtime``) and the default settings (one thread). Each
runs gunicorn with two workers, the Procfile way, and is sent with ``hey`` (raw PNG bodies,
keep-alive), one phase after another:

* **alone**: one 512 x 512 slice at a time, 20 requests: the latency a lone client sees;
* **segmentation**: 4 clients posting the slice for ``--seconds``: throughput when segmentations
  fill both workers;
* **mixed**: for the same time, 2 clients posting the slice and 4 clients posting an MNIST digit:
  each kind's throughput when the other kind keeps the other core busy.

Each phase but the first runs for a fixed time (``hey -z``), so the two kinds of the mixed phase
overlap from start to end.

Reported: each phase's median over the rounds for both settings and their ratio. Writes
``bench/results/idle_threads.json``.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from bench.common import (
    SHARED_DATA,
    mnist_digit_png,
    png_bytes,
    serving_python,
    write_results,
)
from bench.liveserver import running_server
from bench.load import hey

MODES = {"idle thread": {"IDLE_THREADS": "true"}, "one thread (default)": {}}


def hey_for(url: str, body: bytes, seconds: float, clients: int) -> dict[str, Any]:
    """``hey -z``: ``clients`` keep-alive clients posting ``body`` for ``seconds``; req/s and failures."""
    with tempfile.NamedTemporaryFile(suffix=".body") as f:
        f.write(body)
        f.flush()
        out = subprocess.run(["hey", "-z", f"{seconds:g}s", "-c", str(clients), "-m", "POST", "-T", "image/png",
                              "-D", f.name, url], capture_output=True, text=True, timeout=seconds + 120,
                             check=True).stdout
    statuses = {code: int(n) for code, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", out)}
    _, _, error_part = out.partition("Error distribution:")  # transport errors: "  [count]\tPost ...: EOF"
    errors = sum(int(n) for n in re.findall(r"(?m)^\s+\[(\d+)\]\s", error_part))
    return {"throughput_rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "failed": sum(n for code, n in statuses.items() if code != "200") + errors}


def side_by_side(segment: str, image: bytes, image_clients: int, digits: str, digit_png: bytes,
                 seconds: float) -> dict[str, dict[str, Any]]:
    """``image_clients`` clients posting ``image`` and 4 posting a digit, for the same ``seconds``:
    each kind's :func:`hey_for` figures (``segmentation``, ``digits``)."""
    mixed: dict[str, dict[str, Any]] = {}

    def run(name: str, url: str, body: bytes, clients: int) -> None:
        mixed[name] = hey_for(url, body, seconds, clients)

    both = [threading.Thread(target=run, args=("segmentation", segment, image, image_clients)),
            threading.Thread(target=run, args=("digits", digits, digit_png, 4))]
    for thread in both:
        thread.start()
    for thread in both:
        thread.join()
    return mixed


def one_round(env: dict[str, str], slice_png: bytes, digit_png: bytes, seconds: float) -> dict[str, Any]:
    with running_server(env, workers=2, python=serving_python()) as live:
        segment = live.base_url + "/v1/segmentation/predict?format=json"
        digits = live.base_url + "/v1/digits/predict"
        hey(segment, slice_png, "image/png", 8, 2)  # both workers warm
        alone = hey(segment, slice_png, "image/png", 20, 1)
        full = hey_for(segment, slice_png, seconds, 4)
        mixed = side_by_side(segment, slice_png, 2, digits, digit_png, seconds)
    failed = alone["failed"] + full["failed"] + mixed["segmentation"]["failed"] + mixed["digits"]["failed"]
    return {"alone_p50_ms": alone["p50_ms"], "segmentation_rps": full["throughput_rps"],
            "mixed_segmentation_rps": mixed["segmentation"]["throughput_rps"],
            "mixed_digits_rps": mixed["digits"]["throughput_rps"], "failed": failed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=12.0)
    args = parser.parse_args()
    slice_png = png_bytes(np.asarray(Image.open(SHARED_DATA / "membrane" / "train" / "image" / "25.png").convert("L")))
    digit_png = mnist_digit_png()
    keys = ["alone_p50_ms", "segmentation_rps", "mixed_segmentation_rps", "mixed_digits_rps"]
    figures = alternate(MODES, lambda env: one_round(env, slice_png, digit_png, args.seconds), args.rounds,
                        keys, "idle_over_one_thread")
    write_results("idle_threads", {"rounds": args.rounds, "seconds": args.seconds, "workers": 2, **figures})
    return 0


def alternate(modes: dict[str, dict[str, str]], run_round: Callable[[dict[str, str]], dict[str, Any]],
              rounds_n: int, keys: list[str], ratio_name: str) -> dict[str, Any]:
    """``run_round(env)`` for each of two modes in turn, ``rounds_n`` times: each mode's medians of
    ``keys``, the first mode's medians over the second's (as ``ratio_name``), the failed requests
    and every round's figures."""
    rounds: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for number in range(rounds_n):
        for mode, env in modes.items():
            result = run_round(env)
            rounds[mode].append(result)
            print(f"round {number + 1}, {mode}: {result}", flush=True)
    medians = {mode: {key: round(statistics.median(r[key] for r in results), 2) for key in keys}
               for mode, results in rounds.items()}
    first, second = (medians[mode] for mode in modes)
    ratios = {key: round(first[key] / second[key], 3) for key in keys}
    for mode, figures in medians.items():
        print(f"{mode}: {figures}")
    print(f"{ratio_name}: {ratios}")
    return {"medians": medians, ratio_name: ratios,
            "failed": sum(r["failed"] for results in rounds.values() for r in results), "rounds_detail": rounds}


if __name__ == "__main__":
    raise SystemExit(main())
