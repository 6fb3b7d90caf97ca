"""The emotion task: a speech clip to the emotion it expresses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.core.limits import EMOTION_MAX_INSTANCES
from app.core.limits_table import Limit
from app.tasks import Task
from app.tasks.emotion.model import MODEL_CLASS
from app.tasks.emotion.router import router
from app.tasks.emotion.v2 import V2


def limits(settings: Any) -> list[Limit]:
    return [Limit("emotion", "clips per request", f"1-{EMOTION_MAX_INSTANCES}", "422 `too-many-instances`")]


TASK = Task("emotion", router, MODEL_CLASS, v2=V2, limits=limits, media="audio",
            training="training.emotion", web=Path(__file__).parent / "web")
