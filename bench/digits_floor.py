"""Issue 18, goal 1's yardstick: the project's digits endpoint against the bare floor, one run.

    .venv-dev/bin/python -m bench.digits_floor [--rounds 4] [--requests 3000] [--concurrency 8]

Both served by gunicorn with one uvicorn worker (the serving environment when it exists): the
project (``/v1/digits/predict``, a raw PNG body: decode, real-world preprocessing, prediction log,
drift features, metrics, access log) and ``bench/floor_app.py`` (Pillow decode + one LiteRT call).
``hey`` posts the same MNIST digit PNG to each, alternating, ``rounds`` times; reported are the
medians and the ratio project / floor. Writes ``bench/results/digits_floor.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.common import REPO_ROOT, mnist_digit_png, serving_python, write_results
from bench.liveserver import free_port, running_server, stop
from bench.load import hey


@contextlib.contextmanager
def floor_server(python: str | None):
    port = free_port()
    gunicorn = str(Path(python or sys.executable).parent / "gunicorn")
    process = subprocess.Popen([gunicorn, "-k", "uvicorn_worker.UvicornWorker", "-w", "1", "--bind",
                                f"127.0.0.1:{port}", "bench.floor_app:app"], cwd=REPO_ROOT,
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.post(url + "/predict", content=mnist_digit_png(), timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the floor server did not start")
            time.sleep(0.2)
        yield url
    finally:
        stop(process)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    png = mnist_digit_png()
    python = serving_python()
    runs: dict[str, list[dict]] = {"project": [], "floor": []}
    with running_server(workers=1, python=python) as live, floor_server(python) as floor:
        targets = {"project": live.base_url + "/v1/digits/predict", "floor": floor + "/predict"}
        for url in targets.values():  # warm up
            hey(url, png, "image/png", 300, args.concurrency)
        for _ in range(args.rounds):
            for name, url in targets.items():
                runs[name].append(hey(url, png, "image/png", args.requests, args.concurrency))
                print(f"{name}: {runs[name][-1]['throughput_rps']} req/s, p50 {runs[name][-1]['p50_ms']} ms",
                      flush=True)
    result = {"requests": args.requests, "concurrency": args.concurrency, "rounds": args.rounds}
    for name, rs in runs.items():
        result[name] = {"throughput_rps": statistics.median(r["throughput_rps"] for r in rs),
                        "p50_ms": statistics.median(r["p50_ms"] for r in rs),
                        "p99_ms": statistics.median(r["p99_ms"] for r in rs),
                        "failed": sum(r["failed"] for r in rs),
                        "rounds_rps": [r["throughput_rps"] for r in rs]}
    result["ratio_project_to_floor"] = round(result["project"]["throughput_rps"] / result["floor"]["throughput_rps"], 3)
    result["goal"] = 0.65
    write_results("digits_floor", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
