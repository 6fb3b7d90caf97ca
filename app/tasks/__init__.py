"""Tasks. Each package ``app/tasks/<task>/`` declares everything about its task in ``task.py``, as
``TASK``: its v1 endpoints (registered on its router), its model class, its V2 model, its rows of the
limits table, the kind of input it takes, the module of its evaluation gate and its web panel. The
app serves the packages named in ``TASK_MODULES`` (the four here by default; a package anywhere on
the path works the same way). A task whose code
fails to import is reported as a model that is not ready rather than taking the service down."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter

from app.core.limits_table import Limit
from app.core.registry import ServedModel
from app.openinference.models import V2Model

log = logging.getLogger("app.tasks")


def _no_limits(settings: Any) -> list[Limit]:
    return []


@dataclass(frozen=True)
class Task:
    name: str  # the registry slot, models/<name>/, the prediction log's model name
    router: APIRouter  # the v1 endpoints, each added with app.core.pipeline.register
    model_class: type[ServedModel] | None  # None: endpoints with no trained model only
    v2: V2Model | None = None  # the task's tensors in the Open Inference Protocol
    limits: Callable[[Any], list[Limit]] = _no_limits  # its rows of the limits table, for settings
    media: str = ""  # "images" or "audio": the limits of that kind of input apply to it too
    training: str = ""  # the module whose COMPARISON the evaluation gate (training.compare) uses
    web: Path | None = None  # its panel on the web page: panel.html and panel.js (app/web/router.py)


@dataclass
class TaskSlice:
    """A task as loaded: its declaration, or why its code could not be imported."""

    name: str
    task: Task | None = None
    import_error: str | None = None

    @property
    def router(self) -> APIRouter | None:
        return self.task.router if self.task is not None else None

    @property
    def model_class(self) -> type[ServedModel] | None:
        return self.task.model_class if self.task is not None else None


def load_slices(modules: list[str]) -> list[TaskSlice]:
    """``TASK`` from each package's ``task.py``; a package that fails to import is reported."""
    slices = []
    for module in modules:
        name = module.rsplit(".", 1)[-1]
        try:
            task = importlib.import_module(f"{module}.task").TASK
            slices.append(TaskSlice(task.name, task))
        except Exception as exc:  # logged and shown by /health/ready; the other tasks still serve
            log.exception("task failed to import", extra={"model": name})
            slices.append(TaskSlice(name, None, f"{type(exc).__name__}: {exc}"))
    return slices


def tasks_of(slices: list[TaskSlice]) -> list[Task]:
    return [s.task for s in slices if s.task is not None]
