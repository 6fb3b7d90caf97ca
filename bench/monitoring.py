"""Prediction-log and drift figures: enqueue cost on the request path, rows written per second,
drift-report time, on SQLite and (when reachable) PostgreSQL.

    .venv-train/bin/python -m bench.monitoring [--rows 20000]

In-process (no HTTP): these are the costs the monitoring slice adds to a prediction and the
database work its writer thread does. Results go to bench/results/monitoring.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.monitoring import drift
from app.monitoring.reference import build_reference
from app.monitoring.reports import window_rows
from app.monitoring.store import PredictionLog, create_schema, make_engine
from bench.common import percentiles, write_results

FEATURES = ("raw_mean", "inverted", "background_std", "contrast", "raw_ink_fraction", "ink_ratio",
            "norm_mean", "box_aspect", "width", "height")  # the digits slice's ten summary features


def rows_for(n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    return [{"prediction": str(rng.integers(10)), "confidence": float(rng.random()),
             "features": {f: float(v) for f, v in zip(FEATURES, rng.random(len(FEATURES)))}} for _ in range(n)]


def measure(url: str, label: str, total_rows: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    engine = make_engine(url)
    create_schema(engine)
    log = PredictionLog(engine, buffer_size=total_rows + 10, flush_interval_s=0.5)

    one = rows_for(1, rng)
    sixteen = rows_for(16, rng)
    samples_1, samples_16 = [], []
    for i in range(2000):  # writer not started: pure request-path cost
        t = time.perf_counter()
        log.enqueue(f"bench-{i}", "digits", "1.0.0", one, latency_ms=1.0)
        samples_1.append((time.perf_counter() - t) * 1000)
    for i in range(200):
        t = time.perf_counter()
        log.enqueue(f"bench16-{i}", "digits", "1.0.0", sixteen, latency_ms=1.0)
        samples_16.append((time.perf_counter() - t) * 1000)
    assert log.flush(120)

    batch = rows_for(100, rng)
    for i in range(total_rows // 100):
        log.enqueue(f"load-{i}", "digits", "1.0.0", batch, latency_ms=1.0)
    started = time.perf_counter()
    assert log.flush(600)
    write_seconds = time.perf_counter() - started

    values = {f: rng.random(5000) for f in FEATURES}
    reference = build_reference(values, [str(v) for v in rng.integers(0, 10, 5000)], [str(i) for i in range(10)])
    timings = {}
    for n in (500, 5000):
        t = time.perf_counter()
        rows = window_rows(engine, "digits", drift.Window(count=n))
        drift.model_drift(reference, rows.features, rows.predictions, min_samples=30)
        timings[f"drift_report_{n}_rows_ms"] = round((time.perf_counter() - t) * 1000, 1)
    engine.dispose()
    result = {"enqueue_1_row": percentiles(samples_1), "enqueue_16_rows": percentiles(samples_16),
              "rows_written_per_s": round(total_rows / write_seconds), "rows_written": total_rows, **timings}
    print(label, result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = measure(f"sqlite:///{Path(tmp) / 'bench.db'}", "sqlite", args.rows)
    try:
        from sqlalchemy import create_engine, text

        schema = f"bench_monitoring_{int(time.time())}"
        admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        try:
            results["postgresql"] = measure(f"{args.postgres}?options=-csearch_path%3D{schema}", "postgresql",
                                            args.rows)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    except Exception as exc:  # noqa: BLE001 - PostgreSQL is optional for the bench
        results["postgresql"] = {"skipped": f"{type(exc).__name__}: {exc}"[:200]}
    write_results("monitoring", results)


if __name__ == "__main__":
    main()
