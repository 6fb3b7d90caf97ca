"""Helpers shared by the unit tests: the committed model of a task, and an in-process app that
serves only that model (so a task's tests need no other task's artifact)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from fastapi.testclient import TestClient

from app.core.config import Settings
from app.core.registry import version_key
from app.main import create_app

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = REPO_ROOT / "models"
# The real data sets (never copied into the repo): ../shared/data next to the checkout.
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def committed_version(task: str) -> Path:
    """The directory of the version the registry would serve for ``task`` (the latest)."""
    return max((p for p in (MODELS / task).iterdir() if p.is_dir()), key=lambda p: version_key(p.name))


@contextlib.contextmanager
def single_task_client(root: Path, task: str) -> Iterator[TestClient]:
    """A TestClient on an app whose models dir holds only ``task``'s committed version and whose
    prediction log is a SQLite file under ``root``."""
    version = committed_version(task)
    (root / "models" / task).mkdir(parents=True)
    (root / "models" / task / version.name).symlink_to(version)
    settings = Settings(models_dir=root / "models", database_url=f"sqlite:///{root / 'log.db'}")
    with TestClient(create_app(settings)) as client:
        yield client


MALL = SHARED_DATA / "mall_customers" / "Mall_Customers.csv"


def mall_rows() -> list[list[float]]:
    """(annual income, spending score) of the 200 Mall customers, the clustering model's data."""
    import csv

    with open(MALL, newline="") as f:
        return [[float(r["Annual Income (k$)"]), float(r["Spending Score (1-100)"])] for r in csv.DictReader(f)]
