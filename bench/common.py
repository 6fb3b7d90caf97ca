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


def served_versions(base_url: str) -> dict[str, str]:
    """The version each ready task of a running server serves (``GET /v1/models``)."""
    import httpx

    models = httpx.get(base_url + "/v1/models", timeout=30.0).json()["models"]
    return {m["task"]: m["version"] for m in models if m.get("ready")}


def newest_versions(models_dir: Path = REPO_ROOT / "models") -> dict[str, str]:
    """The version each task's folder in ``models_dir`` serves when none is pinned: the newest."""
    from app.core.registry import version_key

    return {task.name: max((v.name for v in task.iterdir() if v.is_dir()), key=version_key)
            for task in sorted(models_dir.iterdir()) if task.is_dir()}


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    q = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 else ordered * 99
    return {"n": len(ordered), "p50_ms": round(q[49], 3), "p95_ms": round(q[94], 3),
            "p99_ms": round(q[98], 3), "mean_ms": round(statistics.fmean(ordered), 3)}


def cpu_model() -> str:
    """The CPU the figures were measured on (a figure holds for that CPU only), with its core count."""
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.processor() or 'unknown'} x {len(names) or '?'}"


# The CPU's vector instructions that the inference kernels (XNNPACK) choose between.
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
              "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "asimd",
              "asimddp", "sve", "i8mm")


def cpu_features() -> list[str]:
    """Which of :data:`SIMD_FLAGS` the CPU reports (``/proc/cpuinfo``), in that order."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
            break
    return [flag for flag in SIMD_FLAGS if flag in flags]


def write_results(name: str, results: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {"measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
               "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpu": cpu_model(),
               "cpu_features": cpu_features(), **results}
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))
    return path


def png_bytes(array: Any) -> bytes:
    """A uint8 array (H, W) or (H, W, C) encoded as PNG."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def mnist_digit_png(index: int = 0) -> bytes:
    """An MNIST test digit (the first is a 7) as a PNG: the light request the benches and tests time."""
    import numpy as np

    with np.load(SHARED_DATA / "mnist" / "mnist.npz") as data:
        return png_bytes(data["x_test"][index])


def mnist_digit_pixels(index: int = 0) -> Any:
    """The same MNIST test digit as :func:`mnist_digit_png`, as float32 28 x 28 in [0, 1] (the
    ``pixels`` a V2 client sends)."""
    import numpy as np

    with np.load(SHARED_DATA / "mnist" / "mnist.npz") as data:
        return data["x_test"][index].astype(np.float32) / 255.0


def checkout(ref: str) -> Path:
    """The tree of commit ``ref`` (its code and models), extracted once under ``var/``."""
    import subprocess

    tree = REPO_ROOT / "var" / f"before-{ref}"
    if not (tree / "app" / "main.py").exists():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", ref], cwd=REPO_ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def timed_post(base_url: str, path: str, **kwargs: Any) -> tuple[Any, float]:
    """``httpx.post`` and its wall time in seconds."""
    import time

    import httpx

    started = time.perf_counter()
    response = httpx.post(base_url + path, timeout=60.0, **kwargs)
    return response, time.perf_counter() - started


def wait_for_model(client: Any, task: str, timeout: float = 90.0) -> str:
    """The served version of ``task`` once it is loaded (the server may still be loading others)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for model in client.get("/v1/models").json()["models"]:
            if model["task"] == task and model["ready"]:
                return str(model["version"])
        time.sleep(0.2)
    raise RuntimeError(f"the {task} model did not become ready within {timeout:.0f}s")
