"""The task slices. Each ``app/tasks/<task>/`` exports ``router`` (router.py) and ``MODEL_CLASS``
(model.py). A slice that fails to import is reported as a not-ready model rather than taking the
whole service down."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

from fastapi import APIRouter

from app.core.registry import ServedModel

TASK_NAMES = ("clustering", "digits", "segmentation", "emotion")

log = logging.getLogger("app.tasks")


@dataclass
class TaskSlice:
    name: str
    router: APIRouter | None
    model_class: type[ServedModel] | None
    import_error: str | None = None


def load_slices() -> list[TaskSlice]:
    slices = []
    for name in TASK_NAMES:
        try:
            router = importlib.import_module(f"app.tasks.{name}.router").router
            model_class = importlib.import_module(f"app.tasks.{name}.model").MODEL_CLASS
            slices.append(TaskSlice(name, router, model_class))
        except Exception as exc:  # logged and shown by /health/ready; the other tasks still serve
            log.exception("task slice failed to import", extra={"model": name})
            slices.append(TaskSlice(name, None, None, f"{type(exc).__name__}: {exc}"))
    return slices
