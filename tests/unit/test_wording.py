"""The documentation and the code describe the product as it is: no issue numbers, goals or history
of what was tried (those belong in commit messages and bench/results/). Scans README.md,
docs/**/*.md and the .py files of app/, training/ and bench/."""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# Each pattern names a development-log habit; matched case-insensitively unless it says otherwise.
DEVELOPMENT_LOG = {
    "an issue number": re.compile(r"\b[Ii]ssues? #?\d+\b"),
    "a pull-request or issue reference": re.compile(r"\(#\d+\)"),
    "a numbered goal": re.compile(r"\bgoal \d+\b", re.I),
    "whether a goal is met": re.compile(r"\b(?:the goal (?:is|was)|goal (?:\d+ )?(?:\([^)]*\) )?is met|now meets)\b", re.I),
    "the state before a change": re.compile(r"\b(?:before this (?:change|work|rule)|as of this change|"
                                            r"the code before|was improved from)\b", re.I),
    "what something used to be": re.compile(r"\b(?:previously|used to be)\b", re.I),
    "the history of the work": re.compile(r"\b(?:what changed, in|(?:this|last|previous) session|"
                                          r"tried and dropped|was the previous attempt)\b", re.I),
}


def scanned_files() -> list[Path]:
    files = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]
    for folder in ("app", "training", "bench"):
        files += sorted((REPO_ROOT / folder).rglob("*.py"))
    return files


def development_log_wording(text: str) -> list[str]:
    """Each line of ``text`` that reads like a development log, with what it does."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for what, pattern in DEVELOPMENT_LOG.items():
            match = pattern.search(line)
            if match:
                found.append(f"line {number}: {what}: {match.group(0)!r}")
    return found


def test_the_docs_and_the_code_read_as_the_product_today():
    offending = {str(path.relative_to(REPO_ROOT)): hits for path in scanned_files()
                 if (hits := development_log_wording(path.read_text(encoding="utf-8")))}
    assert offending == {}


def test_the_check_finds_issue_numbers_goals_and_history():
    log = ("### Speed (issue 18)\n- **Goal 1 (0.65 of the floor) is met.**\nSee #12 and (#34).\n"
           "What changed, in three sessions:\nBefore this change it previously took 2 s.\n")
    found = " ".join(development_log_wording(log))
    for what in ("an issue number", "a numbered goal", "whether a goal is met", "a pull-request or issue reference",
                 "the history of the work", "the state before a change", "what something used to be"):
        assert what in found


def test_the_check_leaves_ordinary_prose_alone():
    prose = ("The request's deadline is the target of every timer. A digit was classified; the label "
             "was replaced. Resample to target_sr. colour #222. issue a request id.\n")
    assert development_log_wording(prose) == []
