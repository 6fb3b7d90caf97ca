"""The dataset export's memory: a large export streams without the worker's memory growing with it.

    .venv-dev/bin/python -m bench.export [--rows 4000 8000] [--kib 100]

For each ``--rows``: fills a fresh SQLite prediction log with that many consented digit inputs of
``kib`` KiB each (random bytes behind a PNG signature, so nothing compresses), starts the server on
it (one worker), streams ``GET /v1/monitoring/dataset`` to a file while sampling the worker's RSS,
and checks the zip: every file there and whole. Prints and writes ``bench/results/export.json``
(one entry per ``--rows``: the worker's memory should not grow with the export).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np

from bench.common import write_results
from bench.liveserver import MemorySampler, running_server

TOKEN = "export-bench"


def fill(url: str, rows: int, kib: int) -> int:
    from app.monitoring.store import create_schema, make_engine, predictions, utcnow

    engine = make_engine(url)
    create_schema(engine)
    rng = np.random.default_rng(0)
    total = 0
    with engine.begin() as conn:
        for start in range(0, rows, 200):
            batch = []
            for i in range(start, min(rows, start + 200)):
                data = b"\x89PNG\r\n\x1a\n" + rng.bytes(kib * 1024 - 8)
                total += len(data)
                batch.append({"created_at": utcnow(), "request_id": f"{i:032x}", "instance": 0, "model": "digits",
                              "version": "1.0.1", "latency_ms": 1.0, "prediction": "7", "confidence": 0.9,
                              "features": {}, "input": data})
            conn.execute(predictions.insert(), batch)
    engine.dispose()
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[4000, 8000])
    parser.add_argument("--kib", type=int, default=100)
    args = parser.parse_args()
    runs = [export_run(rows, args.kib) for rows in args.rows]
    write_results("export", {"runs": runs})
    return 0


def export_run(rows: int, kib: int) -> dict:
    """One export of ``rows`` stored inputs of ``kib`` KiB: its speed and the worker's memory."""
    work = Path(tempfile.mkdtemp(prefix="export-bench-"))
    url = f"sqlite:///{work / 'predictions.db'}"
    stored = fill(url, rows, kib)
    env = {"DATABASE_URL": url, "ADMIN_TOKEN": TOKEN}
    with running_server(env=env, workers=1) as live, httpx.Client(base_url=live.base_url, timeout=120) as client:
        client.get("/v1/models")
        time.sleep(1.0)
        before = max(live.rss_mib().values())
        out = work / "export.zip"
        started = time.perf_counter()
        with MemorySampler(live) as sampler, out.open("wb") as f, client.stream(
                "GET", "/v1/monitoring/dataset", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
            response.raise_for_status()
            for chunk in response.iter_bytes():
                f.write(chunk)
        seconds = time.perf_counter() - started
        peak = max(sampler.peak_rss.values())
    with zipfile.ZipFile(out) as archive:
        names = archive.namelist()
        bad = archive.testzip()
        manifest_lines = len(archive.read("manifest.jsonl").splitlines())
    size = out.stat().st_size
    os.remove(out)
    result = {"rows": rows, "input_kib": kib, "stored_mib": round(stored / 2**20, 1),
              "zip_mib": round(size / 2**20, 1), "files": len(names) - 1, "manifest_lines": manifest_lines,
              "zip_ok": bad is None, "seconds": round(seconds, 2),
              "mib_per_s": round(size / 2**20 / seconds, 1),
              "worker_rss_before_mib": round(before, 1), "worker_rss_peak_mib": round(peak, 1),
              "worker_rss_growth_mib": round(peak - before, 1)}
    print(result, flush=True)
    assert result["files"] == rows == manifest_lines and result["zip_ok"]
    return result


if __name__ == "__main__":
    raise SystemExit(main())
