"""API keys and rate limits for the prediction routes, both off by default.

* ``API_KEYS``: comma-separated SHA-256 hex digests of the accepted keys (the server never stores a
  key itself: ``printf %s "$KEY" | sha256sum``). When set, a prediction needs
  ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; otherwise a 401 problem.
* ``RATE_LIMIT`` (e.g. ``60/minute``, the ``limits`` library's notation): per key, or per client IP
  when keys are off (the address the trusted proxy appended to ``X-Forwarded-For``: see
  :mod:`app.core.clients`; a client cannot reset its count by writing that header). Beyond it a 429
  problem with ``Retry-After`` and the ``RateLimit-Limit``/``-Remaining``/``-Reset`` headers. The
  counters live in Redis when ``REDIS_URL`` is set, shared by every worker and dyno (and needed for
  a limit that holds across them); in this process's memory otherwise, for at most
  ``RATE_LIMIT_KEYS`` clients: expired entries are dropped, and beyond that the clients idle the
  longest are forgotten first.

If Redis cannot be reached (``REDIS_TIMEOUT_S`` per call), predictions are served unmetered rather
than refused, a warning is logged, and Redis is tried again after ``REDIS_RETRY_S``: one outage costs
each worker one short wait per retry period, not one per request.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from limits import RateLimitItem, parse, storage, strategies
from starlette.requests import Request

from app.core.errors import ProblemError
from app.core.limits import RATE_LIMIT_KEYS

log = logging.getLogger("app.access_control")

REDIS_TIMEOUT_S = 0.25  # connect and read timeout of one rate-limit call to Redis
REDIS_RETRY_S = 10.0  # after a failed call, serve unmetered this long before trying Redis again


class BoundedMemoryStorage(storage.MemoryStorage):
    """The ``limits`` library's memory storage, for at most ``max_keys`` clients.

    Its moving-window entries expire, but the emptied keys stay; here they are swept every
    ``sweep_s`` and, when a new client would pass ``max_keys``, at once, the clients whose last hit
    is oldest going first."""

    def __init__(self, max_keys: int = RATE_LIMIT_KEYS, sweep_s: float = 10.0) -> None:
        super().__init__()
        self.max_keys = max_keys
        self.sweep_s = sweep_s
        self._swept_at = time.monotonic()

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        now = time.monotonic()
        if now - self._swept_at >= self.sweep_s or (key not in self.events and len(self.events) >= self.max_keys):
            self.sweep()
        return super().acquire_entry(key, limit, expiry, amount)

    def sweep(self) -> None:
        """Drop the keys with no live entry; then, over the bound, the least recently hit."""
        self._swept_at = time.monotonic()
        now = time.time()
        for key in list(self.events):
            entries = self.events.get(key)
            if not entries or entries[0].expiry <= now:  # newest first: all expired
                self.events.pop(key, None)
                self.locks.pop(key, None)
        excess = len(self.events) - self.max_keys + 1
        if excess > 0:
            by_last_hit = sorted(self.events, key=lambda k: self.events[k][0].atime if self.events[k] else 0.0)
            for key in by_last_hit[:excess]:
                self.events.pop(key, None)
                self.locks.pop(key, None)

    @property
    def keys(self) -> int:
        return len(self.events)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer_token(authorization: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value ("Bearer" in any case), else None."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def client_key(authorization: str, x_api_key: str) -> str | None:
    """The API key a request carries: its bearer token, else its ``X-API-Key``; None without either.
    What the access check verifies and what owns a job or an idempotency key."""
    return bearer_token(authorization) or x_api_key.strip() or None


def is_admin_token(token: str | None, settings: Any) -> bool:
    """Whether ``token`` is the configured ``ADMIN_TOKEN``; never when none is configured."""
    admin = settings.admin_token.get_secret_value() if settings.admin_token is not None else ""
    return bool(admin) and token is not None and hmac.compare_digest(token.encode(), admin.encode())


@dataclass
class Access:
    digests: tuple[str, ...]
    limit: RateLimitItem | None
    limiter: strategies.RateLimiter | None
    unmetered_until: float = 0.0  # monotonic time until which the counters are not asked (Redis down)

    @classmethod
    def from_settings(cls, settings) -> Access:
        digests = tuple(d.strip().lower().removeprefix("sha256:") for d in settings.api_keys if d.strip())
        if not settings.rate_limit:
            return cls(digests, None, None)
        options: dict[str, float | str] = {"socket_timeout": REDIS_TIMEOUT_S,
                                           "socket_connect_timeout": REDIS_TIMEOUT_S}
        if settings.redis_url and settings.redis_url.startswith("rediss://") and not settings.redis_tls_verify:
            options["ssl_cert_reqs"] = "none"  # Heroku Key-Value Store's certificate is self-signed
        backend = storage.storage_from_string(settings.redis_url, **options) \
            if settings.redis_url else BoundedMemoryStorage()
        return cls(digests, parse(settings.rate_limit), strategies.MovingWindowRateLimiter(backend))

    def _key(self, request: Request) -> str | None:
        return client_key(request.headers.get("authorization", ""), request.headers.get("x-api-key", ""))

    def identity(self, request: Request) -> str:
        """Who a request counts as for its limits (the rate limit, the jobs it may have waiting):
        its API key's digest where keys are required (the access check verifies it), else its
        address (as resolved behind trusted proxies)."""
        key = self._key(request) if self.digests else None
        if key:
            return f"key:{key_digest(key)[:16]}"
        return f"ip:{request.client.host if request.client else 'unknown'}"

    def check(self, request: Request) -> dict[str, str]:
        """Raise the 401/429 problem a request deserves; else the RateLimit headers to send."""
        if self.digests:
            key = self._key(request)
            digest = key_digest(key) if key else ""
            if not key or not any(hmac.compare_digest(digest, d) for d in self.digests):
                raise ProblemError(401, "api-key-required" if not key else "api-key-invalid",
                                   "This endpoint needs a valid API key: 'Authorization: Bearer <key>' or "
                                   "'X-API-Key: <key>'.", field="Authorization",
                                   headers={"WWW-Authenticate": 'Bearer realm="predictions"'})
        if self.limit is None or self.limiter is None or time.monotonic() < self.unmetered_until:
            return {}
        identity = self.identity(request)
        try:
            allowed = self.limiter.hit(self.limit, identity)
            stats = self.limiter.get_window_stats(self.limit, identity)
        except Exception as exc:  # Redis down: serve rather than fail every prediction
            self.unmetered_until = time.monotonic() + REDIS_RETRY_S
            log.warning("rate limit not checked; serving unmetered for %g s", REDIS_RETRY_S,
                        extra={"error": f"{type(exc).__name__}: {exc}"[:200]})
            return {}
        reset = max(1, math.ceil(stats.reset_time - time.time()))
        headers = {"RateLimit-Limit": str(self.limit.amount), "RateLimit-Remaining": str(stats.remaining),
                   "RateLimit-Reset": str(reset)}
        if not allowed:
            raise ProblemError(429, "rate-limited", f"Over the limit of {self.limit} for this "
                               f"{'key' if self.digests else 'client'}; retry in {reset} s.",
                               headers={**headers, "Retry-After": str(reset)}, limit=str(self.limit))
        return headers
