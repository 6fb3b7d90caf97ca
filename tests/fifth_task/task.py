"""The fault task's declaration: all the service needs to serve it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.core.limits_table import Limit
from app.tasks import Task
from tests.fifth_task.model import MODEL_CLASS
from tests.fifth_task.router import MAX_READINGS, router
from tests.fifth_task.v2 import V2


def limits(settings: Any) -> list[Limit]:
    return [Limit("fault", "readings per request", f"1-{MAX_READINGS}", "422 `too-many-instances`")]


TASK = Task("fault", router, MODEL_CLASS, v2=V2, limits=limits, training="tests.fifth_task.training",
            web=Path(__file__).parent / "web")
