"""Batch jobs beside live traffic: digits p99 on the web workers, idle and while a job worker runs
a 5 000-image digits job and a 100 000-row clustering job (CSV).

    .venv-dev/bin/python -m bench.jobs [--rounds 2] [--qps 25] [--concurrency 4]

The server runs as ``make serve`` does (two web workers, ``JOBS=embedded``: one job worker beside
them at a lower priority), so the job worker shares this machine's cores with the web workers: on
Heroku it has a dyno of its own. ``hey`` sends digit PNGs at a fixed rate (an open loop:
``concurrency`` clients at ``qps`` each), alternating idle and busy rounds; a busy round starts
once the first job is running, and a job must still be running when it ends (``--copies`` of the
two jobs are queued so that the worker is busy throughout). Prints each round and
the busy/idle p99 ratio, and writes bench/results/jobs.json.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from bench.common import SHARED_DATA, cpu_model, mnist_digit_png, serving_python, write_results
from bench.liveserver import running_server
from bench.load import hey


def batch_requests() -> list[tuple[str, dict[str, Any]]]:
    with np.load(SHARED_DATA / "mnist" / "mnist.npz") as data:
        digits = data["x_test"][:5000]
    files = []
    for i, pixels in enumerate(digits):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        files.append(("image", (f"{i}.png", buffer.getvalue(), "image/png")))
    rng = np.random.default_rng(7)
    table = np.column_stack([rng.integers(15, 140, 100_000), rng.integers(1, 100, 100_000)])
    rows = ("annual_income,spending_score\n" + "".join(f"{a},{b}\n" for a, b in table)).encode()
    return [("/v1/digits/predict", {"files": files}),
            ("/v1/clustering/predict", {"content": rows, "headers": {"Content-Type": "text/csv"}})]


def submit(base_url: str, batches: list[tuple[str, dict[str, Any]]]) -> list[str]:
    locations = []
    for path, kwargs in batches:
        headers = {"Prefer": "respond-async", **kwargs.get("headers", {})}
        response = httpx.post(base_url + path, timeout=60, **{**kwargs, "headers": headers})
        response.raise_for_status()
        locations.append(response.headers["location"])
    return locations


def states(base_url: str, locations: list[str]) -> list[str]:
    return [httpx.get(base_url + location).json()["status"] for location in locations]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--qps", type=float, default=25.0, help="requests per second per client")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=12.0, help="length of each round")
    parser.add_argument("--copies", type=int, default=3, help="copies of the two batch jobs per busy round")
    args = parser.parse_args()
    requests = int(args.qps * args.concurrency * args.seconds)
    png = mnist_digit_png()
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {"JOBS": "embedded", "JOBS_QUEUE_PATH": str(Path(tmp) / "queue.db")}
        with running_server(workers=2, env=env, python=serving_python()) as live:
            url = live.base_url + "/v1/digits/predict"
            hey(url, png, "image/png", 400, args.concurrency)  # warm-up
            for round_ in range(args.rounds):
                idle = hey(url, png, "image/png", requests, args.concurrency, args.qps)
                locations = [loc for _ in range(args.copies) for loc in submit(live.base_url, batch_requests())]
                deadline = time.monotonic() + 60
                while states(live.base_url, locations)[0] != "running" and time.monotonic() < deadline:
                    time.sleep(0.05)  # the job worker takes one job at a time, in order
                busy = hey(url, png, "image/png", requests, args.concurrency, args.qps)
                during = states(live.base_url, locations)
                while set(states(live.base_url, locations)) - {"done", "failed"}:
                    time.sleep(0.5)
                finished = states(live.base_url, locations)
                rounds.append({"round": round_, "idle": idle, "busy": busy, "jobs_at_end_of_busy_round": during,
                               "jobs_finished": finished})
                print(f"round {round_}: idle p99 {idle['p99_ms']} ms ({idle['ok']} ok), busy p99 "
                      f"{busy['p99_ms']} ms ({busy['ok']} ok); jobs at the end of the busy round: {during}, "
                      f"finally {finished}", flush=True)
    idle_p99 = float(np.median([r["idle"]["p99_ms"] for r in rounds]))
    busy_p99 = float(np.median([r["busy"]["p99_ms"] for r in rounds]))
    valid = all("running" in r["jobs_at_end_of_busy_round"] for r in rounds)
    result = {"cpu": cpu_model(), "qps_per_client": args.qps, "concurrency": args.concurrency,
              "requests_per_round": requests, "rounds": rounds, "idle_p99_ms": idle_p99, "busy_p99_ms": busy_p99,
              "busy_over_idle_p99": round(busy_p99 / idle_p99, 2), "jobs_ran_through_every_busy_round": valid}
    print(f"digits p99 idle {idle_p99:.2f} ms, with the jobs running {busy_p99:.2f} ms: "
          f"{busy_p99 / idle_p99:.2f}x (median of {args.rounds} rounds; {cpu_model()}); "
          f"jobs ran through every busy round: {valid}")
    write_results("jobs", result)


if __name__ == "__main__":
    main()
