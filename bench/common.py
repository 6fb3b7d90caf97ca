"""Small helpers for the bench scripts: percentiles, result files, the serving interpreter."""

from __future__ import annotations

import json
import platform
import statistics
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def serving_python() -> str | None:
    """The serving-only environment's interpreter (``make serve``'s .venv), if it exists."""
    candidate = REPO_ROOT / ".venv" / "bin" / "python"
    return str(candidate) if (REPO_ROOT / ".venv" / "bin" / "gunicorn").exists() else None


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    q = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 else ordered * 99
    return {"n": len(ordered), "p50_ms": round(q[49], 3), "p95_ms": round(q[94], 3),
            "p99_ms": round(q[98], 3), "mean_ms": round(statistics.fmean(ordered), 3)}


def write_results(name: str, results: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {"measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
               "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), **results}
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))
    return path
