"""Every request limit, defined once.

The values live here (or, for the ones an operator may change, in :class:`~app.core.config.Settings`);
the codecs, the task routers and the admission gates read them from here, and so does the table of
limits (:mod:`app.core.limits_table`) that ``GET /v1/models`` and the README show.
"""

from __future__ import annotations

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
SEGMENTATION_MAX_SIDE = 2048  # 2048 x 2048: about 2 s on one core (segmentation_speed.json); 4096 x 4096: 4x that
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
    # QUEUE_MAX_WAIT_S: short segmentations queue, one large enough to take seconds does not.
    "heavy": (1, 8, 0, "segmentations, clustering fits and palettes"),
}
# A request is queued only while the work ahead of it (the queue times the recent job time) is
# expected to take at most this long; beyond, a fast 503 `overloaded` with Retry-After: holding
# clients longer only ties them up.
QUEUE_MAX_WAIT_S = 5.0
# Big jobs share the dyno's memory across workers (app.core.places): a job whose request body or
# decoded input (pixels, samples) reaches this takes one of the dyno's places first: the heaviest
# requests grow a worker by tens of MiB (bench/results/docker.json), a small one (a photo of a
# digit, a few seconds of speech) by a few and never waits for a place.
BIG_JOB_BYTES = 2 * 1024 * 1024
DYNO_MIB_PER_BIG_JOB = 256  # places = the dyno's memory limit / this: two on a 512 MiB dyno
# A big job's helper thread (app.core.spare) makes a second interpreter, as large as the first,
# for as long as the job runs: under a memory limit it starts only while the cgroup has this left.
SPARE_CPU_MIN_ROOM_MIB = 128
# Light work this small runs on the worker's event loop, not on the gate's thread: for a 28 x 28
# digit the two thread hand-offs cost about as much as the job itself. Larger light jobs
# (a big photo, a batch) move to the gate's thread as soon as their headers show the size.
INLINE_MAX_PIXELS = 256 * 256  # all images of the request together
INLINE_MAX_INSTANCES = 4
MAX_IN_FLIGHT = 64  # requests in progress per worker (health and metrics not counted)
FEEDBACK_MAX_WAITERS = 16  # feedback requests waiting for a just-made prediction to be logged

# ---- connections and bodies (per worker process) ------------------------------------------------
MAX_CONNECTIONS = 1000  # open connections; fewer when the file limit leaves less room
CONNECTIONS_RESERVED_FDS = 64  # file descriptors kept free for everything but client connections
HEADER_TIMEOUT_S = 10.0  # a request head must arrive within this of the connection (or last answer)
WRITE_TIMEOUT_S = 15.0  # a response the client reads nothing of for this long is abandoned
UPLOADS_PER_CLIENT = 16  # bodies still arriving at once from one client address
UPLOADS_IN_PROGRESS = 48  # bodies still arriving at once, all clients together (< MAX_IN_FLIGHT)
BODY_BUFFER_BYTES = 64 * 1024 * 1024  # request bodies held by the requests in progress, together
JSON_INLINE_MAX_BYTES = 64 * 1024  # larger JSON bodies are parsed on a thread, off the event loop
JSON_VALUES_SLACK = 1024  # values beyond an endpoint's own (keys, ids, parameters)
MAX_ECHOED_ID = 128  # characters of a client's id echoed back (V2 request id, correlation id)
MAX_CLIENT_VERSIONS = 64  # distinct X-Client-Version values logged per worker; later new ones: "other"
RATE_LIMIT_KEYS = 50_000  # clients tracked by the in-memory rate limiter; the longest idle go first

# ---- the prediction-log database, on the request path ---------------------------------------------
DB_CALL_TIMEOUT_S = 5.0  # one request's database work, also bounded by the request's deadline
DB_THREADS = 4  # threads running request-path database work, per worker
DB_QUEUE = 16  # database calls waiting for one of those threads; beyond, 503 at once
DB_POOL_TIMEOUT_S = 2.0  # waiting for a pooled connection (PostgreSQL)
DB_STATEMENT_TIMEOUT_S = 10.0  # the server stops a statement (or a lock wait) running longer (PostgreSQL)

# ---- the model life cycle ------------------------------------------------------------------------
STORED_INPUT_MAX_BYTES = 2 * 1024 * 1024  # a consented input larger than this is not kept
SHADOW_QUEUE = 64  # requests waiting for the shadow version, per worker; beyond, dropped and counted
SHADOW_QUEUE_BYTES = 16 * 1024 * 1024  # their inputs together
LOG_BUFFER_INPUT_BYTES = 32 * 1024 * 1024  # consented inputs waiting to be written, per worker
LOG_BUFFER_ROW_BYTES = 16 * 1024 * 1024  # summary rows waiting to be written (estimated), per worker
INPUT_PURGE_INTERVAL_S = 3600.0  # how often each worker deletes stored inputs past retention
EXPORT_BATCH_ROWS = 200  # rows read per query while streaming a dataset export

# ---- safe retries (app.core.idempotency) --------------------------------------------------------
IDEMPOTENCY_KEY_MAX_CHARS = 255
IDEMPOTENCY_MAX_STORED_BYTES = 8 * 1024 * 1024  # larger answers are not stored: a retry runs again
IDEMPOTENCY_LEASE_MARGIN_S = 5.0  # a claim outlives its request's deadline by this, then is taken over
IDEMPOTENCY_POLL_S = 0.1  # a retry waiting for the first request looks this often

# ---- asynchronous jobs (Prefer: respond-async) -------------------------------------------------------
JOB_LEASE_S = 10.0  # a running job's claim, renewed every third of it while it runs; then another worker takes it over
JOB_REAP_S = 2.0  # how often a job worker looks for jobs whose worker died (and for expired ones)
JOB_LOST_MESSAGE_S = 60.0  # a job still queued this long after it was submitted is queued again
JOB_MAX_TRIES = 3  # a job whose worker died this many times is failed (a poison job)
JOB_POLL_AFTER_S = 1  # the Retry-After of a 202 and of a job still running
JOB_MAX_PARTS = 50  # a batch job holds up to this many times its endpoint's synchronous instance limit
JOB_MAX_AUDIO_SECONDS = 600.0  # a clip in a job (synchronous: MAX_AUDIO_SECONDS)
JOB_MAX_PENDING = 500  # jobs queued or running, all clients together; beyond, 503 jobs-full
JOB_MAX_PENDING_BYTES = 512 * 1024 * 1024  # their stored request bodies together
JOB_MAX_PENDING_PER_CLIENT = 50  # jobs queued or running of one client (API key, else address); beyond, 429
