"""Helpers shared by the unit tests: the committed model of a task, and an in-process app that
serves only that model (so a task's tests need no other task's artifact)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from app.core.config import Settings
from app.core.registry import version_key
from app.main import create_app

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = REPO_ROOT / "models"
# The real data sets (never copied into the repo): ../shared/data next to the checkout.
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


# Four grey levels, black to white: what the image-mode tests decode in every Pillow mode.
LEVELS = np.array([[0, 64], [128, 255]], dtype=np.uint8)


def sixteen_bit(mode: str, values: np.ndarray) -> Image.Image:
    """``values`` as a 16-bit Pillow image of ``mode`` (I;16, I;16L, I;16B or I;16N)."""
    byte_order = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I;16N": "=u2"}[mode]
    return Image.frombytes(mode, values.shape[::-1], values.astype(byte_order).tobytes())


def committed_version(task: str) -> Path:
    """The directory of the version the registry would serve for ``task`` (the latest)."""
    return max((p for p in (MODELS / task).iterdir() if p.is_dir()), key=lambda p: version_key(p.name))


@contextlib.contextmanager
def single_task_client(root: Path, task: str, **settings: object) -> Iterator[TestClient]:
    """A TestClient on an app whose models dir holds only ``task``'s committed version and whose
    prediction log is a SQLite file under ``root``; its admin endpoints open, as for local use;
    ``settings`` override the rest."""
    version = committed_version(task)
    (root / "models" / task).mkdir(parents=True)
    (root / "models" / task / version.name).symlink_to(version)
    values = {"models_dir": root / "models", "database_url": f"sqlite:///{root / 'log.db'}",
              "admin_open": True, **settings}
    with TestClient(create_app(Settings(**values))) as client:
        yield client


MALL = SHARED_DATA / "mall_customers" / "Mall_Customers.csv"


def mall_rows() -> list[list[float]]:
    """(annual income, spending score) of the 200 Mall customers, the clustering model's data."""
    import csv

    with open(MALL, newline="") as f:
        return [[float(r["Annual Income (k$)"]), float(r["Spending Score (1-100)"])] for r in csv.DictReader(f)]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Whether ``condition()`` became true within ``timeout`` (checked every ``interval``): for an
    event the test cannot be told of (a row written by a background flush)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def rows(url: str, sql: str, **params: object) -> list:
    """The rows ``sql`` reads from the database at ``url`` (the server's prediction log), on a
    connection of its own."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql), params).all())
    finally:
        engine.dispose()
