"""bench/results/mutation.json describes the code as it is: each mutated module's recorded sha256 is
the module's now (``python -m bench.mutation`` re-runs the changed ones)."""

from __future__ import annotations

import hashlib
import json

from bench.common import REPO_ROOT, RESULTS_DIR
from bench.mutation import SCOPE


def test_every_module_in_scope_was_mutated_as_it_is_now():
    results = json.loads((RESULTS_DIR / "mutation.json").read_text())
    assert sorted(results["modules"]) == sorted(SCOPE)
    stale = [path for path, row in results["modules"].items()
             if row.get("sha256") != hashlib.sha256((REPO_ROOT / path).read_bytes()).hexdigest()]
    assert stale == [], f"changed since their mutation run (python -m bench.mutation): {stale}"
