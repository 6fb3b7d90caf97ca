"""The digits task: a handwritten digit in an image, or 28 x 28 pixels, to one of 0-9."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.core.limits import DIGITS_MAX_INSTANCES
from app.core.limits_table import Limit
from app.tasks import Task
from app.tasks.digits.model import MODEL_CLASS
from app.tasks.digits.router import router
from app.tasks.digits.v2 import V2


def limits(settings: Any) -> list[Limit]:
    return [Limit("digits", "images or instances per request", f"1-{DIGITS_MAX_INSTANCES}",
                  "422 `too-many-instances`")]


TASK = Task("digits", router, MODEL_CLASS, v2=V2, limits=limits, media="images",
            training="training.digits", web=Path(__file__).parent / "web")
