"""What the spare CPU gives a big segmentation, and what it takes from other work, on two workers.

    .venv-dev/bin/python -m bench.spare_cpu [--rounds 3] [--seconds 15] [--alone 4]

Two servers take turns, ``--rounds`` times: the default settings (``SPARE_CPU=true``: a big job's
tiles also run on a helper thread with a second interpreter while another CPU is idle,
``app.core.spare``) and ``SPARE_CPU=false``. Each runs gunicorn with two workers, the Procfile way,
and is sent with ``hey`` (raw PNG bodies, keep-alive), one phase after another:

* **alone**: one 2048 x 2048 image at a time (the 512 x 512 slice 25 enlarged), ``--alone``
  requests: the latency a lone client sees;
* **mixed**: for ``--seconds``, one client posting the 2048 x 2048 image and 4 clients posting an
  MNIST digit: the big image's rate (and so its latency) and the digits' throughput while the other
  worker keeps a CPU busy;
* **digits alone**: the 4 digit clients alone for the same time, the reference for the mixed phase.

Reported: each phase's median over the rounds for both settings and their ratio (spare over none).
Writes ``bench/results/spare_cpu.json``.
"""

from __future__ import annotations

import argparse
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
from bench.idle_threads import alternate, hey_for, side_by_side
from bench.liveserver import running_server
from bench.load import hey

MODES = {"spare CPU (default)": {}, "no spare CPU": {"SPARE_CPU": "false"}}
KEYS = ["alone_2048_p50_ms", "mixed_2048_rps", "mixed_digits_rps", "digits_alone_rps"]


def one_round(env: dict[str, str], large_png: bytes, digit_png: bytes, seconds: float, alone_n: int) -> dict[str, Any]:
    with running_server(env, workers=2, python=serving_python()) as live:
        segment = live.base_url + "/v1/segmentation/predict"
        digits = live.base_url + "/v1/digits/predict"
        hey(segment, large_png, "image/png", 2, 2)  # both workers warm
        alone = hey(segment, large_png, "image/png", alone_n, 1)
        mixed = side_by_side(segment, large_png, 1, digits, digit_png, seconds)
        digits_alone = hey_for(digits, digit_png, seconds, 4)
    failed = alone["failed"] + mixed["segmentation"]["failed"] + mixed["digits"]["failed"] + digits_alone["failed"]
    return {"alone_2048_p50_ms": alone["p50_ms"], "mixed_2048_rps": mixed["segmentation"]["throughput_rps"],
            "mixed_digits_rps": mixed["digits"]["throughput_rps"],
            "digits_alone_rps": digits_alone["throughput_rps"], "failed": failed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--alone", type=int, default=4)
    args = parser.parse_args()
    slice_25 = Image.open(SHARED_DATA / "membrane" / "train" / "image" / "25.png").convert("L")
    large_png = png_bytes(np.asarray(slice_25.resize((2048, 2048), Image.BILINEAR)))
    digit_png = mnist_digit_png()
    figures = alternate(MODES, lambda env: one_round(env, large_png, digit_png, args.seconds, args.alone),
                        args.rounds, KEYS, "spare_over_none")
    write_results("spare_cpu", {"rounds": args.rounds, "seconds": args.seconds, "workers": 2, **figures})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
