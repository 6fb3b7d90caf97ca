"""Mixed traffic against the real server: rising concurrency on 1 and 2 workers, and a soak.

Traffic is drawn at random, per request, in the issue's mix: digits 60 % (MNIST test PNGs),
clustering 15 % (Mall Customers rows), emotion 15 % (EmoDB utterances of the held-out speakers 03
and 16, WAV) and segmentation 10 % (512 x 512 membrane slices 25-29, PNG). Each level runs a closed
loop of N clients for a fixed time. For every level: throughput, p50/p95/p99 per task and overall,
refusals (503 ``overloaded`` with Retry-After, the designed answer to too much work), errors
(anything else that is not a 200, transport failures included) and the memory of master + workers
(PSS) and of each worker (RSS), sampled every second. The soak runs one concurrency for a fixed time
and reports memory growth after a warm-up.

The generator is Python (httpx): at ~50 ms of server work per average request it costs the server
little of the two cores, and it times each task separately, which hey/wrk cannot with mixed bodies.

    python -m bench.load                      # levels 1..32 on 1 and 2 workers (~5 min)
    python -m bench.load --soak 600           # and a 10-minute soak on 1 worker at concurrency 4
    python -m bench.load --burst 0 --levels --soak 600   # the soak alone
    python -m bench.load --plot               # redraw bench/results/load.png from load.json

First, the issue's acceptance run: 6 000 digit PNGs posted by ``hey`` at concurrency 8 on one
worker (failures, slowest answer, whether the worker was replaced). Writes
bench/results/burst.json, load.json (and soak.json) and draws bench/results/load.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.common import (
    RESULTS_DIR,
    SHARED_DATA,
    mnist_digit_png,
    percentiles,
    png_bytes,
    serving_python,
    write_results,
)
from bench.liveserver import LiveServer, running_server

MIX = {"digits": 0.60, "clustering": 0.15, "emotion": 0.15, "segmentation": 0.10}
LEVELS = (1, 2, 4, 8, 16, 32)


@dataclass
class Inputs:
    """Real inputs per task, as (path, httpx keyword arguments) pairs to draw from."""

    requests: dict[str, list[tuple[str, dict[str, Any]]]]

    @classmethod
    def load(cls, digits: int = 64) -> Inputs:
        with np.load(SHARED_DATA / "mnist" / "mnist.npz") as data:
            images = data["x_test"][:digits]
        digit_requests = [("/v1/digits/predict", {"files": {"image": ("d.png", png_bytes(image), "image/png")}})
                          for image in images]
        rows = _mall_rows()
        clustering = [("/v1/clustering/predict", {"json": {"instances": rows[i:i + 4]}})
                      for i in range(0, len(rows) - 4, 7)]
        wavs = sorted((SHARED_DATA / "emodb" / "wav").glob("03*.wav"))[:10] + \
            sorted((SHARED_DATA / "emodb" / "wav").glob("16*.wav"))[:10]
        emotion = [("/v1/emotion/predict", {"files": {"audio": (p.name, p.read_bytes(), "audio/wav")}})
                   for p in wavs]
        slices = SHARED_DATA / "membrane" / "train" / "image"
        segmentation = [("/v1/segmentation/predict",
                         {"files": {"image": (f"{i}.png", (slices / f"{i}.png").read_bytes(), "image/png")}})
                        for i in range(25, 30)]
        return cls({"digits": digit_requests, "clustering": clustering, "emotion": emotion,
                    "segmentation": segmentation})

    def draw(self, rng: random.Random) -> tuple[str, str, dict[str, Any]]:
        task = rng.choices(list(MIX), weights=list(MIX.values()))[0]
        path, kwargs = rng.choice(self.requests[task])
        return task, path, kwargs


def _mall_rows() -> list[dict[str, float]]:
    import csv

    with open(SHARED_DATA / "mall_customers" / "Mall_Customers.csv", newline="") as f:
        reader = csv.DictReader(f)
        return [{"annual_income": float(r["Annual Income (k$)"]), "spending_score": float(r["Spending Score (1-100)"])}
                for r in reader]


@dataclass
class Sample:
    task: str
    status: int  # 0: transport failure
    seconds: float
    finished_at: float
    error: str = ""


@dataclass
class MemoryTrace:
    """Total PSS (master + workers) and each worker's RSS, sampled in a thread."""

    server: LiveServer
    interval: float = 1.0
    points: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()

    def _run(self) -> None:
        while True:
            self.points.append({"t": round(time.monotonic() - self._t0, 2),
                                "pss_mib": round(self.server.pss_mib(), 1),
                                "rss_mib": {str(p): round(v, 1) for p, v in self.server.rss_mib().items()}})
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> MemoryTrace:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def closed_loop(base_url: str, inputs: Inputs, concurrency: int, seconds: float,
                      seed: int = 0) -> tuple[list[Sample], float]:
    """``concurrency`` clients, each sending its next request when the last one is answered."""
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=60.0, limits=limits) as client:
        started = time.perf_counter()
        stop_at = started + seconds

        async def one_client(index: int) -> None:
            rng = random.Random(seed * 1000 + index)
            while time.perf_counter() < stop_at:
                task, path, kwargs = inputs.draw(rng)
                t0 = time.perf_counter()
                try:
                    response = await client.post(path, **kwargs)
                    status, error = response.status_code, ""
                    if status != 200:
                        error = response.headers.get("content-type", "").startswith("application/problem")\
                            and response.json().get("code", "") or response.text[:80]
                except httpx.HTTPError as exc:
                    status, error = 0, f"{type(exc).__name__}: {exc}"[:120]
                t1 = time.perf_counter()
                samples.append(Sample(task, status, t1 - t0, t1 - started, error))

        await asyncio.gather(*(one_client(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    return samples, elapsed


def summarise(samples: list[Sample], elapsed: float) -> dict[str, Any]:
    ok = [s for s in samples if s.status == 200]
    refused = [s for s in samples if s.status == 503 and s.error == "overloaded"]
    errors = [s for s in samples if s.status != 200 and s not in refused]
    out: dict[str, Any] = {
        "requests": len(samples), "ok": len(ok), "refused": len(refused), "errors": len(errors),
        "throughput_rps": round(len(ok) / elapsed, 2),
        "latency": percentiles([s.seconds * 1000 for s in ok]) if ok else None,
        "per_task": {},
    }
    for task in MIX:
        mine = [s.seconds * 1000 for s in ok if s.task == task]
        out["per_task"][task] = {**(percentiles(mine) if mine else {"n": 0}),
                                 "throughput_rps": round(len(mine) / elapsed, 2),
                                 "refused": sum(s.task == task for s in refused)}
    if errors:
        kinds: dict[str, int] = {}
        for s in errors:
            key = f"{s.status} {s.error}"
            kinds[key] = kinds.get(key, 0) + 1
        out["error_kinds"] = kinds
    return out


def run_levels(inputs: Inputs, workers: int, levels: tuple[int, ...], seconds: float) -> dict[str, Any]:
    with running_server(workers=workers, python=serving_python()) as live:
        asyncio.run(closed_loop(live.base_url, inputs, 2, 5.0, seed=99))  # warm-up, not counted
        rows = []
        with MemoryTrace(live) as memory:
            for level in levels:
                samples, elapsed = asyncio.run(closed_loop(live.base_url, inputs, level, seconds, seed=level))
                row = {"concurrency": level, **summarise(samples, elapsed),
                       "pss_mib_now": round(live.pss_mib(), 1)}
                rows.append(row)
                lat = row["latency"] or {}
                tasks = "  ".join(f"{t} {v['throughput_rps']:.1f}/s p99 {v.get('p99_ms', 0):.0f} ms"
                                  f" ({v['refused']} refused)" for t, v in row["per_task"].items())
                print(f"{workers} worker(s), c={level:>2}: {row['throughput_rps']:7.1f} req/s  "
                      f"p50 {lat.get('p50_ms', 0):7.1f} ms  p95 {lat.get('p95_ms', 0):7.1f}  "
                      f"p99 {lat.get('p99_ms', 0):7.1f}  refused {row['refused']}  errors {row['errors']}  "
                      f"PSS {row['pss_mib_now']} MiB\n    {tasks}", flush=True)
        saturation = next((rows[i - 1]["concurrency"] for i in range(1, len(rows))
                           if rows[i]["throughput_rps"] < rows[i - 1]["throughput_rps"] * 1.05), levels[-1])
        return {"workers": workers, "seconds_per_level": seconds, "levels": rows,
                "saturates_at_concurrency": saturation,
                "peak_throughput_rps": max(r["throughput_rps"] for r in rows),
                "memory": memory.points}


def run_soak(inputs: Inputs, workers: int, concurrency: int, seconds: float,
             warmup: float) -> dict[str, Any]:
    with running_server(workers=workers, python=serving_python()) as live:
        with MemoryTrace(live, interval=5.0) as memory:
            samples, elapsed = asyncio.run(closed_loop(live.base_url, inputs, concurrency, seconds, seed=7))
        after_warmup = [p for p in memory.points if p["t"] >= warmup]
        first, last = after_warmup[0]["pss_mib"], after_warmup[-1]["pss_mib"]
        worker_rss = {pid: [p["rss_mib"].get(pid) for p in after_warmup if pid in p["rss_mib"]]
                      for pid in after_warmup[-1]["rss_mib"]}
        minutes = [summarise([s for s in samples if m * 60 <= s.finished_at < (m + 1) * 60], 60.0)
                   for m in range(int(elapsed // 60))]
        summary = summarise(samples, elapsed)
        result = {"workers": workers, "concurrency": concurrency, "seconds": round(elapsed, 1),
                  "warmup_s": warmup, **summary,
                  "pss_mib_after_warmup": first, "pss_mib_end": last,
                  "pss_growth_pct": round(100 * (last - first) / first, 2),
                  "pss_mib_max": max(p["pss_mib"] for p in after_warmup),
                  "worker_rss_mib": {pid: {"after_warmup": v[0], "end": v[-1], "max": max(v)}
                                     for pid, v in worker_rss.items() if v},
                  "worker_pids_unchanged": set(memory.points[0]["rss_mib"]) == set(memory.points[-1]["rss_mib"]),
                  "per_minute": [{"minute": i + 1, "throughput_rps": m["throughput_rps"],
                                  "p99_ms": (m["latency"] or {}).get("p99_ms"), "errors": m["errors"],
                                  "refused": m["refused"]} for i, m in enumerate(minutes)],
                  "memory": memory.points}
        print(f"soak {elapsed:.0f} s, {workers} worker(s), c={concurrency}: {summary['ok']} ok, "
              f"{summary['refused']} refused, {summary['errors']} errors; PSS {first} -> {last} MiB "
              f"({result['pss_growth_pct']:+.2f} %) after {warmup:.0f} s of warm-up", flush=True)
        return result


def hey(url: str, body: bytes, content_type: str, requests: int, concurrency: int,
        qps: float | None = None, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """``hey`` (Debian's package) posting ``body`` ``requests`` times at ``concurrency``, keep-alive
    (each client at most ``qps`` requests per second when given: an open rather than closed loop),
    with ``headers`` besides the content type.

    hey's CSV lists one row per answered request (transport errors are not rows), so failures are
    the requests asked for minus the 200 rows."""
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".body") as f:
        f.write(body)
        f.flush()
        started = time.perf_counter()
        rate = ["-q", f"{qps:g}"] if qps else []
        extra = [arg for name, value in (headers or {}).items() for arg in ("-H", f"{name}: {value}")]
        out = subprocess.run(["hey", "-n", str(requests), "-c", str(concurrency), *rate, "-m", "POST",
                              "-T", content_type, *extra, "-D", f.name, "-o", "csv", url],
                             capture_output=True, text=True, timeout=600, check=True).stdout
        elapsed = time.perf_counter() - started
    rows = [line.split(",") for line in out.splitlines()[1:] if line.strip()]
    seconds = [float(r[0]) for r in rows]
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r[6]] = statuses.get(r[6], 0) + 1
    return {"requests": requests, "concurrency": concurrency, "answered": len(rows),
            "ok": statuses.get("200", 0), "failed": requests - statuses.get("200", 0),
            "statuses": statuses, "seconds": round(elapsed, 2),
            "throughput_rps": round(len(rows) / elapsed, 1),
            "slowest_s": round(max(seconds), 4) if seconds else None,
            **(percentiles([x * 1000 for x in seconds]) if seconds else {})}


def run_burst(requests: int = 6000, concurrency: int = 8) -> dict[str, Any]:
    """The issue's acceptance run: digit PNGs with hey on one worker, default settings."""
    with running_server(workers=1, python=serving_python()) as live:
        pids = live.worker_pids()
        result = hey(live.base_url + "/v1/digits/predict", mnist_digit_png(), "image/png", requests, concurrency)
        result["worker_replaced"] = live.worker_pids() != pids
    print(f"hey {requests} digits at c={concurrency}, 1 worker: {result['ok']} ok, {result['failed']} "
          f"failed, {result['throughput_rps']} req/s, p99 {result.get('p99_ms')} ms, slowest "
          f"{result['slowest_s']} s, worker replaced: {result['worker_replaced']}", flush=True)
    return result


def plot(load: dict[str, Any], soak: dict[str, Any] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if soak else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    for run in load["runs"]:
        levels = [r["concurrency"] for r in run["levels"]]
        line, = axes[0].plot(levels, [r["throughput_rps"] for r in run["levels"]], marker="o",
                             label=f"answered, {run['workers']} worker(s)")
        axes[0].plot(levels, [r["refused"] / run["seconds_per_level"] for r in run["levels"]], ":",
                     marker="x", color=line.get_color(), label=f"refused (503), {run['workers']} worker(s)")
        for task, style in (("digits", "-"), ("segmentation", "--")):
            axes[1].plot(levels, [r["per_task"][task].get("p95_ms") for r in run["levels"]],
                         style, marker="o", label=f"{task} p95, {run['workers']} worker(s)")
    axes[0].set(xscale="log", xlabel="concurrent clients (closed loop)", ylabel="requests/s",
                title="Mixed traffic: answered and refused")
    axes[1].set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="ms",
                title="Latency (p95) by task")
    for ax in axes[:2]:
        ax.set_xticks(LEVELS, [str(c) for c in LEVELS])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if soak:
        t = [p["t"] / 60 for p in soak["memory"]]
        axes[2].plot(t, [p["pss_mib"] for p in soak["memory"]], label="PSS, master + workers")
        axes[2].axvline(soak["warmup_s"] / 60, color="grey", linestyle=":", label="end of warm-up")
        axes[2].set(xlabel="minutes", ylabel="MiB", title=f"Soak: {soak['workers']} worker(s), "
                    f"c={soak['concurrency']}, {soak['errors']} errors", ylim=(0, None))
        axes[2].grid(alpha=0.3)
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--levels", type=int, nargs="*", default=list(LEVELS),
                        help="concurrency levels; none (a bare --levels) for the soak alone")
    parser.add_argument("--seconds", type=float, default=20.0, help="per level")
    parser.add_argument("--soak", type=float, default=0.0, help="soak duration in seconds (0: none)")
    parser.add_argument("--soak-concurrency", type=int, default=4)
    parser.add_argument("--soak-workers", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=60.0, help="soak warm-up, seconds")
    parser.add_argument("--burst", type=int, default=6000,
                        help="digit requests sent by hey at concurrency 8 on 1 worker (0: none)")
    parser.add_argument("--plot", action="store_true", help="only redraw the plot from the results")
    args = parser.parse_args()
    load_path, soak_path = RESULTS_DIR / "load.json", RESULTS_DIR / "soak.json"
    if not args.plot:
        if args.burst:
            write_results("burst", run_burst(args.burst))
        inputs = Inputs.load()
        if args.levels:
            runs = [run_levels(inputs, w, tuple(args.levels), args.seconds) for w in args.workers]
            write_results("load", {"mix": MIX, "runs": runs})
        if args.soak:
            write_results("soak", {"mix": MIX, **run_soak(inputs, args.soak_workers, args.soak_concurrency,
                                                           args.soak, args.warmup)})
    soak = json.loads(soak_path.read_text()) if soak_path.exists() else None
    plot(json.loads(load_path.read_text()), soak, RESULTS_DIR / "load.png")


if __name__ == "__main__":
    main()
