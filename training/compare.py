"""Evaluation gate: score a candidate version against the baseline before it serves anyone.

    .venv-dev/bin/python -m training.compare digits --candidate 1.0.2 --baseline 1.0.1 \\
        [--production-data export.zip] [--tolerance 0.003] [--out var/compare/...]

Both versions are loaded by the serving code (``app.tasks.<task>.model``, LiteRT) and scored on
the fixed held-out set (MNIST test; EmoDB speakers 03 and 16 and nEMO speakers KD0 and SM0, on
the emotions both versions offer; membrane slices 25-29; for clustering,
which has no labels, the silhouette on the Mall customers) and, with ``--production-data``, on the
export's labelled production inputs (clustering: its rows) decoded as serving decodes them. Writes
``compare.json``, ``compare.md`` (a table) and ``compare.png``, and exits 1 when the candidate is
worse than the baseline by more than the tolerance on any set, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.common import MODELS_DIR, SHARED_DATA, write_json

# What "worse beyond tolerance" means, per task: the metric's drop that fails the gate. Set a bit
# above the run-to-run noise of each held-out set (MNIST test: 10 000 images; EmoDB 03+16: 84
# clips, one clip = 1.2 points; membrane: 1.3 M pixels).
TOLERANCE = {"digits": 0.003, "emotion": 0.03, "segmentation": 0.005, "clustering": 0.02}
METRIC = {"digits": "accuracy", "emotion": "accuracy", "segmentation": "pixel_accuracy",
          "clustering": "silhouette"}


@dataclass
class Scored:
    set: str
    n: int
    baseline: float
    candidate: float
    note: str = ""

    @property
    def delta(self) -> float:
        return self.candidate - self.baseline


def load(task: str, version: str, models_dir: Path) -> Any:
    import importlib

    from app.core.config import Settings

    path = Path(models_dir) / task / version
    if not path.is_dir():
        raise SystemExit(f"{task} {version}: no such version under {models_dir}/{task}")
    model_class = importlib.import_module(f"app.tasks.{task}.model").MODEL_CLASS
    return model_class.load(path, Settings(models_dir=models_dir))


# ---- digits -----------------------------------------------------------------------------------
def digits_sets(production: Path | None, limit: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    from app.tasks.digits.preprocess import normalize_batch

    with np.load(SHARED_DATA / "mnist" / "mnist.npz") as data:
        x, y = data["x_test"], data["y_test"].astype(np.int64)
    if limit:
        x, y = x[:limit], y[:limit]
    sets = [("MNIST test (held out)", normalize_batch(x)[..., None], y)]
    if production is not None:
        from training.digits import production_digits

        xp, yp, _ = production_digits(production)
        sets.append(("production (labelled)", xp, yp))
    return sets


def digits_accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    if len(x) == 0:
        return float("nan")
    predicted = np.concatenate([model.predict(x[i:i + 256]).argmax(axis=1) for i in range(0, len(x), 256)])
    labels = np.asarray([int(label) for label in model.metadata["labels"]])
    return float((labels[predicted] == y).mean())


# ---- emotion ----------------------------------------------------------------------------------
def emotion_sets(production: Path | None, limit: int) -> list[tuple[str, list[tuple[tuple[np.ndarray, int], str]]]]:
    import csv

    import soundfile as sf

    from training.emotion import (
        LETTER_TO_LABEL,
        NEMO_TEST_SPEAKERS,
        NEMO_TO_LABEL,
        TEST_SPEAKERS,
    )

    clips = []
    for path in sorted((SHARED_DATA / "emodb" / "wav").glob("*.wav")):
        if path.name[:2] in TEST_SPEAKERS:
            waveform, rate = sf.read(path, dtype="float32", always_2d=False)
            clips.append(((waveform, rate), LETTER_TO_LABEL[path.name[5]]))
    nemo = []
    with open(SHARED_DATA / "nemo" / "data.tsv", newline="", encoding="utf-8") as handle:
        rows = sorted(csv.DictReader(handle, delimiter="\t"), key=lambda r: r["file"])
    for row in rows:
        if row["speaker_id"] in NEMO_TEST_SPEAKERS:
            waveform, rate = sf.read(SHARED_DATA / "nemo" / "ogg" / row["file"], dtype="float32",
                                     always_2d=False)
            nemo.append(((waveform, rate), NEMO_TO_LABEL[row["emotion"]]))
    if limit:
        clips, nemo = clips[:limit], nemo[:limit]
    sets = [("EmoDB speakers 03+16 (held out)", clips), ("nEMO speakers KD0+SM0 (held out)", nemo)]
    if production is not None:
        from training.emotion import LABELS, load_production

        prod, _ = load_production(production)
        from app.tasks.emotion.preprocess import FEATURES

        sets.append(("production (labelled)", [((c["wav"], FEATURES.sample_rate), LABELS[c["label"]]) for c in prod]))
    return sets


def emotion_accuracy(model: Any, clips: list, labels: set[str]) -> float:
    """Accuracy on the clips whose emotion is in ``labels`` (the classes both versions offer:
    a version cannot be right on a class it does not answer)."""
    clips = [c for c in clips if c[1] in labels]
    if not clips:
        return float("nan")
    return float(np.mean([model.classify(wav, rate).emotion == label for (wav, rate), label in clips]))


def segmentation_sets(limit: int) -> list[tuple[str, list[tuple[np.ndarray, np.ndarray]]]]:
    from PIL import Image

    from training.segmentation import TEST_SLICES

    base = SHARED_DATA / "membrane" / "train"
    slices = [(np.asarray(Image.open(base / "image" / f"{i}.png").convert("L")),
               np.asarray(Image.open(base / "label" / f"{i}.png").convert("L")) == 0)
              for i in TEST_SLICES[:limit or None]]
    return [("membrane slices 25-29 (held out)", slices)]


def segmentation_accuracy(model: Any, slices: list) -> float:
    correct = total = 0
    for gray, membrane in slices:
        mask = model.segment(gray, model.threshold).mask > 0
        correct += int((mask == membrane).sum())
        total += membrane.size
    return correct / total


# ---- clustering -------------------------------------------------------------------------------
def clustering_sets(models: list[Any], production: Path | None) -> list[tuple[str, np.ndarray]]:
    import csv

    features = models[0].features
    columns = models[0].metadata.get("input", {}).get("columns") or features
    with open(SHARED_DATA / "mall_customers" / "Mall_Customers.csv", newline="") as f:
        table = [[float(row[c]) for c in columns] for row in csv.DictReader(f)]
    sets = [("Mall customers (in-sample: the training data)", np.asarray(table, dtype=np.float64))]
    if production is not None:
        from training.production import production_rows

        rows, _ = production_rows(production, features)
        sets.append(("production rows", rows))
    return sets


def clustering_silhouette(model: Any, x: np.ndarray) -> float:
    from sklearn.metrics import silhouette_score

    labels = model.predict(x).labels
    if len(x) < 3 or len(set(labels.tolist())) < 2:
        return float("nan")
    return float(silhouette_score(model.scaler.transform(x), labels))


# ---- the gate ---------------------------------------------------------------------------------
def score(task: str, baseline: Any, candidate: Any, production: Path | None, limit: int) -> list[Scored]:
    out: list[Scored] = []
    scorers: list[tuple[str, int, Callable[[Any], float]]] = []
    if task == "digits":
        for name, x, y in digits_sets(production, limit):
            scorers.append((name, len(y), lambda m, x=x, y=y: digits_accuracy(m, x, y)))
    elif task == "emotion":
        shared = set(baseline.labels) & set(candidate.labels)
        for name, clips in emotion_sets(production, limit):
            n = sum(label in shared for _, label in clips)
            scorers.append((name, n, lambda m, clips=clips: emotion_accuracy(m, clips, shared)))
    elif task == "segmentation":
        if production is not None:
            print("segmentation: production data has no masks; scored on the held-out slices only")
        for name, slices in segmentation_sets(limit):
            scorers.append((name, len(slices), lambda m, slices=slices: segmentation_accuracy(m, slices)))
    elif task == "clustering":
        if baseline.features != candidate.features:
            raise SystemExit(f"the versions cluster different features ({baseline.features} vs "
                             f"{candidate.features}); their silhouettes are not comparable")
        for name, x in clustering_sets([baseline, candidate], production):
            scorers.append((name, len(x), lambda m, x=x: clustering_silhouette(m, x)))
    else:
        raise SystemExit(f"unknown task {task!r}")
    for name, n, scorer in scorers:
        out.append(Scored(name, n, scorer(baseline), scorer(candidate)))
    return out


def verdict(results: list[Scored], tolerance: float) -> tuple[bool, list[str]]:
    """Pass unless the candidate is worse than the baseline by more than ``tolerance`` on a set
    that has data (an empty set cannot fail it, and says so)."""
    reasons = []
    for r in results:
        if r.n == 0 or np.isnan(r.baseline) or np.isnan(r.candidate):
            r.note = "no data: not gated"
            continue
        if r.delta < -tolerance:
            r.note = f"worse by {-r.delta:.4f} > {tolerance:g}"
            reasons.append(f"{r.set}: {r.candidate:.4f} vs {r.baseline:.4f} (worse by {-r.delta:.4f} > {tolerance:g})")
        else:
            r.note = "ok"
    return not reasons, reasons


def markdown(task: str, args: argparse.Namespace, results: list[Scored], passed: bool, tolerance: float) -> str:
    metric = METRIC[task]
    lines = [f"# {task}: candidate {args.candidate} vs baseline {args.baseline}", "",
             f"Metric: {metric}; tolerance {tolerance:g} (the candidate fails if it is worse than that on any set).",
             "", f"| set | n | baseline {args.baseline} | candidate {args.candidate} | change | gate |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        lines.append(f"| {r.set} | {r.n} | {r.baseline:.4f} | {r.candidate:.4f} | {r.delta:+.4f} | {r.note} |")
    lines += ["", f"**{'PASS' if passed else 'FAIL'}**", ""]
    return "\n".join(lines)


def plot(task: str, args: argparse.Namespace, results: list[Scored], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.2 + 2.2 * len(results), 3.6))
    positions = np.arange(len(results))
    for offset, label, values in ((-0.2, f"baseline {args.baseline}", [r.baseline for r in results]),
                                  (0.2, f"candidate {args.candidate}", [r.candidate for r in results])):
        bars = ax.bar(positions + offset, values, width=0.38, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(positions, [f"{r.set}\n(n={r.n})" for r in results], fontsize=8)
    ax.set_ylabel(METRIC[task])
    ax.set_ylim(0, 1.08)
    ax.set_title(f"{task}: {args.candidate} vs {args.baseline}")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=sorted(TOLERANCE))
    parser.add_argument("--candidate", required=True)
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--production-data", type=Path, default=None)
    parser.add_argument("--tolerance", type=float, default=None, help="default: per task, see TOLERANCE")
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    parser.add_argument("--out", type=Path, default=None, help="default: var/compare/<task>-<candidate>-vs-<baseline>")
    parser.add_argument("--limit", type=int, default=0, help="score only the first N held-out items (smoke runs)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    task = args.task
    tolerance = TOLERANCE[task] if args.tolerance is None else args.tolerance
    baseline = load(task, args.baseline, args.models_dir)
    candidate = load(task, args.candidate, args.models_dir)
    results = score(task, baseline, candidate, args.production_data, args.limit)
    passed, reasons = verdict(results, tolerance)
    out = args.out or Path(__file__).resolve().parents[1] / "var" / "compare" / f"{task}-{args.candidate}-vs-{args.baseline}"
    out.mkdir(parents=True, exist_ok=True)
    report = {"task": task, "metric": METRIC[task], "candidate": args.candidate, "baseline": args.baseline,
              "tolerance": tolerance, "passed": passed, "reasons": reasons,
              "production_data": str(args.production_data) if args.production_data else None,
              "limit": args.limit or None,
              "sets": [{"set": r.set, "n": r.n, "baseline": r.baseline, "candidate": r.candidate,
                        "delta": r.delta, "gate": r.note} for r in results]}
    write_json(out / "compare.json", json.loads(json.dumps(report, default=float)))
    (out / "compare.md").write_text(markdown(task, args, results, passed, tolerance))
    plot(task, args, results, out / "compare.png")
    print(markdown(task, args, results, passed, tolerance))
    print(f"report: {out}/compare.json, compare.md, compare.png")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
