"""Model registry: every ``models/<task>/<version>/`` behind one small interface.

A task's model class subclasses :class:`ServedModel` (as Seldon MLServer's ``MLModel``: ``load``,
``predict``, ``metadata``). At start-up the registry loads, for every task with a registered class,
the version pinned in ``MODEL_VERSIONS`` or else the latest one. A broken or missing artifact fails
that task alone: it is logged, listed as not ready by ``/health/ready`` and ``/v1/models``, and its
routes answer 503, while the other tasks serve.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
from fastapi import Request

from app.core.config import Settings
from app.core.errors import ProblemError
from app.core.execution import big_job
from app.core.runtime import TFLiteRunner, usable_cpus
from app.core.spare import room_for_a_helper

log = logging.getLogger("app.registry")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~])/(?:[^\s/'\"():]+/)*")


def redact_paths(text: str, models_dir: Path) -> str:
    """``text`` with the server's file-system layout taken out: the models directory becomes
    ``models/`` and any other absolute directory is dropped (clients see versions, not paths)."""
    text = text.replace(str(Path(models_dir).resolve()), "models").replace(str(models_dir), "models")
    return _ABSOLUTE_PATH.sub("", text)


class ServedModel:
    """A loaded model version. Subclasses set ``task`` and implement ``_load_artifacts``/``predict``."""

    task: ClassVar[str] = ""
    # Threads at idle priority that this model's interpreter gains from (``app.core.runtime``).
    idle_threads: ClassVar[int] = 0

    def __init__(self, path: Path, metadata: dict[str, Any], reference: dict[str, Any] | None,
                 settings: Settings) -> None:
        self.path = path
        self.metadata = metadata
        self.reference = reference
        self.settings = settings

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", self.path.name))

    @classmethod
    def load(cls, path: Path, settings: Settings) -> Self:
        metadata_path = path / "metadata.json"
        if not metadata_path.is_file():
            raise FileNotFoundError(f"{metadata_path} is missing")
        metadata = json.loads(metadata_path.read_text())
        metadata.setdefault("version", path.name)
        reference_path = path / "reference.json"
        reference = json.loads(reference_path.read_text()) if reference_path.is_file() else None
        model = cls(path, metadata, reference, settings)
        model._load_artifacts()
        model.warm_up()
        return model

    def _load_artifacts(self) -> None:
        """Load the model file(s) under ``self.path``; raise if anything is missing or broken."""

    def runner_threads(self) -> dict[str, int]:
        """The LiteRT threads of this model's interpreter: ``INFERENCE_THREADS`` at normal priority
        and, with one of those and ``IDLE_THREADS`` on (off by default), up to ``idle_threads`` at
        idle priority, as many as the other CPUs this process may use."""
        threads = self.settings.inference_threads
        idle = 0
        if threads == 1 and self.settings.idle_threads:
            idle = max(0, min(self.idle_threads, usable_cpus() - 1))
        return {"num_threads": threads, "idle_threads": idle}

    def spare_runner(self) -> Callable[[], Callable[[np.ndarray], np.ndarray]] | None:
        """For a big job (:func:`~app.core.execution.big_job`) whose steps are calls of this model:
        a function that makes a second runner of the same ``.tflite`` for a helper thread
        (:mod:`app.core.spare`), where ``SPARE_CPU`` is on, the interpreter runs on one thread with
        none at idle priority, this process may use another CPU and its memory limit, if any, leaves
        room; otherwise None. The helper's runner answers as ``predict`` does only where ``predict``
        is its runner's ``run`` (after checks): a model that changes the answer after the call does
        not offer this."""
        runner = getattr(self, "runner", None)
        if (runner is None or not self.settings.spare_cpu or not big_job() or runner.threads != 1
                or runner.idle_threads or usable_cpus() < 2 or not room_for_a_helper()):
            return None
        return lambda: TFLiteRunner(runner.path).run

    def warm_up(self) -> None:
        """Run one dummy prediction so the first request pays no allocation cost (optional)."""

    def predict(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # ---- on-device use: the artifact an app can run itself, and a parity set to check its runtime

    PARITY_SAMPLES: ClassVar[int] = 4
    PARITY_SEED: ClassVar[int] = 20261205

    def artifact(self) -> Path | None:
        """The file an app can run on the device: the ``.tflite`` its LiteRT runner loaded (a model
        with another kind of artifact overrides this); None when there is none."""
        runner = getattr(self, "runner", None)
        return Path(runner.path) if runner is not None else None

    def artifact_media_type(self) -> str:
        return "application/octet-stream"

    @functools.cached_property
    def artifact_sha256(self) -> str | None:
        path = self.artifact()
        return hashlib.sha256(path.read_bytes()).hexdigest() if path is not None else None

    def preprocessing(self) -> dict[str, Any]:
        """What an app must do to its input before the artifact sees it (the task says; by default
        the input spec of the model's metadata and where the shared code lives)."""
        return {"input": self.metadata.get("input"), "code": f"app/tasks/{self.task}/preprocess.py"}

    def parity_inputs(self) -> list[np.ndarray]:
        """A few inputs in the artifact's own input space, the same every time (seeded): uniform in
        [0, 1] for a LiteRT model, one sample per call as an app makes them."""
        runner = getattr(self, "runner", None)
        if runner is None:
            return []
        rng = np.random.default_rng(self.PARITY_SEED)
        shape = [1 if d < 0 else d for d in runner.input_shape]
        shape[0] = 1
        return [rng.random(shape, dtype=np.float32) for _ in range(self.PARITY_SAMPLES)]

    def parity_outputs(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """What the server's runtime answers for ``inputs`` (the artifact's raw output)."""
        runner = getattr(self, "runner", None)
        return [runner.run(x) for x in inputs] if runner is not None else []

    def on_device(self) -> dict[str, Any] | None:
        """What ``GET /v1/models/{name}`` says an app needs to run this model itself."""
        path = self.artifact()
        if path is None:
            return None
        return {"artifact": {"url": f"/v1/models/{self.task}/artifact", "file": path.name,
                             "sha256": self.artifact_sha256, "bytes": path.stat().st_size,
                             "media_type": self.artifact_media_type(),
                             "runtime": "LiteRT (TensorFlow Lite)" if path.suffix == ".tflite" else "JSON"},
                "parity": f"/v1/models/{self.task}/parity", "preprocessing": self.preprocessing(),
                "output": self.metadata.get("output")}

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/models`` shows: name, version, task, specs, training metrics, created."""
        md = self.metadata
        return {
            "name": md.get("name", self.task),
            "task": self.task,
            "version": self.version,
            "created": md.get("created"),
            "description": md.get("description"),
            "input": md.get("input"),
            "output": md.get("output"),
            "labels": md.get("labels"),
            "metrics": md.get("metrics"),
            "card": md.get("card"),  # what the model is for: languages, data, licence, held-out figures
            "has_reference": self.reference is not None,
        }


@dataclass
class ModelSlot:
    task: str
    version: str | None = None
    path: Path | None = None
    model: ServedModel | None = None
    error: str | None = None
    load_seconds: float | None = None
    available_versions: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.model is not None


def version_key(version: str) -> tuple[Any, ...]:
    """Natural sort key: ``2026.11.25.0912`` > ``2026.11.3.1200``, ``10`` > ``9``."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.\-_+]", version))


class ModelRegistry:
    def __init__(self, settings: Settings, model_classes: Mapping[str, type[ServedModel]]) -> None:
        self.settings = settings
        self.model_classes = dict(model_classes)
        self.slots: dict[str, ModelSlot] = {task: ModelSlot(task) for task in self.model_classes}
        self.shadows: dict[str, ModelSlot] = {}  # SHADOW_VERSIONS: task -> the shadow version's slot

    def load_all(self) -> None:
        for task in self.model_classes:
            self.slots[task] = self._load(task)
        for task, version in self.settings.shadow_versions.items():
            if task not in self.model_classes:
                log.error("shadow version of an unknown task ignored", extra={"model": task, "version": version})
                continue
            self.shadows[task] = self._load(task, version, role="shadow")

    def _load(self, task: str, wanted: str | None = None, *, role: str = "primary") -> ModelSlot:
        slot = ModelSlot(task)
        task_dir = Path(self.settings.models_dir) / task
        versions = sorted((p.name for p in task_dir.iterdir() if p.is_dir()), key=version_key) \
            if task_dir.is_dir() else []
        slot.available_versions = versions
        pinned = wanted if role == "shadow" else self.settings.model_versions.get(task)
        if pinned is not None and pinned not in versions:
            slot.error = f"pinned version {pinned!r} not found in {task_dir}"
        elif not versions:
            slot.error = f"no model versions under {task_dir}"
        else:
            slot.version = pinned or versions[-1]
            slot.path = task_dir / slot.version
            started = time.perf_counter()
            try:
                slot.model = self.model_classes[task].load(slot.path, self.settings)
            except Exception as exc:  # a broken artifact must not take the other models down
                slot.error = f"{type(exc).__name__}: {exc}"
            slot.load_seconds = round(time.perf_counter() - started, 3)
        if slot.error:
            log.error("model not ready", extra={"model": task, "version": slot.version, "role": role,
                                                "error": slot.error})
            slot.error = redact_paths(slot.error, Path(self.settings.models_dir))
        else:
            log.info("model loaded", extra={"model": task, "version": slot.version, "role": role,
                                            "load_s": slot.load_seconds})
        return slot

    def shadow(self, task: str) -> ServedModel | None:
        """The loaded shadow version of ``task``, if ``SHADOW_VERSIONS`` names one."""
        slot = self.shadows.get(task)
        return slot.model if slot is not None else None

    def versions(self, task: str) -> dict[str, Any]:
        """Which version of ``task`` is primary, which shadow, which could be (``GET /v1/models``)."""
        slot = self.slots[task]
        shadow = self.shadows.get(task)
        return {"primary": slot.version, "shadow": shadow.version if shadow is not None else None,
                "shadow_ready": shadow.ready if shadow is not None else None,
                "shadow_error": shadow.error if shadow is not None else None,
                "available": list(slot.available_versions),
                "pinned": task in self.settings.model_versions}

    def get(self, task: str) -> ServedModel:
        slot = self.slots.get(task)
        if slot is None or slot.model is None:
            reason = slot.error if slot is not None else "unknown model"
            raise ProblemError(503, "model-unavailable",
                               f"The {task} model is not loaded ({reason}).",
                               headers={"Retry-After": "30"})
        return slot.model

    def models(self) -> list[ServedModel]:
        return [s.model for s in self.slots.values() if s.model is not None]

    @property
    def ready(self) -> bool:
        return all(slot.ready for slot in self.slots.values())

    def status(self) -> dict[str, dict[str, Any]]:
        return {task: {"ready": s.ready, "version": s.version, "error": s.error,
                       "load_seconds": s.load_seconds}
                for task, s in self.slots.items()}


def model_dependency(task: str) -> Callable[[Request], ServedModel]:
    """FastAPI dependency: the loaded model for ``task`` (503 if not ready), noted for the access log."""

    def dependency(request: Request) -> ServedModel:
        model = request.app.state.registry.get(task)
        request.state.model_name = task
        request.state.model_version = model.version
        return model

    dependency.__name__ = f"{task}_model"
    return dependency
