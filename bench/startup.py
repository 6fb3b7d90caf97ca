"""Boot-to-ready time, RSS per worker after loading every model (and after one request to each
task), and the serving install size. Runs the Procfile command in the serving-only environment
(.venv from requirements.txt) when it exists.

    python -m bench.startup [--workers 2] [--runs 3]
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

from bench import deploy_figures
from bench.common import REPO_ROOT, served_versions, serving_python, write_results
from bench.liveserver import MemorySampler, running_server


def site_packages_mib(python: str) -> dict[str, float]:
    out = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    total = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    return {"site_packages": out, "install_mib": round(total / 2**20, 1)}


def memory_mib(pids: list[int]) -> list[dict[str, float]]:
    """Per worker: RSS, and PSS/USS, which count pages shared between processes (the libraries'
    code) once, as the dyno's memory limit does."""
    out = []
    for pid in pids:
        info = psutil.Process(pid).memory_full_info()
        out.append({k: round(getattr(info, k) / 2**20, 1) for k in ("rss", "pss", "uss")})
    return out


def touch_every_task(base_url: str) -> None:
    """One real request per task so the RSS includes first-request allocations."""
    png = io.BytesIO()
    Image.fromarray((np.eye(64) * 255).astype(np.uint8)).save(png, format="PNG")
    with httpx.Client(base_url=base_url, timeout=60) as client:
        client.post("/v1/clustering/predict", json={"instances": [{"annual_income": 50, "spending_score": 50}]})
        client.post("/v1/digits/predict", files={"image": ("d.png", png.getvalue(), "image/png")})
        client.post("/v1/segmentation/predict", files={"image": ("s.png", png.getvalue(), "image/png")})
        import soundfile as sf
        wav = io.BytesIO()
        t = np.arange(16000 * 2) / 16000
        sf.write(wav, (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32),
                 16000, format="WAV")
        client.post("/v1/emotion/predict", files={"audio": ("a.wav", wav.getvalue(), "audio/wav")})


def heavy_requests(server, workers: int) -> None:
    """The largest requests the limits allow on the heaviest routes, a 2048 x 2048 segmentation and
    a 10 000 x 50 ad-hoc K-means fit, until every worker has served each (a worker that serves one
    grows by tens of MiB while it runs): sent together on new connections, every answer checked."""
    import concurrent.futures

    rng = np.random.default_rng(0)
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (2048, 2048), dtype=np.uint8)).save(png, format="PNG")
    data = np.round(rng.normal(size=(10_000, 50)), 2).tolist()
    requests = {"segmentation": ("/v1/segmentation/predict",
                                 {"files": {"image": ("big.png", png.getvalue(), "image/png")}}),
                "fit": ("/v1/clustering/fit", {"json": {"data": data}})}
    for name, (path, kwargs) in requests.items():
        served: set[int] = set()
        for _ in range(8):
            with MemorySampler(server, interval=0.05) as memory, \
                    concurrent.futures.ThreadPoolExecutor(workers) as pool:
                answers = list(pool.map(lambda _: httpx.post(server.base_url + path, timeout=60, **kwargs),
                                        range(workers)))
            for answer in answers:  # a busy worker refuses the second one: the designed answer
                assert answer.status_code == 200 or answer.json().get("code") == "overloaded", answer.text
            served |= {pid for pid, peak in memory.peak_rss.items() if peak - memory.start_rss[pid] > 15}
            if len(served) >= workers:
                break
        else:
            raise RuntimeError(f"not every worker served a heavy {name} request: {sorted(served)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    python = serving_python()
    boots, loaded, warmed, heavy = [], [], [], []
    for _ in range(args.runs):
        with running_server(workers=args.workers, python=python) as server:
            boots.append(server.boot_seconds)
            pids = server.worker_pids()
            loaded.append(memory_mib(pids))
            touch_every_task(server.base_url)
            warmed.append(memory_mib(pids))
            heavy_requests(server, args.workers)
            heavy.append(memory_mib(pids))
            models = served_versions(server.base_url)
            master = psutil.Process(server.pid).memory_full_info()
    results = {
        "environment": "serving .venv (requirements.txt)" if python else "current interpreter",
        "workers": args.workers,
        "boot_to_ready_s": {"runs": [round(b, 2) for b in boots], "median": round(statistics.median(boots), 2)},
        "memory_per_worker_mib_after_load": loaded[-1],
        "memory_per_worker_mib_after_one_request_per_task": warmed[-1],
        "memory_per_worker_mib_after_heavy_requests": heavy[-1],
        "total_pss_mib_after_heavy_requests": round(
            sum(w["pss"] for w in heavy[-1]) + master.pss / 2**20, 1),
        "master_mib": {"rss": round(master.rss / 2**20, 1), "pss": round(master.pss / 2**20, 1)},
        "total_pss_mib_after_one_request_per_task": round(
            sum(w["pss"] for w in warmed[-1]) + master.pss / 2**20, 1),
        "models": models,
        **(site_packages_mib(python) if python else {}),
        "models_dir_mib": round(sum(f.stat().st_size for f in (REPO_ROOT / "models").rglob("*")
                                    if f.is_file()) / 2**20, 2),
    }
    write_results("startup", results)
    if (deploy_figures.RESULTS_DIR / "docker.json").exists():
        deploy_figures.write()  # app.json's and docs/deploy.md's memory figures


if __name__ == "__main__":
    main()
