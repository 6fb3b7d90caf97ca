"""What an idle thread gives segmentation, and what it takes from other work, on two workers.

    .venv-dev/bin/python -m bench.idle_threads [--rounds 3] [--seconds 12]

Two servers take turns, ``--rounds`` times: the default settings (segmentation's interpreter has one
thread and one at idle priority, ``app.core.runtime``) and ``IDLE_THREADS=false`` (one thread). Each
runs gunicorn with two workers, the Procfile way, and is sent with ``hey`` (raw PNG bodies,
keep-alive), one phase after another:

* **alone**: one 512 x 512 slice at a time, 20 requests: the latency a lone client sees;
* **segmentation**: 4 clients posting the slice for ``--seconds``: throughput when segmentations
  fill both workers;
* **mixed**: 2 clients posting the slice and, at the same time, 4 clients posting an MNIST digit:
  each kind's throughput when the other kind keeps the other core busy.

Reported: each phase's median over the rounds for both settings and their ratio. Writes
``bench/results/idle_threads.json``.
"""

from __future__ import annotations

import argparse
import statistics
import threading
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

MODES = {"idle threads (default)": {}, "one thread": {"IDLE_THREADS": "false"}}


def seconds_of(rps_guess: float, seconds: float) -> int:
    return max(8, int(rps_guess * seconds))


def one_round(env: dict[str, str], slice_png: bytes, digit_png: bytes, seconds: float) -> dict[str, Any]:
    with running_server(env, workers=2, python=serving_python()) as live:
        segment = live.base_url + "/v1/segmentation/predict?format=json"
        digits = live.base_url + "/v1/digits/predict"
        hey(segment, slice_png, "image/png", 8, 2)  # both workers warm
        alone = hey(segment, slice_png, "image/png", 20, 1)
        full = hey(segment, slice_png, "image/png", seconds_of(12, seconds), 4)
        mixed: dict[str, Any] = {}

        def run(name: str, url: str, body: bytes, requests: int, clients: int) -> None:
            mixed[name] = hey(url, body, "image/png", requests, clients)

        both = [threading.Thread(target=run, args=("segmentation", segment, slice_png, seconds_of(6, seconds), 2)),
                threading.Thread(target=run, args=("digits", digits, digit_png, seconds_of(800, seconds), 4))]
        for thread in both:
            thread.start()
        for thread in both:
            thread.join()
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
    rounds: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for number in range(args.rounds):
        for mode, env in MODES.items():
            result = one_round(env, slice_png, digit_png, args.seconds)
            rounds[mode].append(result)
            print(f"round {number + 1}, {mode}: {result}", flush=True)
    keys = ["alone_p50_ms", "segmentation_rps", "mixed_segmentation_rps", "mixed_digits_rps"]
    medians = {mode: {key: round(statistics.median(r[key] for r in results), 2) for key in keys}
               for mode, results in rounds.items()}
    idle, one = medians["idle threads (default)"], medians["one thread"]
    ratios = {key: round(idle[key] / one[key], 3) for key in keys}
    for mode, figures in medians.items():
        print(f"{mode}: {figures}")
    print(f"idle threads / one thread: {ratios}")
    write_results("idle_threads", {"rounds": args.rounds, "seconds": args.seconds, "workers": 2,
                                   "medians": medians, "idle_over_one_thread": ratios,
                                   "failed": sum(r["failed"] for results in rounds.values() for r in results),
                                   "rounds_detail": rounds})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
