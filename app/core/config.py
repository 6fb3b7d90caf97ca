"""Settings from the environment (pydantic-settings). Every knob is documented in docs/configuration.md."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.core.limits import BIG_JOB_BYTES, DYNO_MIB_PER_BIG_JOB, GATES, JOB_LEASE_S

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
    idle_threads: bool = Field(False, description="with one LiteRT thread, a model that gains from more "
                               "cores (segmentation) also gets threads at idle priority: a lone request "
                               "runs faster, but beside other work the model's throughput varies and "
                               "can halve")
    spare_cpu: bool = Field(True, description="a big job (a 2048 x 2048 segmentation) also runs its "
                            "tiles on a helper thread with a second interpreter while another CPU is "
                            "idle; the helper leaves once that CPU is busy")
    database_url: str = f"sqlite:///{REPO_ROOT / 'var' / 'predictions.db'}"
    log_level: str = "INFO"
    max_upload_mb: float = Field(10.0, gt=0)
    max_json_mb: float = Field(8.0, gt=0, description="a JSON request body (v1 instances, V2 tensors)")
    max_image_pixels: int = Field(4096 * 4096, gt=0)
    max_audio_seconds: float = Field(60.0, gt=0)
    request_timeout_s: float = Field(25.0, gt=0, description="deadline of one request, queueing "
                                     "included; under gunicorn's timeout and Heroku's 30 s")
    heavy_concurrency: int = Field(GATES["heavy"][0], ge=1, le=16, description="segmentations, fits and palettes "
                                   "running at once per worker")
    heavy_queue: int = Field(GATES["heavy"][1], ge=0, le=256, description="heavy requests waiting per worker")
    big_jobs_per_dyno: int | None = Field(None, ge=0, le=256, description=f"requests with a body of "
                                          f"{BIG_JOB_BYTES // 1048576} MiB or more running at once, all "
                                          "workers together (0: no bound); unset: one per "
                                          f"{DYNO_MIB_PER_BIG_JOB} MiB of the memory limit, none without one")
    cors_origins: Annotated[list[str], NoDecode] = []
    task_modules: Annotated[list[str], NoDecode] = Field(
        ["app.tasks.clustering", "app.tasks.digits", "app.tasks.segmentation", "app.tasks.emotion"],
        description="the task packages served, comma-separated; each has a task.py declaring TASK")
    admin_token: SecretStr | None = None
    admin_open: bool = Field(False, description="with no ADMIN_TOKEN, let anyone read the monitoring "
                             "and admin endpoints (local use only)")
    forwarded_allow_ips: str = Field("127.0.0.1", description="peers whose X-Forwarded-For/-Proto are "
                                     "believed: addresses or networks, or * for any (Heroku)")
    request_id_secret: SecretStr | None = Field(None, description="tags request ids; the same on every "
                                                "dyno so each knows the others' fresh ids")
    api_keys: Annotated[list[str], NoDecode] = Field([], description="SHA-256 digests of API keys")
    rate_limit: str | None = Field(None, description="e.g. 60/minute, per API key or client IP")
    redis_url: str | None = Field(None, description="shared rate-limit counters (Heroku Key-Value Store)")
    redis_tls_verify: bool = Field(True, description="verify a rediss:// server's certificate (false for "
                                   "Heroku Key-Value Store, whose certificate is self-signed)")
    store_inputs: Literal["never", "consented"] = Field(
        "consented", description="keep the raw inputs of requests sent with X-Data-Consent: granted")
    input_retention_days: float = Field(30.0, gt=0, description="stored inputs are deleted after this")
    log_retention_days: float = Field(90.0, gt=0, description="prediction-log rows (summaries, shadow "
                                      "predictions, feedback) are deleted after this")
    idempotency_ttl_h: float = Field(24.0, gt=0, description="how long an Idempotency-Key and its stored "
                                     "answer are kept")
    jobs: Literal["off", "embedded", "worker"] = Field(
        "off", description="Prefer: respond-async: off (answered synchronously), embedded (gunicorn starts "
        "one job worker beside the web workers) or worker (separate `worker` processes run the jobs)")
    jobs_queue_path: Path = Field(REPO_ROOT / "var" / "jobs-queue.db", description="the job queue's SQLite "
                                  "file when REDIS_URL is unset (with REDIS_URL the queue is in Redis)")
    job_timeout_s: float = Field(600.0, gt=0, description="deadline of one job in a job worker")
    job_result_ttl_h: float = Field(24.0, gt=0, description="how long a job, its input and its result are kept")
    job_lease_s: float = Field(JOB_LEASE_S, gt=0, description="a job whose worker died is run again after this")
    log_buffer_size: int = Field(10_000, ge=1)
    log_durable: bool = Field(False, description="answer a prediction only once its log rows are written "
                              "(nothing answered is lost if the process dies; each answer waits for a write)")
    log_flush_interval_s: float = Field(0.5, gt=0)
    drift_window: int = Field(500, ge=1, description="default window: most recent N predictions")
    drift_min_samples: int = Field(30, ge=1)
    drift_refresh_s: float = Field(60.0, gt=0, description="how often each worker refreshes drift gauges")
    metrics_push_url: SecretStr | None = Field(None, description="Prometheus Pushgateway each dyno pushes "
                                               "its metrics to (app/monitoring/push.py); unset: none")
    metrics_push_job: str = Field("ml-inference-service", min_length=1, description="the pushed job label")
    metrics_push_interval_s: float = Field(15.0, ge=1, description="how often each dyno pushes")

    @field_validator("cors_origins", "api_keys", "task_modules", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("store_inputs", mode="before")
    @classmethod
    def _store_inputs_words(cls, value: object) -> object:
        # Boolean words are accepted too: "false" keeps nothing, "true" means "only with consent".
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

    @property
    def max_json_bytes(self) -> int:
        return min(int(self.max_json_mb * 1024 * 1024), self.max_upload_bytes)

    @property
    def admin_closed(self) -> bool:
        """No admin token and no explicit opening: the admin endpoints answer 401 to everyone."""
        token = self.admin_token.get_secret_value() if self.admin_token is not None else ""
        return not token and not self.admin_open


@lru_cache
def get_settings() -> Settings:
    return Settings()
