"""The model registry: latest-or-pinned version, one broken model never takes the others down."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from app.core.config import Settings
from app.core.errors import ProblemError
from app.core.registry import ModelRegistry, ServedModel, version_key


class EchoModel(ServedModel):
    task = "echo"

    def _load_artifacts(self) -> None:
        self.weights = np.load(self.path / "weights.npy")

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return batch * self.weights


class OtherModel(EchoModel):
    task = "other"


def make_version(root: Path, task: str, version: str, *, weights: float | None = 2.0) -> Path:
    path = root / task / version
    path.mkdir(parents=True)
    (path / "metadata.json").write_text(json.dumps({"name": task, "version": version,
                                                    "metrics": {"accuracy": 0.9}}))
    if weights is not None:
        np.save(path / "weights.npy", np.array(weights))
    return path


def test_version_key_orders_dates_and_numbers_naturally():
    versions = ["1.10.0", "1.9.0", "2026.11.25.0912", "2026.11.3.1200", "1.2.0"]
    assert sorted(versions, key=version_key) == [
        "1.2.0", "1.9.0", "1.10.0", "2026.11.3.1200", "2026.11.25.0912"]


def test_loads_latest_version_by_default(tmp_path):
    make_version(tmp_path, "echo", "1.2.0", weights=1.0)
    make_version(tmp_path, "echo", "1.10.0", weights=3.0)
    registry = ModelRegistry(Settings(models_dir=tmp_path), {"echo": EchoModel})
    registry.load_all()
    model = registry.get("echo")
    assert model.version == "1.10.0"
    assert model.predict(np.array([2.0])).tolist() == [6.0]
    assert registry.ready


def test_pinned_version_wins_over_latest(tmp_path):
    make_version(tmp_path, "echo", "1.2.0", weights=1.0)
    make_version(tmp_path, "echo", "1.10.0", weights=3.0)
    registry = ModelRegistry(Settings(models_dir=tmp_path, model_versions={"echo": "1.2.0"}),
                             {"echo": EchoModel})
    registry.load_all()
    assert registry.get("echo").version == "1.2.0"


def test_broken_artifact_fails_only_that_model(tmp_path):
    make_version(tmp_path, "echo", "1.0.0", weights=None)  # weights.npy missing
    make_version(tmp_path, "other", "1.0.0")
    registry = ModelRegistry(Settings(models_dir=tmp_path), {"echo": EchoModel, "other": OtherModel})
    registry.load_all()
    status = registry.status()
    assert status["echo"]["ready"] is False
    assert "weights.npy" in status["echo"]["error"]
    assert status["other"]["ready"] is True
    assert not registry.ready
    with pytest.raises(ProblemError) as excinfo:
        registry.get("echo")
    assert excinfo.value.status == 503


def test_missing_task_directory_and_unknown_pin_are_reported(tmp_path):
    make_version(tmp_path, "other", "1.0.0")
    registry = ModelRegistry(Settings(models_dir=tmp_path, model_versions={"other": "9.9.9"}),
                             {"echo": EchoModel, "other": OtherModel})
    registry.load_all()
    assert "no model versions" in registry.status()["echo"]["error"]
    assert "'9.9.9' not found" in registry.status()["other"]["error"]


def test_heroku_postgres_scheme_is_accepted():
    settings = Settings(database_url="postgres://u:p@db.example:5432/prod")
    assert settings.database_url == "postgresql+psycopg://u:p@db.example:5432/prod"
