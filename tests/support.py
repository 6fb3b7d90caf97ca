"""Helpers shared by the unit and contract tests: the committed model of a task, an in-process app
that serves only that model (so a task's tests need no other task's artifact), the data the tests
draw on, the problem+json check, and the wait for an event the test cannot be told of."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.core.config import Settings
from app.core.places import CgroupMemory
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


def open_request():
    """A starlette Request (POST /) whose client never goes away: for tickets, gates and deadlines
    outside a server."""
    import asyncio

    from starlette.requests import Request

    async def receive() -> dict:  # the client never goes away
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    return Request({"type": "http", "method": "POST", "path": "/", "headers": [], "state": {}}, receive)


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


def photo_like(digit: np.ndarray, *, size: int = 300, scale: int = 6, at: tuple[int, int] = (20, 150),
               thicken: int = 9) -> Image.Image:
    """An MNIST digit as a phone photo of paper: ``size`` x ``size`` RGB, ``scale`` times larger,
    strokes thickened (``thicken``) and dark on off-white paper, off-centre (top-left at ``at``)."""
    from scipy import ndimage

    big = np.asarray(Image.fromarray(digit).resize((28 * scale, 28 * scale), Image.BICUBIC), dtype=np.float32)
    big = ndimage.maximum_filter(big, size=thicken)
    paper = np.full((size, size), 235.0, dtype=np.float32)  # off-white paper
    top, left = at
    window = paper[top:top + big.shape[0], left:left + big.shape[1]]
    window -= big[:window.shape[0], :window.shape[1]] * (215.0 / 255.0)  # ink ~20/255
    return Image.fromarray(np.clip(paper, 0, 255).astype(np.uint8), mode="L").convert("RGB")


PROBLEM = "application/problem+json"


def assert_problem(response, status: int, *, code: str | None = None, field: str | None = None) -> dict:
    """The problem+json body of ``response`` (an httpx or TestClient response), once checked: its
    status (the response's and the body's), its media type, its request id, and ``code`` and
    ``field`` when given."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM), response.headers["content-type"]
    body = response.json()
    assert body["status"] == status and body["request_id"], body
    if code is not None:
        assert body["code"] == code, body
    if field is not None:
        assert body["field"] == field, body
    return body


T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.05, *,
               what: str | None = None) -> T | Literal[False]:
    """What ``condition()`` returned once it was truthy (checked every ``interval`` for ``timeout``
    s): for an event the test cannot be told of (a row written by a background flush). At the
    deadline: False, or, when ``what`` names the event, the test fails saying so."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            if what is not None:
                pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
            return False
        time.sleep(interval)
    return value


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


def fake_cgroups(root: Path) -> tuple[CgroupMemory, CgroupMemory]:
    """cgroup v2 and v1 memory files under ``root`` (none written yet), in the order the service reads them."""
    return (CgroupMemory(root / "memory.max", root / "memory.current", root / "memory.stat", "inactive_file"),
            CgroupMemory(root / "memory.limit_in_bytes", root / "memory.usage_in_bytes", root / "v1.memory.stat",
                         "total_inactive_file"))
