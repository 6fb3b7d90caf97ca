"""Mutation testing of the pure core with mutmut: preprocessing, drift, the request pipeline, errors.

    python -m bench.mutation [--max-children 1] [--all] [--resume]
    python -m bench.mutation --module app/core/pipeline.py [--module ...]   # after strengthening its tests
    python -m bench.mutation --recheck    # after explaining survivors in mutation-survivors.md

Each module's result records the sha256 of the source it was measured on, the commit
(``code_at``) and when (``measured_at``). A run mutates only the modules whose source changed since
(``--all``: every module) and keeps the others' results, so the file stays current at the cost of the
changed modules only; ``tests/unit/test_mutation_current.py`` fails when a module in scope no longer
matches its hash. The tests change more often than the code: ``--module PATH`` (repeatable, a path
in the scope) mutates that module again although its source is unchanged, with the modules whose
source changed, and keeps every other module's result and survivors as they were.

A survivor counts as explained when ``mutation-survivors.md`` names it exactly, in backticks
(`` `app.core.pipeline.x_consent__mutmut_7` ``); ``--recheck`` lists the survivors it does not name
and the names it gives that are no survivors of the recorded runs (killed since, or renumbered
because their function changed: their explanation is stale).

mutmut needs its configuration in a ``pyproject.toml`` and runs the tests from a ``mutants/`` copy
of the sources. The repository has no ``pyproject.toml`` on purpose (Heroku's Python buildpack
would change how it installs the app), so this script lays a scratch copy of the checkout (the
files git tracks plus untracked, non-ignored ones) in ``var/mutation/``, writes the configuration
there, links ``../shared`` beside it (the tests read ``REPO_ROOT.parent / "shared"``, and
``REPO_ROOT`` is then ``var/mutation/mutants``) and runs ``mutmut run`` in it. Only the fast unit
tests of the modules in scope run (mutmut maps each function to the tests that call it), never a
test that loads a model or starts a server.

It writes ``bench/results/mutation.json``: per module and overall the mutants, killed, survived,
timeouts, mutants no test reaches, the score (killed / mutants), and each survivor's name and diff.
Why each survivor is acceptable is in ``bench/results/mutation-survivors.md``; the survivors that
file does not mention are listed at the end. Slow (about 15 minutes on two cores): not part of
``make test``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, RESULTS_DIR

WORK = REPO_ROOT / "var" / "mutation"
SCOPE = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "app" / "tasks").glob("*/preprocess.py")) + [
    "app/monitoring/drift.py", "app/core/pipeline.py", "app/core/errors.py", "app/core/jsonbody.py"]
# The unit tests that exercise the modules in scope without loading a model or starting a server.
# (The pipeline and the error handlers run in-process on endpoints declared by the tests, on an app
# with no model loaded.)
TESTS = [
    "tests/unit/test_clustering_preprocess.py",
    "tests/unit/test_clustering_choices.py",
    "tests/unit/test_digits_preprocess.py",
    "tests/unit/test_digits_preprocess_fast.py",
    "tests/unit/test_digits_image_modes.py",
    "tests/unit/test_emotion_preprocess.py",
    "tests/unit/test_emotion_feature_params.py",
    "tests/unit/test_emotion_vad.py",
    "tests/unit/test_segmentation_preprocess.py",
    "tests/unit/test_segmentation_image_modes.py",
    "tests/unit/test_monitoring_drift.py",
    "tests/unit/test_monitoring_drift_figures.py",
    "tests/unit/test_core_errors.py",
    "tests/unit/test_core_pipeline.py",
    "tests/unit/test_core_pipeline_parts.py",
    "tests/unit/test_core_inline.py",
    "tests/unit/test_v2_protocol.py",
    "tests/unit/test_core_logging.py",
]
SURVIVORS_NOTE = RESULTS_DIR / "mutation-survivors.md"
MUTANT_NAME = re.compile(r"`([^`\s]+__mutmut_\d+)`")


def explained_names() -> set[str]:
    """The mutants the survivors note names (exactly, in backticks)."""
    return set(MUTANT_NAME.findall(SURVIVORS_NOTE.read_text())) if SURVIVORS_NOTE.exists() else set()


def check_note(not_killed: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The survivors the note does not name, and the names in the note that are no survivors."""
    named = explained_names()
    survivors = {m["name"] for m in not_killed}
    return [m["name"] for m in not_killed if m["name"] not in named], sorted(named - survivors)


def checkout_files() -> list[str]:
    """The files a commit of this checkout would hold: tracked ones and untracked, non-ignored ones."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO_ROOT, capture_output=True, check=True).stdout
    return sorted({name for name in out.decode().split("\0") if name and (REPO_ROOT / name).is_file()})


def config_toml() -> str:
    def toml_list(items: list[str]) -> str:
        return "[" + ", ".join(json.dumps(item) for item in items) + "]"

    return "\n".join([
        "# Written by bench/mutation.py for this scratch copy only (the repository has no pyproject.toml).",
        "[tool.mutmut]",
        'source_paths = ["app"]',
        f"only_mutate = {toml_list(SCOPE)}",
        f"also_copy = {toml_list(['tests', 'bench', 'models', 'pytest.ini', 'README.md'])}",
        f"pytest_add_cli_args_test_selection = {toml_list(TESTS)}",
        # No .pytest_cache in the mutants/ copy.
        'pytest_add_cli_args = ["-p", "no:cacheprovider"]',
        "use_git_change_detection = false",
        "",
    ])


def lay_out(resume: bool) -> None:
    """``var/mutation/``: a copy of the checkout, the mutmut configuration and a link to ../shared."""
    if WORK.exists() and not resume:
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True, exist_ok=True)
    for name in checkout_files():
        target = WORK / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, target)
    (WORK / "pyproject.toml").write_text(config_toml())
    shared = WORK / "shared"
    if not shared.is_symlink() and (REPO_ROOT.parent / "shared").is_dir():
        shared.symlink_to((REPO_ROOT.parent / "shared").resolve(), target_is_directory=True)


def source_sha256(path: str) -> str:
    return hashlib.sha256((REPO_ROOT / path).read_bytes()).hexdigest()


def mutant_pattern(path: str) -> str:
    """The mutants of one module, as mutmut names them (``app.core.pipeline.x_name__mutmut_3``)."""
    return path.removesuffix(".py").replace("/", ".") + ".*"


def run_mutmut(max_children: int, patterns: list[str]) -> float:
    mutmut = Path(sys.executable).with_name("mutmut")
    log_path = WORK / "mutmut.log"
    print(f"mutmut run in {WORK} (log: {log_path})", flush=True)
    started = time.monotonic()
    # One BLAS/OpenMP thread: mutmut limits each mutant's CPU time, and scikit-learn's threads spinning
    # on a busy two-core machine turned correct K-means mutants into false timeouts.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    with open(log_path, "w") as log:
        code = subprocess.run([str(mutmut), "run", "--max-children", str(max_children), *patterns], cwd=WORK,
                              stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall_s = time.monotonic() - started
    if code != 0:
        print(log_path.read_text()[-4000:])
        raise SystemExit(f"mutmut run failed with exit code {code}")
    return wall_s


def read_results(paths: list[str]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Per module of ``paths`` the counts, and every mutant that was not killed (with its diff)."""
    from mutmut.stats import status_by_exit_code

    modules: dict[str, dict[str, Any]] = {}
    not_killed: list[dict[str, Any]] = []
    for path in paths:
        meta = json.loads((WORK / "mutants" / f"{path}.meta").read_text())
        statuses = {name: status_by_exit_code[code] for name, code in meta["exit_code_by_key"].items()}
        counts = Counter(statuses.values())
        total = len(statuses)
        modules[path] = {"mutants": total, "killed": counts["killed"], "survived": counts["survived"],
                         "timeout": counts["timeout"], "no_tests": counts["no tests"],
                         "other": total - sum(counts[s] for s in ("killed", "survived", "timeout", "no tests")),
                         "score": round(counts["killed"] / total, 4) if total else None,
                         "sha256": source_sha256(path)}
        not_killed += [{"name": name, "module": path, "status": status}
                       for name, status in sorted(statuses.items()) if status != "killed"]
    diffs = mutant_diffs([m["name"] for m in not_killed])
    for mutant in not_killed:
        mutant["diff"] = diffs.get(mutant["name"], "")
    return modules, not_killed


def mutant_diffs(names: list[str]) -> dict[str, str]:
    """``mutmut show`` of each mutant, read in one process in the scratch copy."""
    if not names:
        return {}
    script = ("import json, sys\nfrom mutmut.mutation.diff_apply import get_diff_for_mutant\n"
              "print(json.dumps({n: get_diff_for_mutant(n) for n in json.load(sys.stdin)}))")
    out = subprocess.run([sys.executable, "-c", script], cwd=WORK, input=json.dumps(names),
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def total_row(modules: dict[str, dict[str, Any]]) -> dict[str, Any]:
    keys = ("mutants", "killed", "survived", "timeout", "no_tests", "other")
    row: dict[str, Any] = {key: sum(m[key] for m in modules.values()) for key in keys}
    row["score"] = round(row["killed"] / row["mutants"], 4) if row["mutants"] else None
    return row


def print_table(modules: dict[str, dict[str, Any]], overall: dict[str, Any]) -> None:
    header = f"{'module':<38} {'mutants':>7} {'killed':>6} {'survived':>8} {'timeout':>7} {'no tests':>8} {'score':>6}"
    print(header)
    print("-" * len(header))
    for name, row in [*modules.items(), ("all", overall)]:
        print(f"{name:<38} {row['mutants']:>7} {row['killed']:>6} {row['survived']:>8} {row['timeout']:>7} "
              f"{row['no_tests']:>8} {row['score']:>6.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-children", type=int, default=1, help="mutants tested at once (default 1)")
    parser.add_argument("--resume", action="store_true",
                        help="keep var/mutation/mutants and test only the mutants without a result")
    parser.add_argument("--all", action="store_true", help="mutate every module, also those whose result is current")
    parser.add_argument("--module", action="append", default=[], metavar="PATH", choices=SCOPE,
                        help="mutate this module again although its result is current (repeatable); the "
                             "modules whose source changed are mutated too, the others keep their results")
    parser.add_argument("--recheck", action="store_true",
                        help="run nothing: re-read the survivors note and update mutation.json's list of "
                             "survivors it does not explain yet")
    args = parser.parse_args()
    if args.recheck:
        path = RESULTS_DIR / "mutation.json"
        payload = json.loads(path.read_text())
        unexplained, stale_names = check_note(payload["not_killed"])
        payload["not_explained_in_survivors_note"] = unexplained
        payload["named_in_survivors_note_but_not_survivors"] = stale_names
        path.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"{len(unexplained)} of {len(payload['not_killed'])} not explained")
        if stale_names:
            print(f"{len(stale_names)} named in {SURVIVORS_NOTE.name} but not survivors of the recorded runs, e.g. "
                  + ", ".join(stale_names[:5]))
        return

    path = RESULTS_DIR / "mutation.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    kept = {} if args.all else {m: r for m, r in previous.get("modules", {}).items()
                                if m in SCOPE and r.get("sha256") == source_sha256(m) and m not in args.module}
    stale = [m for m in SCOPE if m not in kept]
    if not stale:
        print("every module's result matches its source (sha256); --module PATH or --all to run them again")
        return
    changed = [m for m in stale if m not in args.module]
    print(f"mutating {len(stale)} module(s): {', '.join(stale)}"
          + (f" (source changed: {', '.join(changed)})" if changed and args.module else ""), flush=True)
    lay_out(args.resume)
    wall_s = run_mutmut(args.max_children, [mutant_pattern(m) for m in stale])
    fresh, fresh_not_killed = read_results(stale)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    measured_at = datetime.now(UTC).isoformat(timespec="seconds")
    for row in fresh.values():
        row.update(code_at=commit, measured_at=measured_at)
    for name, row in kept.items():  # results recorded before modules carried their own run
        if "code_at" not in row and name in previous.get("mutated_now", []):
            row.update(code_at=previous.get("code_at"), measured_at=previous.get("measured_at"))
    modules = {m: fresh[m] if m in fresh else kept[m] for m in SCOPE}
    not_killed = [m for m in previous.get("not_killed", []) if m["module"] in kept] + fresh_not_killed
    overall = total_row(modules)
    from importlib.metadata import version

    unexplained, stale_names = check_note(not_killed)
    payload = {
        "measured_at": measured_at,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "tool": f"mutmut {version('mutmut')}",
        "max_children": args.max_children,
        "code_at": commit,
        "mutated_now": stale,
        "wall_s": round(wall_s, 1),
        "resumed": args.resume,
        "score": "killed / mutants (a timeout, a mutant no test reaches and a survivor all count against it)",
        "scope": SCOPE,
        "tests": TESTS,
        "overall": overall,
        "modules": modules,
        "not_killed": not_killed,
        "not_explained_in_survivors_note": unexplained,
        "named_in_survivors_note_but_not_survivors": stale_names,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print_table(modules, overall)
    print(f"\n{len(not_killed)} not killed; wall time {wall_s / 60:.1f} min; bench/results/mutation.json")
    if unexplained:
        print(f"{len(unexplained)} not explained in {SURVIVORS_NOTE.relative_to(REPO_ROOT)} "
              "(listed in mutation.json), e.g.:")
        for name in unexplained[:10]:
            print(f"  {name}")
    if stale_names:
        print(f"{len(stale_names)} named in {SURVIVORS_NOTE.relative_to(REPO_ROOT)} are no survivors now (stale "
              "explanations, listed in mutation.json)")


if __name__ == "__main__":
    main()
