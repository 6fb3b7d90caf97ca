"""What a shadow version costs the clients: digits latency with and without ``SHADOW_VERSIONS``.

    .venv-dev/bin/python -m bench.shadow [--rounds 3] [--requests 1500] [--concurrency 1 4]

Two servers (one worker each, the serving environment when it exists): plain, and with digits 1.0.0
shadowing 1.0.1. ``hey`` posts the same digit PNG to each, alternating, ``rounds`` times per
concurrency; reported are the medians of throughput and p50/p99 and their ratios (shadow / plain),
the shadow predictions made and those dropped (queue full). Writes ``bench/results/shadow.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

import httpx

from bench.common import mnist_digit_png, serving_python, write_results
from bench.liveserver import running_server
from bench.load import hey


def shadow_counts(base_url: str) -> dict[str, float]:
    text = httpx.get(base_url + "/metrics").text
    out = {}
    for name in ("shadow_predictions_total", "shadow_dropped_total"):
        out[name] = sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} ([0-9.e+]+)$", text, re.M))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rate", type=float, default=100.0,
                        help="one more level: one client at this many requests/s (moderate traffic)")
    args = parser.parse_args()
    png = mnist_digit_png()
    python = serving_python()
    env_shadow = {"SHADOW_VERSIONS": json.dumps({"digits": "1.0.0"})}
    results: dict[str, object] = {"requests": args.requests, "rounds": args.rounds, "levels": []}
    with running_server(workers=1, python=python) as plain, \
            running_server(workers=1, python=python, env=env_shadow) as shadowed:
        url = "/v1/digits/predict"
        for live in (plain, shadowed):  # warm both
            hey(live.base_url + url, png, "image/png", 200, 2)
        levels = [(c, None) for c in args.concurrency] + [(1, args.rate)]
        for concurrency, qps in levels:
            runs: dict[str, list[dict]] = {"plain": [], "shadow": []}
            n = args.requests if qps is None else int(min(args.requests, qps * 10))
            for _ in range(args.rounds):
                for name, live in (("plain", plain), ("shadow", shadowed)):
                    before = shadow_counts(live.base_url)
                    run = hey(live.base_url + url, png, "image/png", n, concurrency, qps)
                    if name == "shadow":
                        time.sleep(1.0)  # let the queue empty before counting
                        after = shadow_counts(live.base_url)
                        run["shadowed"] = after["shadow_predictions_total"] - before["shadow_predictions_total"]
                        run["not_shadowed"] = after["shadow_dropped_total"] - before["shadow_dropped_total"]
                    runs[name].append(run)
            level: dict[str, object] = {"concurrency": concurrency, "requests_per_s_per_client": qps, "requests": n}
            level["shadowed_fraction"] = round(sum(r["shadowed"] for r in runs["shadow"]) / (n * args.rounds), 3)
            for name, rs in runs.items():
                level[name] = {key: statistics.median(r[key] for r in rs)
                               for key in ("throughput_rps", "p50_ms", "p99_ms")}
                level[name]["failed"] = sum(r["failed"] for r in rs)
            level["ratio"] = {key: round(level["shadow"][key] / level["plain"][key], 3)  # type: ignore[index]
                              for key in ("throughput_rps", "p50_ms", "p99_ms")}
            results["levels"].append(level)  # type: ignore[union-attr]
            print(json.dumps(level), flush=True)
        results["shadow_metrics"] = shadow_counts(shadowed.base_url)
    write_results("shadow", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
