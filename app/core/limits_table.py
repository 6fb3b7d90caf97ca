"""The table of limits in force: what ``GET /v1/models`` shows per task and the README shows whole.

The service's own rows are here; each task adds its rows in its declaration (``app/tasks/<task>/
task.py``). ``python -m app.limits`` prints the README's table; a test checks that the README shows
exactly that table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app.core.config import Settings
from app.core.limits import (
    AUDIO_SAMPLE_RATES,
    BIG_JOB_BYTES,
    BODY_BUFFER_BYTES,
    DB_CALL_TIMEOUT_S,
    DB_QUEUE,
    DB_THREADS,
    DYNO_MIB_PER_BIG_JOB,
    FEEDBACK_MAX_WAITERS,
    IDEMPOTENCY_KEY_MAX_CHARS,
    GATES,
    HEADER_TIMEOUT_S,
    IDEMPOTENCY_MAX_STORED_BYTES,
    JOB_MAX_AUDIO_SECONDS,
    JOB_MAX_PARTS,
    JOB_MAX_PENDING,
    JOB_MAX_PENDING_BYTES,
    JOB_MAX_PENDING_PER_CLIENT,
    JOB_MAX_TRIES,
    LOG_BUFFER_INPUT_BYTES,
    LOG_BUFFER_ROW_BYTES,
    MAX_AUDIO_CHANNELS,
    MAX_CONNECTIONS,
    MAX_ECHOED_ID,
    MAX_IN_FLIGHT,
    MAX_JPEG_SCANS,
    MAX_REQUEST_PIXELS,
    MIN_AUDIO_SECONDS,
    QUEUE_MAX_WAIT_S,
    RATE_LIMIT_KEYS,
    SHADOW_QUEUE,
    SHADOW_QUEUE_BYTES,
    STORED_INPUT_MAX_BYTES,
    UPLOADS_IN_PROGRESS,
    UPLOADS_PER_CLIENT,
    WRITE_TIMEOUT_S,
)


@dataclass(frozen=True)
class Limit:
    applies_to: str
    what: str
    value: str
    refusal: str  # status and problem code beyond it
    setting: str = ""


def limits(settings: Settings, task_rows: Sequence[Limit] = ()) -> list[Limit]:
    """The limits in force with ``settings``, in the order the README lists them: the service's,
    each task's own (``task_rows``, from each task's declaration) after the kinds of input."""
    mib = settings.max_upload_mb
    light, audio, heavy = GATES["light"], GATES["audio"], GATES["heavy"]
    return [
        Limit("every request", "request body", f"{mib:g} MiB", "413 `payload-too-large`",
              "`MAX_UPLOAD_MB`"),
        Limit("every request", "JSON body (v1 instances, V2 tensors in JSON)",
              f"{settings.max_json_bytes / 1048576:g} MiB", "413 `json-too-large`", "`MAX_JSON_MB`"),
        Limit("every request", "values in a JSON body (counted before parsing)",
              "the endpoint's instances x values per instance", "413 `too-many-values`"),
        Limit("every request", "time to answer, upload and queueing included; work stops at the deadline",
              f"{settings.request_timeout_s:g} s",
              "503 `deadline-exceeded` (408 `upload-timeout` while the body is still arriving)",
              "`REQUEST_TIMEOUT_S`"),
        Limit("every prediction", "requests per API key (or per client address without keys)",
              settings.rate_limit or "off", "429 `rate-limited`", "`RATE_LIMIT`"),
        Limit("images", "pixels per image", f"{settings.max_image_pixels:,}",
              "413 `image-too-large`", "`MAX_IMAGE_PIXELS`"),
        Limit("images", "pixels of all images in one request", f"{MAX_REQUEST_PIXELS:,}",
              "413 `request-too-large`"),
        Limit("images", "scans per JPEG", f"{MAX_JPEG_SCANS}", "422 `too-many-scans`"),
        Limit("images", "frames and pages read (GIF, WebP, TIFF)", "the first only", "(others ignored)"),
        Limit("audio", "duration", f"{MIN_AUDIO_SECONDS:g}-{settings.max_audio_seconds:g} s",
              "422 `audio-too-short` / 413 `audio-too-long`", "`MAX_AUDIO_SECONDS`"),
        Limit("audio", "sample rate", f"{AUDIO_SAMPLE_RATES[0]:,}-{AUDIO_SAMPLE_RATES[1]:,} Hz",
              "422 `unsupported-sample-rate`"),
        Limit("audio", "channels (mixed down to mono)", f"1-{MAX_AUDIO_CHANNELS}",
              "422 `unsupported-channels`"),
        *task_rows,
        Limit("V2", "request `id` echoed back", f"{MAX_ECHOED_ID} characters", "400"),
        Limit("every POST", "`Idempotency-Key`: visible ASCII characters", f"1-{IDEMPOTENCY_KEY_MAX_CHARS}",
              "400 `invalid-idempotency-key`"),
        Limit("every POST", "answer stored for an `Idempotency-Key` (larger: not stored, a retry runs again)",
              f"{IDEMPOTENCY_MAX_STORED_BYTES // 1048576} MiB, kept {settings.idempotency_ttl_h:g} h", "",
              "`IDEMPOTENCY_TTL_H`"),
        Limit("jobs", "one job's prediction (`Prefer: respond-async`), in a job worker", f"{settings.job_timeout_s:g} s",
              "job `failed` with 503 `deadline-exceeded`", "`JOB_TIMEOUT_S`"),
        Limit("jobs", "instances in one batch job (multipart parts, JSON `instances`, CSV rows)",
              f"{JOB_MAX_PARTS} x the endpoint's synchronous limit, within the request body limit",
              "job `failed` with 413 `too-many-instances`"),
        Limit("jobs", "audio clip in a job", f"{MIN_AUDIO_SECONDS:g}-{JOB_MAX_AUDIO_SECONDS:g} s",
              "job `failed` with 413 `audio-too-long`"),
        Limit("jobs", "jobs queued or running, all clients together (their request bodies)",
              f"{JOB_MAX_PENDING} ({JOB_MAX_PENDING_BYTES // 1048576} MiB)", "503 `jobs-full`"),
        Limit("jobs", "jobs queued or running of one client (its API key where keys are required, else its address)",
              f"{JOB_MAX_PENDING_PER_CLIENT}", "429 `too-many-jobs`"),
        Limit("jobs", "a job and its result kept", f"{settings.job_result_ttl_h:g} h", "404 `unknown-job`",
              "`JOB_RESULT_TTL_H`"),
        Limit("jobs", "runs of a job whose worker died", f"{JOB_MAX_TRIES}", "job `failed` with 500 `job-abandoned`",
              "`JOB_LEASE_S` before each takeover"),
        Limit("per worker", f"concurrent {light[3]} (running + waiting)", f"{light[0]} + {light[1]}",
              "503 `overloaded`"),
        Limit("per worker", f"concurrent {audio[3]} (running + waiting)", f"{audio[0]} + {audio[1]}",
              "503 `overloaded`"),
        Limit("per worker", f"concurrent {heavy[3]} (running + waiting)",
              f"{settings.heavy_concurrency} + {settings.heavy_queue}", "503 `overloaded`",
              "`HEAVY_CONCURRENCY`, `HEAVY_QUEUE`"),
        Limit("per dyno (all workers)", f"requests whose body or decoded input is {BIG_JOB_BYTES // 1048576} MiB "
              "or more running at once (waiting for a place: at most the queue's wait)",
              f"1 per {DYNO_MIB_PER_BIG_JOB} MiB of the memory limit (none without one)", "503 `overloaded`",
              "`BIG_JOBS_PER_DYNO`"),
        Limit("per worker", "expected wait in a queue (waiting requests x recent time per request)",
              f"{QUEUE_MAX_WAIT_S:g} s", "503 `overloaded`"),
        Limit("per worker", "requests in progress (health checks and metrics not counted)",
              f"{MAX_IN_FLIGHT}", "503 `overloaded`"),
        Limit("per worker", "open connections (fewer when the file limit is low); beyond, the longest idle "
              "is closed", f"{MAX_CONNECTIONS}", "503 `too-many-connections` when none is idle"),
        Limit("per connection", "time to send a complete request head (from connecting, or from the "
              "previous answer)", f"{HEADER_TIMEOUT_S:g} s", "(connection closed)"),
        Limit("per connection", "time an answer may wait for a client that reads none of it",
              f"{WRITE_TIMEOUT_S:g} s", "(connection closed)"),
        Limit("per worker", "request bodies still arriving, from one client address / in all",
              f"{UPLOADS_PER_CLIENT} / {UPLOADS_IN_PROGRESS}", "429 `too-many-uploads` / 503 `overloaded`"),
        Limit("per worker", "bytes of the request bodies held by the requests in progress",
              f"{BODY_BUFFER_BYTES // 1048576} MiB", "503 `overloaded`"),
        Limit("per worker", "clients tracked by the in-memory rate limiter (Redis: no bound)",
              f"{RATE_LIMIT_KEYS:,}", "(the longest idle forgotten)"),
        Limit("per worker", "database calls of requests running / waiting (each within "
              f"{DB_CALL_TIMEOUT_S:g} s and the request's deadline)", f"{DB_THREADS} / {DB_QUEUE}",
              "503 `database-unavailable`"),
        Limit("per worker", "feedback requests waiting for a prediction still being logged",
              f"{FEEDBACK_MAX_WAITERS}", "503 `overloaded`"),
        Limit("per worker", "requests waiting for the shadow version, and their inputs' bytes",
              f"{SHADOW_QUEUE}, {SHADOW_QUEUE_BYTES // 1048576} MiB",
              "(not shadowed; counted in `shadow_dropped_total`)"),
        Limit("per worker", "prediction-log rows waiting to be written (database slow or down), "
              "and the consented inputs among them", f"{settings.log_buffer_size:,} rows, "
              f"{LOG_BUFFER_ROW_BYTES // 1048576} MiB; {LOG_BUFFER_INPUT_BYTES // 1048576} MiB of inputs",
              "(rows dropped / inputs not kept; counted)", "`LOG_BUFFER_SIZE`"),
        Limit("stored inputs", "size of one consented input kept", f"{STORED_INPUT_MAX_BYTES // 1024 // 1024} MiB",
              "(not kept; the summary row is)"),
        Limit("stored inputs", "kept for", f"{settings.input_retention_days:g} days", "(deleted)",
              "`INPUT_RETENTION_DAYS`"),
    ]


def limits_for(task: str, media: str, rows: Sequence[Limit]) -> list[dict[str, str]]:
    """The rows of the table that apply to ``task``'s endpoints (those for every request, for its kind
    of input, ``media``, and its own), as ``GET /v1/models`` shows them."""
    wanted = ("every request", media, task)
    return [{"applies_to": x.applies_to, "what": x.what, "value": x.value, "refusal": x.refusal,
             "setting": x.setting.replace("`", "")}
            for x in rows if x.applies_to.split(" ")[0] in wanted or x.applies_to in wanted]


def limits_markdown(rows: Sequence[Limit]) -> str:
    lines = ["| applies to | limit | value | beyond it | setting |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {x.applies_to} | {x.what} | {x.value} | {x.refusal} | {x.setting} |" for x in rows]
    return "\n".join(lines)
