"""Settings from the environment (pydantic-settings). Every knob is documented in README.md."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.core.limits import GATES

REPO_ROOT = Path(__file__).resolve().parents[2]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", protected_namespaces=())

    port: int = 8000
    web_concurrency: int = Field(2, ge=1, le=64)
    models_dir: Path = REPO_ROOT / "models"
    # Pin versions per task, e.g. MODEL_VERSIONS='{"digits": "1.0.1"}'; else the latest.
    model_versions: dict[str, str] = {}
    # A second version per task predicting every request after its response, logged as shadow.
    shadow_versions: dict[str, str] = {}
    inference_threads: int = Field(1, ge=1, le=64, description="LiteRT threads per interpreter")
    database_url: str = f"sqlite:///{REPO_ROOT / 'var' / 'predictions.db'}"
    log_level: str = "INFO"
    max_upload_mb: float = Field(10.0, gt=0)
    max_image_pixels: int = Field(4096 * 4096, gt=0)
    max_audio_seconds: float = Field(60.0, gt=0)
    request_timeout_s: float = Field(25.0, gt=0, description="deadline of one request, queueing "
                                     "included; under gunicorn's timeout and Heroku's 30 s")
    heavy_concurrency: int = Field(GATES["heavy"][0], ge=1, le=16, description="segmentations, fits and palettes "
                                   "running at once per worker")
    heavy_queue: int = Field(GATES["heavy"][1], ge=0, le=256, description="heavy requests waiting per worker")
    cors_origins: Annotated[list[str], NoDecode] = []
    admin_token: SecretStr | None = None
    api_keys: Annotated[list[str], NoDecode] = Field([], description="SHA-256 digests of API keys")
    rate_limit: str | None = Field(None, description="e.g. 60/minute, per API key or client IP")
    redis_url: str | None = Field(None, description="shared rate-limit counters (Heroku Key-Value Store)")
    store_inputs: Literal["never", "consented"] = Field(
        "consented", description="keep the raw inputs of requests sent with X-Data-Consent: granted")
    input_retention_days: float = Field(30.0, gt=0, description="stored inputs are deleted after this")
    log_retention_days: float = Field(90.0, gt=0, description="prediction-log rows (summaries, shadow "
                                      "predictions, feedback) are deleted after this")
    log_buffer_size: int = Field(10_000, ge=1)
    log_flush_interval_s: float = Field(0.5, gt=0)
    drift_window: int = Field(500, ge=1, description="default window: most recent N predictions")
    drift_min_samples: int = Field(30, ge=1)
    drift_refresh_s: float = Field(60.0, gt=0, description="how often each worker refreshes drift gauges")

    @field_validator("cors_origins", "api_keys", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("store_inputs", mode="before")
    @classmethod
    def _store_inputs_words(cls, value: object) -> object:
        # The switch was a boolean: "false" keeps nothing; "true" now means "only with consent".
        if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
            return "never"
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
            return "consented"
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _heroku_scheme(cls, value: str) -> str:
        # Heroku still hands out postgres://; SQLAlchemy 2 wants postgresql+<driver>://.
        if value.startswith("postgres://"):
            value = "postgresql://" + value[len("postgres://"):]
        if value.startswith("postgresql://"):
            value = "postgresql+psycopg://" + value[len("postgresql://"):]
        return value

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


@lru_cache
def get_settings() -> Settings:
    return Settings()
