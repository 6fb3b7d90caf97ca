"""Every request limit, defined once.

The values live here (or, for the ones an operator may change, in :class:`~app.core.config.Settings`);
the codecs, the task routers, the admission gates, ``GET /v1/models`` and the README's limits table
all read them from here. ``python -m app.core.limits`` prints the README table; a test checks that
the README shows exactly that table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.core.config import Settings

# ---- images ----------------------------------------------------------------------------------
MAX_JPEG_SCANS = 32  # progressive JPEGs have ~10; each scan re-reads every coefficient
MAX_REQUEST_PIXELS = 64 * 1024 * 1024  # all images of one request together (4 x 4096 x 4096)

# ---- audio -----------------------------------------------------------------------------------
MIN_AUDIO_SECONDS = 0.3
AUDIO_SAMPLE_RATES = (8_000, 192_000)
MAX_AUDIO_CHANNELS = 32

# ---- per task --------------------------------------------------------------------------------
DIGITS_MAX_INSTANCES = 256
EMOTION_MAX_INSTANCES = 8
SEGMENTATION_MAX_INSTANCES = 4  # with format=json; png and overlay answer one image
PALETTE_MAX_INSTANCES = 4
SEGMENTATION_MAX_SIDE = 2048  # 2048 x 2048 takes ~7 s on one core; 4096 x 4096 would pass the timeout
CLUSTERING_MAX_ROWS = 10_000
FIT_MAX_ROWS = 10_000
FIT_MAX_COLUMNS = 50
FIT_MAX_K = 20
CLUSTERING_MAX_MAGNITUDE = 1e100  # larger values overflow when squared (distances, variances)
PALETTE_COLOURS = (2, 16)
PALETTE_WORKING_PIXELS = 1024 * 1024  # larger images are shrunk first: 50 000 pixels are sampled anyway

# ---- admission (per worker process) ------------------------------------------------------------
GATES = {
    # name: (concurrency, queue, nice, what runs there)
    "light": (2, 32, 0, "digit and customer-segment predictions"),
    "audio": (1, 8, 2, "emotion predictions"),
    # Up to 8 waiting (they hold only their request bytes) as long as the wait stays under
    # QUEUE_MAX_WAIT_S: 512 x 512 segmentations (~0.5 s) queue, a 2048 x 2048 one (~11 s) does not.
    "heavy": (1, 8, 0, "segmentations, clustering fits and palettes"),
}
# A request is queued only while the work ahead of it (the queue times the recent job time) is
# expected to take at most this long; beyond, a fast 503 `overloaded` with Retry-After. Holding
# clients longer ties them up (a closed loop of mixed traffic saw 14 s segmentation waits at 8).
QUEUE_MAX_WAIT_S = 5.0
# Light work this small runs on the worker's event loop, not on the gate's thread: a thread hand-off
# costs more than the job (a 28 x 28 digit: ~0.5 ms of work, ~0.4 ms of hand-off). Larger light jobs
# (a big photo, a batch) move to the gate's thread as soon as their headers show the size.
INLINE_MAX_PIXELS = 256 * 256  # all images of the request together
INLINE_MAX_INSTANCES = 4
MAX_IN_FLIGHT = 64  # requests in progress per worker (health and metrics not counted)
FEEDBACK_MAX_WAITERS = 16  # feedback requests waiting for a just-made prediction to be logged

# ---- the model life cycle ------------------------------------------------------------------------
STORED_INPUT_MAX_BYTES = 2 * 1024 * 1024  # a consented input larger than this is not kept
SHADOW_QUEUE = 64  # requests waiting for the shadow version, per worker; beyond, dropped and counted
INPUT_PURGE_INTERVAL_S = 3600.0  # how often each worker deletes stored inputs past retention
EXPORT_BATCH_ROWS = 200  # rows read per query while streaming a dataset export


@dataclass(frozen=True)
class Limit:
    applies_to: str
    what: str
    value: str
    refusal: str  # status and problem code beyond it
    setting: str = ""


def limits(settings: Settings) -> list[Limit]:
    """The limits in force with ``settings``, in the order the README lists them."""
    mib = settings.max_upload_mb
    light, audio, heavy = GATES["light"], GATES["audio"], GATES["heavy"]
    return [
        Limit("every request", "request body", f"{mib:g} MiB", "413 `payload-too-large`",
              "`MAX_UPLOAD_MB`"),
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
        Limit("digits", "images or instances per request", f"1-{DIGITS_MAX_INSTANCES}",
              "422 `too-many-instances`"),
        Limit("emotion", "clips per request", f"1-{EMOTION_MAX_INSTANCES}", "422 `too-many-instances`"),
        Limit("segmentation", "images per request", f"1 (png, overlay), 1-{SEGMENTATION_MAX_INSTANCES} (json)",
              "422 `too-many-instances`"),
        Limit("segmentation", "image side", f"<= {SEGMENTATION_MAX_SIDE} px", "413 `image-too-large`"),
        Limit("clustering predict", "rows per request", f"1-{CLUSTERING_MAX_ROWS:,}",
              "422 `invalid-request`"),
        Limit("clustering fit", "rows x columns, k", f"<= {FIT_MAX_ROWS:,} x {FIT_MAX_COLUMNS}, "
              f"k 2-{FIT_MAX_K}", "422 `invalid-request`"),
        Limit("clustering predict and fit", "magnitude of any value", f"<= {CLUSTERING_MAX_MAGNITUDE:g}",
              "422 `value-out-of-range`"),
        Limit("clustering palette", "images per request", f"1-{PALETTE_MAX_INSTANCES}",
              "422 `too-many-instances`"),
        Limit("clustering palette", "colours", f"{PALETTE_COLOURS[0]}-{PALETTE_COLOURS[1]}",
              "422 `invalid-request`"),
        Limit("per worker", f"concurrent {light[3]} (running + waiting)", f"{light[0]} + {light[1]}",
              "503 `overloaded`"),
        Limit("per worker", f"concurrent {audio[3]} (running + waiting)", f"{audio[0]} + {audio[1]}",
              "503 `overloaded`"),
        Limit("per worker", f"concurrent {heavy[3]} (running + waiting)",
              f"{settings.heavy_concurrency} + {settings.heavy_queue}", "503 `overloaded`",
              "`HEAVY_CONCURRENCY`, `HEAVY_QUEUE`"),
        Limit("per worker", "expected wait in a queue (waiting requests x recent time per request)",
              f"{QUEUE_MAX_WAIT_S:g} s", "503 `overloaded`"),
        Limit("per worker", "requests in progress (health checks and metrics not counted)",
              f"{MAX_IN_FLIGHT}", "503 `overloaded`"),
        Limit("per worker", "feedback requests waiting for a prediction still being logged",
              f"{FEEDBACK_MAX_WAITERS}", "503 `overloaded`"),
        Limit("per worker", "requests waiting for the shadow version", f"{SHADOW_QUEUE}",
              "(not shadowed; counted in `shadow_dropped_total`)"),
        Limit("stored inputs", "size of one consented input kept", f"{STORED_INPUT_MAX_BYTES // 1024 // 1024} MiB",
              "(not kept; the summary row is)"),
        Limit("stored inputs", "kept for", f"{settings.input_retention_days:g} days", "(deleted)",
              "`INPUT_RETENTION_DAYS`"),
    ]


_MEDIA = {"digits": "images", "segmentation": "images", "clustering": "images", "emotion": "audio"}


def limits_for(task: str, settings: Settings) -> list[dict[str, str]]:
    """The rows of the table that apply to ``task``'s endpoints, as ``GET /v1/models`` shows them."""
    wanted = ("every request", _MEDIA.get(task, ""), task)
    return [{"applies_to": x.applies_to, "what": x.what, "value": x.value, "refusal": x.refusal,
             "setting": x.setting.replace("`", "")}
            for x in limits(settings) if x.applies_to.split(" ")[0] in wanted or x.applies_to in wanted]


def limits_markdown(settings: Settings) -> str:
    rows = ["| applies to | limit | value | beyond it | setting |", "| --- | --- | --- | --- | --- |"]
    rows += [f"| {x.applies_to} | {x.what} | {x.value} | {x.refusal} | {x.setting} |"
             for x in limits(settings)]
    return "\n".join(rows)


if __name__ == "__main__":
    from app.core.config import Settings

    print(limits_markdown(Settings()))
