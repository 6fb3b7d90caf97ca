"""Evaluation gate: score a candidate version against the baseline before it serves anyone.

    .venv-dev/bin/python -m training.compare digits --candidate 1.0.2 --baseline 1.0.1 \\
        [--production-data export.zip] [--tolerance 0.003] [--out var/compare/...]

The tasks are those the service serves (``TASK_MODULES``); each names, as ``Task.training``, the
module whose ``COMPARISON`` says what is scored: its metric, the drop that fails a candidate and
its sets. Both versions are loaded by the serving code (the task's model class, LiteRT) and
scored on the task's fixed held-out sets (MNIST test; EmoDB speakers 03 and 16 and nEMO speakers
KD0 and SM0, on the emotions both versions offer; membrane slices 25-29; for clustering, which
has no labels, the silhouette on the Mall customers) and, with ``--production-data``, on the
export's labelled production inputs (clustering: its rows) decoded as serving decodes them. Writes
``compare.json``, ``compare.md`` (a table) and ``compare.png``, and exits 1 when the candidate is
worse than the baseline by more than the tolerance on any set, 0 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.common import MODELS_DIR, Comparison, load_version, registered_tasks, write_json


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


def gated_tasks() -> dict[str, str]:
    """The served tasks that name a training module (``Task.training``), by name."""
    return {name: task.training for name, task in registered_tasks().items() if task.training}


def comparison(task: str) -> Comparison:
    """The task's ``COMPARISON``, from the training module its ``Task`` names."""
    modules = gated_tasks()
    if task not in modules:
        raise SystemExit(f"{task}: no evaluation gate (tasks with one: {', '.join(sorted(modules))})")
    return importlib.import_module(modules[task]).COMPARISON


def score(gate: Comparison, baseline: Any, candidate: Any, production: Path | None, limit: int) -> list[Scored]:
    return [Scored(held.name, held.n, held.score(baseline), held.score(candidate))
            for held in gate.sets(baseline, candidate, production, limit)]


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


def markdown(task: str, metric: str, args: argparse.Namespace, results: list[Scored], passed: bool,
             tolerance: float) -> str:
    lines = [f"# {task}: candidate {args.candidate} vs baseline {args.baseline}", "",
             f"Metric: {metric}; tolerance {tolerance:g} (the candidate fails if it is worse than that on any set).",
             "", f"| set | n | baseline {args.baseline} | candidate {args.candidate} | change | gate |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        lines.append(f"| {r.set} | {r.n} | {r.baseline:.4f} | {r.candidate:.4f} | {r.delta:+.4f} | {r.note} |")
    lines += ["", f"**{'PASS' if passed else 'FAIL'}**", ""]
    return "\n".join(lines)


def plot(task: str, metric: str, args: argparse.Namespace, results: list[Scored], path: Path) -> None:
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
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1.08)
    ax.set_title(f"{task}: {args.candidate} vs {args.baseline}")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=sorted(gated_tasks()))
    parser.add_argument("--candidate", required=True)
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--production-data", type=Path, default=None)
    parser.add_argument("--tolerance", type=float, default=None, help="default: the task's COMPARISON.tolerance")
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    parser.add_argument("--out", type=Path, default=None, help="default: var/compare/<task>-<candidate>-vs-<baseline>")
    parser.add_argument("--limit", type=int, default=0, help="score only the first N held-out items (smoke runs)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    task = args.task
    gate = comparison(task)
    tolerance = gate.tolerance if args.tolerance is None else args.tolerance
    baseline = load_version(task, args.baseline, args.models_dir)
    candidate = load_version(task, args.candidate, args.models_dir)
    results = score(gate, baseline, candidate, args.production_data, args.limit)
    passed, reasons = verdict(results, tolerance)
    out = args.out or Path(__file__).resolve().parents[1] / "var" / "compare" / f"{task}-{args.candidate}-vs-{args.baseline}"
    out.mkdir(parents=True, exist_ok=True)
    report = {"task": task, "metric": gate.metric, "candidate": args.candidate, "baseline": args.baseline,
              "tolerance": tolerance, "passed": passed, "reasons": reasons,
              "production_data": str(args.production_data) if args.production_data else None,
              "limit": args.limit or None,
              "sets": [{"set": r.set, "n": r.n, "baseline": r.baseline, "candidate": r.candidate,
                        "delta": r.delta, "gate": r.note} for r in results]}
    write_json(out / "compare.json", json.loads(json.dumps(report, default=float)))
    (out / "compare.md").write_text(markdown(task, gate.metric, args, results, passed, tolerance))
    plot(task, gate.metric, args, results, out / "compare.png")
    print(markdown(task, gate.metric, args, results, passed, tolerance))
    print(f"report: {out}/compare.json, compare.md, compare.png")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
