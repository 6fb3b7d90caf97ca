"""The segmentation task: an electron-microscopy image to its membrane mask."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.core.limits import SEGMENTATION_MAX_INSTANCES, SEGMENTATION_MAX_SIDE
from app.core.limits_table import Limit
from app.tasks import Task
from app.tasks.segmentation.model import MODEL_CLASS
from app.tasks.segmentation.router import router
from app.tasks.segmentation.v2 import V2


def limits(settings: Any) -> list[Limit]:
    return [
        Limit("segmentation", "images per request", f"1 (png, overlay), 1-{SEGMENTATION_MAX_INSTANCES} (json)",
              "422 `too-many-instances`"),
        Limit("segmentation", "image side", f"<= {SEGMENTATION_MAX_SIDE} px", "413 `image-too-large`"),
    ]


TASK = Task("segmentation", router, MODEL_CLASS, v2=V2, limits=limits, media="images",
            training="training.segmentation", web=Path(__file__).parent / "web")
