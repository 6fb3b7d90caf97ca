"""Issue 18, goal 1's yardstick: the project's digits endpoint against the bare floor, one run.

    .venv-dev/bin/python -m bench.digits_floor [--rounds 4] [--requests 3000] [--concurrency 8]
                                               [--before bc768db]

All served by gunicorn with one uvicorn worker (the serving environment when it exists): the
project (``/v1/digits/predict``, a raw PNG body: decode, real-world preprocessing, prediction log,
drift features, metrics, access log), the project as it was at ``--before`` (a commit, extracted
with ``git archive`` into ``var/``; ``--before ''`` leaves it out) and ``bench/floor_app.py``
(Pillow decode + one LiteRT call). ``hey`` posts the same MNIST digit PNG to each, alternating,
``rounds`` times; reported are the medians and the ratios to the floor. Then
``bench/digits_stages.py`` breaks one request down by stage, in one process, for both trees.
Writes ``bench/results/digits_floor.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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


def checkout(ref: str) -> Path:
    """The tree of commit ``ref`` (its code and models), extracted once under ``var/``."""
    tree = REPO_ROOT / "var" / f"before-{ref}"
    if not (tree / "app" / "main.py").exists():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", ref], cwd=REPO_ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def stages(python: str | None, tree: Path) -> dict:
    out = subprocess.run([python or sys.executable, str(REPO_ROOT / "bench" / "digits_stages.py"),
                          "--tree", str(tree)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--before", default="bc768db", help="the commit to compare with ('' for none)")
    args = parser.parse_args()
    png = mnist_digit_png()
    python = serving_python()
    before = checkout(args.before) if args.before else None
    runs: dict[str, list[dict]] = {"project": [], "floor": []}
    with contextlib.ExitStack() as stack:
        live = stack.enter_context(running_server(workers=1, python=python))
        floor = stack.enter_context(floor_server(python))
        targets = {"project": live.base_url + "/v1/digits/predict", "floor": floor + "/predict"}
        if before is not None:
            old = stack.enter_context(running_server(workers=1, python=python, cwd=before))
            targets["before"] = old.base_url + "/v1/digits/predict"
            runs["before"] = []
        for url in targets.values():  # warm up
            hey(url, png, "image/png", 300, args.concurrency)
        for _ in range(args.rounds):
            for name, url in targets.items():
                runs[name].append(hey(url, png, "image/png", args.requests, args.concurrency))
                print(f"{name}: {runs[name][-1]['throughput_rps']} req/s, p50 {runs[name][-1]['p50_ms']} ms",
                      flush=True)
    result = {"requests": args.requests, "concurrency": args.concurrency, "rounds": args.rounds,
              "before_commit": args.before or None}
    for name, rs in runs.items():
        result[name] = {"throughput_rps": statistics.median(r["throughput_rps"] for r in rs),
                        "p50_ms": statistics.median(r["p50_ms"] for r in rs),
                        "p99_ms": statistics.median(r["p99_ms"] for r in rs),
                        "failed": sum(r["failed"] for r in rs),
                        "rounds_rps": [r["throughput_rps"] for r in rs]}
    result["ratio_project_to_floor"] = round(result["project"]["throughput_rps"] / result["floor"]["throughput_rps"], 3)
    if before is not None:
        result["ratio_before_to_floor"] = round(result["before"]["throughput_rps"] / result["floor"]["throughput_rps"], 3)
    result["goal"] = 0.65
    # Per stage, in one process, after the load runs (nothing else on the cores).
    result["stages_us"] = {"project": stages(python, REPO_ROOT)}
    if before is not None:
        result["stages_us"]["before"] = stages(python, before)
    for name, breakdown in result["stages_us"].items():
        print(f"{name}: " + ", ".join(f"{k} {v:g}" for k, v in breakdown["cpu_us"].items())
              + f"; whole request {breakdown['request_in_process']:g} us (floor "
              f"{breakdown['floor_request_in_process']:g}), the rest {breakdown['routing_middleware_admission_rest']:g}",
              flush=True)
    write_results("digits_floor", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
