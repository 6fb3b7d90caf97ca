"""The prediction log at scale, on PostgreSQL: sustained ingest from 4 worker processes, and drift
reports over a 10-million-row table.

    .venv-dev/bin/python -m bench.log_scale [--rate 250] [--seconds 30] [--rows 10000000]

1. Ingest: 4 processes, each a ``PredictionLog`` (the workers' buffered writer, default settings),
   enqueue one-instance digit rows at ``rate`` rows/s each for ``seconds``; every second each
   samples its buffer. Falling behind would show as a buffer that keeps growing.
2. Scale: ``rows`` digit rows spread over 30 days are generated in the database (generate_series),
   then the drift report (``app.monitoring.reports``, as the endpoint computes it) is timed for a
   count window (the default 500), time windows (1 h, 24 h, 7 d) and the dashboard's 24 h timeline,
   and the retention purge of one day's rows is timed.

Uses ``TEST_DATABASE_URL`` (default the local ``test`` database) in a schema of its own, dropped at
the end. Writes ``bench/results/log_scale.json``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
import uuid
from typing import Any

from sqlalchemy import create_engine, text

from bench.common import REPO_ROOT, write_results
from tests.monitoring_db import PG_URL, with_search_path

WORKERS = 4


def ingest(url: str, rate: float, seconds: float, worker: int, out: Any) -> None:
    from app.monitoring.store import PredictionLog, make_engine

    engine = make_engine(url)
    log = PredictionLog(engine)
    log.start()
    features = {f"f{i}": 0.1 * i for i in range(8)}
    row = [{"prediction": "7", "confidence": 0.99, "features": features}]
    started = time.monotonic()
    buffered, sent, next_sample = [], 0, started + 1.0
    while (now := time.monotonic()) - started < seconds:
        due = int((now - started) * rate)
        while sent < due:
            log.enqueue(f"{worker:02d}{sent:030x}", "digits", "1.0.1", row, latency_ms=3.0)
            sent += 1
        if now >= next_sample:
            buffered.append(log.buffered)
            next_sample += 1.0
        time.sleep(0.002)
    stop_at = time.monotonic()
    drained = log.flush(60)
    drain_s = time.monotonic() - stop_at
    log.stop()
    out.put({"worker": worker, "sent": sent, "written": log.rows_written, "dropped": log.rows_dropped,
             "write_failures": log.write_failures, "buffered_per_s": buffered, "drained": drained,
             "drain_s": round(drain_s, 3)})


def run_ingest(url: str, rate: float, seconds: float) -> dict[str, Any]:
    from app.monitoring.store import create_schema, make_engine

    create_schema(make_engine(url))
    queue: Any = multiprocessing.Queue()
    started = time.monotonic()
    procs = [multiprocessing.Process(target=ingest, args=(url, rate, seconds, w, queue)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    elapsed = time.monotonic() - started
    engine = create_engine(url)
    with engine.connect() as conn:
        in_db = conn.execute(text("SELECT count(*) FROM predictions")).scalar_one()
    engine.dispose()
    sent = sum(r["sent"] for r in results)
    return {"processes": WORKERS, "rate_per_process": rate, "seconds": seconds, "sent": sent,
            "rows_in_database": in_db, "offered_rows_per_s": round(sent / seconds, 1),
            "dropped": sum(r["dropped"] for r in results), "write_failures": sum(r["write_failures"] for r in results),
            "max_buffered": max(max(r["buffered_per_s"] or [0]) for r in results),
            "median_buffered": statistics.median(b for r in results for b in r["buffered_per_s"] or [0]),
            "last_second_buffered": [r["buffered_per_s"][-1] if r["buffered_per_s"] else 0 for r in results],
            "drain_s_after_stop": max(r["drain_s"] for r in results), "all_drained": all(r["drained"] for r in results),
            "wall_s": round(elapsed, 1)}


def fill(url: str, rows: int, feature_names: list[str]) -> dict[str, Any]:
    """``rows`` digit rows over the last 30 days, newest last (ids grow with time), in SQL."""
    from app.monitoring.store import create_schema, make_engine

    engine = make_engine(url)
    create_schema(engine)
    spacing_s = 30 * 86400 / rows
    features = ", ".join(f"'{name}', round(random()::numeric, 4)" for name in feature_names)
    started = time.perf_counter()
    step = 1_000_000
    with engine.connect() as conn:
        # A bulk load of a million rows per statement, not a request: past the service's statement
        # timeout (``DB_STATEMENT_TIMEOUT_S``, which the engine sets), so lifted on this connection.
        conn.execute(text("SET statement_timeout = 0"))
        for start in range(0, rows, step):
            conn.execute(text(f"""
                INSERT INTO predictions (created_at, request_id, instance, model, version, latency_ms,
                                         prediction, confidence, features)
                SELECT now() - make_interval(secs => (:rows - g) * :spacing), md5(g::text), 0, 'digits',
                       '1.0.1', 3.0, (g % 10)::text, 0.9, jsonb_build_object({features})
                FROM generate_series(:start, :stop) AS g"""),
                         {"rows": rows, "spacing": spacing_s, "start": start + 1, "stop": min(rows, start + step)})
            conn.commit()
            print(f"  {min(rows, start + step):,} rows ({time.perf_counter() - started:.0f} s)", flush=True)
        conn.execute(text("ANALYZE predictions"))
        conn.commit()
        size = conn.execute(text("SELECT pg_total_relation_size('predictions')")).scalar_one()
    engine.dispose()
    return {"rows": rows, "fill_s": round(time.perf_counter() - started, 1), "table_mib": round(size / 2**20)}


def timed(fn: Any, repeat: int = 3) -> tuple[float, Any]:
    best, value = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - started)
    return round(best, 3), value


def run_reports(url: str, rows: int) -> dict[str, Any]:
    from app.core.config import Settings
    from app.monitoring import reports
    from app.monitoring.drift import Window
    from app.monitoring.store import make_engine, purge_rows
    from app.tasks.digits.model import MODEL_CLASS

    model = MODEL_CLASS.load(REPO_ROOT / "models" / "digits" / "1.0.1", Settings())
    names = sorted(model.reference["features"])
    out: dict[str, Any] = {"fill": fill(url, rows, names)}
    engine = make_engine(url)
    windows = {"count 500": Window(count=500), "1h": Window(seconds=3600), "24h": Window(seconds=86400),
               "7d": Window(seconds=7 * 86400)}
    for label, window in windows.items():
        seconds, report = timed(lambda w=window: reports.drift_report(engine, [model], w, min_samples=30))
        out[f"drift {label}"] = {"seconds": seconds, "n": report["models"][0]["n"],
                                 "status": report["models"][0]["status"]}
        print(f"  drift {label}: {seconds} s over {report['models'][0]['n']:,} rows", flush=True)
    seconds, _ = timed(lambda: reports.timeline(engine, model, Window(seconds=86400)))
    out["dashboard timeline 24h"] = {"seconds": seconds}
    print(f"  timeline 24h: {seconds} s", flush=True)
    started = time.perf_counter()
    purged = purge_rows(engine, 29)  # the oldest day
    out["retention purge of one day"] = {"rows": purged, "seconds": round(time.perf_counter() - started, 1)}
    print(f"  purge: {purged:,} rows in {out['retention purge of one day']['seconds']} s", flush=True)
    engine.dispose()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=250.0, help="rows/s per process")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rows", type=int, default=10_000_000)
    args = parser.parse_args()
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    result: dict[str, Any] = {"database": "PostgreSQL (TEST_DATABASE_URL), local"}
    for part in ("ingest", "scale"):
        schema = f"log_scale_{part}_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        try:
            url = with_search_path(PG_URL, schema)
            if part == "ingest":
                result["ingest"] = run_ingest(url, args.rate, args.seconds)
                print(f"ingest: {result['ingest']}", flush=True)
            else:
                result["scale"] = run_reports(url, args.rows)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    admin.dispose()
    write_results("log_scale", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
