"""The model life cycle closing, measured, on digits: consent -> feedback -> drift -> export ->
retrain -> compare -> shadow -> promote.

    .venv-dev/bin/python -m bench.lifecycle [--traffic 2500] [--epochs 3]   (make lifecycle)

Needs the training environment (``make .venv-train/.installed``) for the retraining step. Works on
a copy of ``models/`` in a temporary directory, so nothing committed changes.

The data: the MNIST test set split in two by a seeded shuffle. Half A is the production traffic:
noisy copies (Gaussian noise, sigma 60 on 0-255) sent by consenting clients and labelled through
``/v1/feedback``; the candidate is retrained on them. Half B is never sent with consent nor trained
on, in any form: the before/after figures are measured on it only, noisy (its own noise draw) and
clean, through the running service.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.common import REPO_ROOT, SHARED_DATA, png_bytes, write_results
from bench.liveserver import running_server

TOKEN = "lifecycle-bench-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
BATCH = 100  # images per request
SIGMA = 60.0


def noisy(images: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(images.astype(np.float64) + rng.normal(0.0, SIGMA, images.shape), 0, 255).astype(np.uint8)


def predict(client: httpx.Client, images: np.ndarray, *, consent: bool) -> list[tuple[str, list[str]]]:
    """(request_id, labels) per request of up to BATCH images."""
    out = []
    headers = {"X-Data-Consent": "granted"} if consent else {}
    for start in range(0, len(images), BATCH):
        files = [("image", (f"{i}.png", png_bytes(img), "image/png"))
                 for i, img in enumerate(images[start:start + BATCH])]
        response = client.post("/v1/digits/predict", files=files, headers=headers)
        response.raise_for_status()
        body = response.json()
        out.append((body["request_id"], [p["label"] for p in body["predictions"]]))
    return out


def accuracy(client: httpx.Client, images: np.ndarray, labels: np.ndarray) -> float:
    predicted = [label for _, batch in predict(client, images, consent=False) for label in batch]
    return float(np.mean(np.asarray(predicted, dtype=np.int64) == labels))


def evaluate(client: httpx.Client, half_b: np.ndarray, y_b: np.ndarray, seed: int) -> dict[str, float]:
    return {"noisy": round(accuracy(client, noisy(half_b, seed + 1), y_b), 4),
            "clean": round(accuracy(client, half_b, y_b), 4)}


def versions(client: httpx.Client) -> dict[str, Any]:
    return next(m for m in client.get("/v1/models").json()["models"] if m["task"] == "digits")["versions"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traffic", type=int, default=2500, help="noisy half-A digits sent with consent")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=4, help="--production-repeat for the retraining")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train_python = REPO_ROOT / ".venv-train" / "bin" / "python"
    if not train_python.exists():
        raise SystemExit("the retraining step needs the training environment: make .venv-train/.installed")

    with np.load(SHARED_DATA / "mnist" / "mnist.npz") as data:
        x_test, y_test = data["x_test"], data["y_test"].astype(np.int64)
    order = np.random.default_rng(args.seed).permutation(len(x_test))
    half_a, half_b = order[: len(order) // 2], order[len(order) // 2:]
    assert not set(half_a.tolist()) & set(half_b.tolist())
    traffic_idx = half_a[: args.traffic]
    x_traffic, y_traffic = noisy(x_test[traffic_idx], args.seed), y_test[traffic_idx]
    x_b, y_b = x_test[half_b], y_test[half_b]

    work = Path(tempfile.mkdtemp(prefix="lifecycle-"))
    models = work / "models"
    shutil.copytree(REPO_ROOT / "models", models)
    database = f"sqlite:///{work / 'predictions.db'}"
    env = {"MODELS_DIR": str(models), "DATABASE_URL": database, "ADMIN_TOKEN": TOKEN,
           "LOG_FLUSH_INTERVAL_S": "0.2"}
    result: dict[str, Any] = {"traffic": args.traffic, "sigma": SIGMA, "seed": args.seed,
                              "evaluation": f"MNIST test half B: {len(half_b)} images never sent with consent "
                                            "nor trained on, noisy (own noise draw) and clean",
                              "steps": {}}
    steps = result["steps"]
    clock = time.perf_counter()

    def step(name: str, **figures: Any) -> None:
        steps[name] = {**figures, "at_s": round(time.perf_counter() - clock, 1)}
        print(f"[{steps[name]['at_s']:7.1f}s] {name}: {json.dumps(figures)}", flush=True)

    try:
        # 1. serve the committed model; consenting clients send noisy digits; label them; drift
        with running_server(env=env, workers=1) as live, httpx.Client(base_url=live.base_url, timeout=60) as c:
            baseline = versions(c)["primary"]
            before = evaluate(c, x_b, y_b, args.seed)
            step("before", version=baseline, **before)
            served = predict(c, x_traffic, consent=True)
            predicted = [label for _, labels in served for label in labels]
            step("traffic", requests=len(served), images=len(predicted),
                 accuracy=round(float(np.mean(np.asarray(predicted, dtype=np.int64) == y_traffic)), 4))
            k = 0
            for request_id, labels in served:
                for index in range(len(labels)):
                    response = c.post("/v1/feedback", json={"request_id": request_id, "index": index,
                                                            "label": str(y_traffic[k])})
                    assert response.status_code == 201, response.text
                    k += 1
            live_accuracy = c.get("/v1/monitoring/accuracy", params={"model": "digits", "window": str(k)},
                                  headers=ADMIN).json()["models"][0]
            step("feedback", labelled=k, live_accuracy=live_accuracy["accuracy"])
            drift = c.get("/v1/monitoring/drift", params={"model": "digits", "window": str(len(predicted))},
                          headers=ADMIN).json()["models"][0]
            step("drift", status=drift["status"], drift_score=drift["drift_score"],
                 drifted=[name for name, f in (drift.get("features") or {}).items() if f["status"] == "drift"])
            export = c.get("/v1/monitoring/dataset", params={"model": "digits", "labelled": "true"}, headers=ADMIN)
            export.raise_for_status()
            export_path = work / "export.zip"
            export_path.write_bytes(export.content)
            with zipfile.ZipFile(io.BytesIO(export.content)) as archive:
                lines = archive.read("manifest.jsonl").decode().splitlines()
            step("export", bytes=len(export.content), manifest_lines=len(lines))

        # 2. retrain with the production data (a short run), then the evaluation gate
        started = time.perf_counter()
        train = subprocess.run([str(train_python), "-m", "training.digits", "--models-dir", str(models),
                                "--production-data", str(export_path), "--production-repeat", str(args.repeat),
                                "--epochs", str(args.epochs)], cwd=REPO_ROOT, capture_output=True, text=True)
        if train.returncode != 0:
            print(train.stdout[-3000:], train.stderr[-3000:], file=sys.stderr)
            raise SystemExit("retraining failed")
        candidate = sorted((p.name for p in (models / "digits").iterdir()), key=lambda v: [int(x) for x in v.split(".")])[-1]
        metadata = json.loads((models / "digits" / candidate / "metadata.json").read_text())
        step("retrain", version=candidate, seconds=round(time.perf_counter() - started, 1), epochs=args.epochs,
             production=metadata["data"]["production"], mnist_test_accuracy=metadata["metrics"]["test_accuracy"])
        compare_out = work / "compare"
        gate = subprocess.run([sys.executable, "-m", "training.compare", "digits", "--candidate", candidate,
                               "--baseline", baseline, "--models-dir", str(models), "--production-data",
                               str(export_path), "--out", str(compare_out)], cwd=REPO_ROOT, capture_output=True,
                              text=True)
        report = json.loads((compare_out / "compare.json").read_text())
        step("compare", passed=report["passed"], exit_code=gate.returncode,
             sets={s["set"]: {"baseline": round(s["baseline"], 4), "candidate": round(s["candidate"], 4)}
                   for s in report["sets"]})
        shutil.copy(compare_out / "compare.png", REPO_ROOT / "bench" / "results" / "lifecycle-compare.png")
        if gate.returncode != 0:
            raise SystemExit(f"the candidate failed the gate: {report['reasons']}")

        # 3. the candidate in shadow, on half B sent without consent (nothing of it is stored)
        shadow_env = {**env, "MODEL_VERSIONS": json.dumps({"digits": baseline}),
                      "SHADOW_VERSIONS": json.dumps({"digits": candidate})}
        with running_server(env=shadow_env, workers=1) as live, httpx.Client(base_url=live.base_url, timeout=60) as c:
            roles = versions(c)
            x_shadow = noisy(x_b, args.seed + 1)
            shadow_served = predict(c, x_shadow, consent=False)
            k = 0
            for request_id, labels in shadow_served:
                for index in range(len(labels)):
                    c.post("/v1/feedback", json={"request_id": request_id, "index": index, "label": str(y_b[k])})
                    k += 1
            deadline = time.monotonic() + 60
            while True:  # the shadow predicts after each response: wait for it to catch up
                shadow = c.get("/v1/monitoring/shadow", params={"model": "digits", "window": str(len(x_b))},
                               headers=ADMIN).json()
                if shadow["n"] >= len(x_b) or time.monotonic() > deadline:
                    break
                time.sleep(1)
            step("shadow", roles={"primary": roles["primary"], "shadow": roles["shadow"]}, n=shadow["n"],
                 agreement=shadow["agreement"], primary_accuracy=shadow["primary"]["accuracy"],
                 shadow_accuracy=shadow["shadow"]["accuracy"])

        # 4. promote: pin the candidate (on Heroku: heroku config:set MODEL_VERSIONS=...)
        promoted_env = {**env, "MODEL_VERSIONS": json.dumps({"digits": candidate})}
        with running_server(env=promoted_env, workers=1) as live, httpx.Client(base_url=live.base_url, timeout=60) as c:
            roles = versions(c)
            after = evaluate(c, x_b, y_b, args.seed)
            step("after", version=roles["primary"], **after)
        result["before"], result["after"] = before, after
        result["baseline"], result["candidate"] = baseline, candidate
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - clock, 1)
    write_results("lifecycle", result)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
