"""Safe retries: ``Idempotency-Key`` on every POST (the IETF httpapi draft, as Stripe and PayPal do).

A client that sends ``Idempotency-Key: <a random value>`` (a UUID) with a POST may send the same
request again, as often as it likes, after a timeout or a dropped connection:

* the first request with a key runs; its answer (status, headers, body) is stored with the key;
* the same key with the same request gets that stored answer, the same ``X-Request-ID`` included,
  with ``Idempotent-Replayed: true``; nothing runs again, so nothing is logged twice;
* a retry that arrives while the first is still running waits for it (within its own deadline),
  then gets its answer, or a 409 ``idempotency-key-in-use`` when it did not finish in time;
* the same key with another request (another path, query or body) is a 422 ``idempotency-key-reused``.

Answers that say "try again" (429, 5xx) are not stored: the key is released and the next retry
runs. Keys are kept ``IDEMPOTENCY_TTL_H`` (24 h). With API keys configured, a key belongs to the
API key that used it. The store is a table in the prediction log's database (``DATABASE_URL``), so
every worker and every dyno sees the same keys. A multipart body is compared with its boundary left
out: clients draw a new boundary each time they build a request.

A claim that its worker never finished (the process was killed) is taken over once its lease,
the request deadline and a margin, has run out.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column, Float, Integer, LargeBinary, MetaData, String, Table, Text
from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.access import client_key
from app.core.errors import PROBLEM_MEDIA_TYPE, is_v2, problem_body, v2_error
from app.core.execution import BlockingCalls, Deadline
from app.core.limits import (
    DB_CALL_TIMEOUT_S,
    DB_QUEUE,
    DB_THREADS,
    IDEMPOTENCY_KEY_MAX_CHARS,
    IDEMPOTENCY_MAX_STORED_BYTES,
    IDEMPOTENCY_POLL_S,
)
from app.core.tables import TableStore

log = logging.getLogger("app.idempotency")

HEADER = b"idempotency-key"
REPLAYED_HEADER = (b"idempotent-replayed", b"true")
_KEY = re.compile(r"^[\x21-\x7e]+$")  # visible ASCII, no spaces
_BOUNDARY = re.compile(rb'boundary="?([^";,\s]+)"?', re.I)
_NOT_REPLAYED = {b"x-request-id", b"x-correlation-id", b"content-length", b"connection", b"date", b"server"}

IDEMPOTENCY_PARAMETER = {
    "name": "Idempotency-Key", "in": "header", "required": False,
    "schema": {"type": "string", "pattern": _KEY.pattern, "maxLength": IDEMPOTENCY_KEY_MAX_CHARS},
    "description": "a new random value (a UUID) per request: send the request again with the same key "
                   "and you get the first answer (Idempotent-Replayed: true), run and logged once; the "
                   "same key with another request is a 422. Keys are kept IDEMPOTENCY_TTL_H hours."}

metadata = MetaData()
keys_table = Table(
    "idempotency_keys", metadata,
    Column("key", String(64), primary_key=True),  # sha256 of the owner and the client's key
    Column("fingerprint", String(64), nullable=False),  # sha256 of the request
    Column("state", String(8), nullable=False),  # running or done
    Column("locked_until", Float),  # a running claim's lease (epoch seconds)
    Column("expires_at", Float, nullable=False),
    Column("status", Integer),
    Column("headers", Text),  # JSON list of [name, value]
    Column("body", LargeBinary),
)


@dataclass(frozen=True)
class Stored:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(frozen=True)
class Claim:
    """What a key holds for a request: ``claimed`` (run it), ``replay`` (:attr:`stored`),
    ``reused`` (another request's key) or ``running`` (another request with it is running)."""

    outcome: str
    stored: Stored | None = None


class IdempotencyStore(TableStore):
    """The keys in a database table (SQLite or PostgreSQL), each operation one short transaction."""

    metadata = keys_table.metadata


    def claim(self, key: str, fingerprint: str, now: float) -> Claim:
        self.create()
        for _ in range(3):  # an expired or released row may vanish between the insert and the read
            try:
                with self.engine.begin() as conn:
                    conn.execute(insert(keys_table).values(
                        key=key, fingerprint=fingerprint, state="running",
                        locked_until=now + self.lease_s, expires_at=now + self.ttl_s))
                return Claim("claimed")
            except IntegrityError:
                pass
            with self.engine.begin() as conn:
                row = conn.execute(select(keys_table).where(keys_table.c.key == key)).first()
                if row is None:
                    continue
                if row.expires_at < now:
                    conn.execute(delete(keys_table).where(keys_table.c.key == key,
                                                          keys_table.c.expires_at < now))
                    continue
                if row.fingerprint != fingerprint:
                    return Claim("reused")
                if row.state == "done":
                    headers = [(name.encode("latin-1"), value.encode("latin-1"))
                               for name, value in json.loads(row.headers)]
                    return Claim("replay", Stored(row.status, headers, bytes(row.body)))
                if row.locked_until is not None and row.locked_until < now:  # its worker died
                    taken = conn.execute(update(keys_table).where(
                        keys_table.c.key == key, keys_table.c.state == "running",
                        keys_table.c.locked_until == row.locked_until).values(locked_until=now + self.lease_s))
                    if taken.rowcount == 1:
                        return Claim("claimed")
                return Claim("running")
        return Claim("running")

    def complete(self, key: str, stored: Stored) -> None:
        headers = json.dumps([[n.decode("latin-1"), v.decode("latin-1")] for n, v in stored.headers])
        with self.engine.begin() as conn:
            conn.execute(update(keys_table).where(keys_table.c.key == key).values(
                state="done", locked_until=None, status=stored.status, headers=headers, body=stored.body))

    def release(self, key: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(keys_table).where(keys_table.c.key == key, keys_table.c.state == "running"))

    def purge(self, now: float) -> int:
        """Delete the expired keys; how many."""
        self.create()
        with self.engine.begin() as conn:
            return conn.execute(delete(keys_table).where(keys_table.c.expires_at < now)).rowcount


def fingerprint(scope: Scope, body: bytes, content_type: bytes) -> str:
    """The request as the key must match it: method, path, query, media type and body, a multipart
    boundary taken out of both."""
    boundary = _BOUNDARY.search(content_type)
    if boundary is not None:
        body = body.replace(boundary.group(1), b"")
        content_type = content_type.replace(boundary.group(1), b"")
    digest = hashlib.sha256()
    for part in (scope["method"].encode(), scope.get("path", "").encode(), scope.get("query_string", b""),
                 content_type.split(b";")[0].strip().lower(), content_type):
        digest.update(len(part).to_bytes(8, "big") + part)
    digest.update(body)
    return digest.hexdigest()


def _header(scope: Scope, name: bytes) -> bytes | None:
    found = None
    for key, value in scope["headers"]:
        if key.lower() == name:
            found = value
    return found


def api_key_owner(scope: Scope) -> bytes:
    """Whose request it is (an idempotency key's, a job's): the API key's digest when one is sent,
    else everyone's."""
    key = client_key((_header(scope, b"authorization") or b"").decode("latin-1"),
                     (_header(scope, b"x-api-key") or b"").decode("latin-1"))
    return hashlib.sha256(key.encode("latin-1")).digest() if key else b""


def parse_key(raw: bytes) -> str | None:
    """The client's key (a bare token or a structured-field string in quotes), or None if invalid."""
    text = raw.decode("latin-1").strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    if not 1 <= len(text) <= IDEMPOTENCY_KEY_MAX_CHARS or not _KEY.match(text):
        return None
    return text


class StoreUnavailable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)


class IdempotencyMiddleware:
    """Idempotency-Key handling for POSTs (see the module); any other request passes through."""

    def __init__(self, app: ASGIApp, store: IdempotencyStore | None) -> None:
        self.app = app
        self.store = store
        self.calls = BlockingCalls(DB_THREADS, DB_QUEUE, DB_CALL_TIMEOUT_S, "idempotency")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = _header(scope, HEADER) if scope["type"] == "http" and scope["method"] == "POST" else None
        if raw is None or self.store is None:
            await self.app(scope, receive, send)
            return
        key = parse_key(raw)
        if key is None:
            await _problem(scope, send, 400, "invalid-idempotency-key",
                           f"Idempotency-Key must be 1-{IDEMPOTENCY_KEY_MAX_CHARS} visible ASCII characters "
                           "(a UUID, say).")
            return
        messages, body = await read_whole_body(receive)
        if messages is None:  # the client went away
            return
        owned = hashlib.sha256(api_key_owner(scope) + key.encode()).hexdigest()
        request = fingerprint(scope, body, _header(scope, b"content-type") or b"")
        state = scope.setdefault("state", {})
        deadline: Deadline = state.get("deadline") or Deadline(DB_CALL_TIMEOUT_S)
        try:
            claim = await self._claim(owned, request, deadline)
        except StoreUnavailable:
            await _problem(scope, send, 503, "idempotency-unavailable", "The store of idempotency keys "
                           "cannot be reached; retry shortly (the request was not run).", {"Retry-After": "5"})
            return
        if claim.outcome == "reused":
            await _problem(scope, send, 422, "idempotency-key-reused", "This Idempotency-Key was used for "
                           "another request (another path, query or body); use a new key for a new request.")
            return
        if claim.outcome == "running":
            await _problem(scope, send, 409, "idempotency-key-in-use", "A request with this Idempotency-Key is "
                           "still running; retry shortly to get its answer.", {"Retry-After": "1"})
            return
        if claim.outcome == "replay":
            assert claim.stored is not None
            await self._replay(state, claim.stored, send)
            return
        await self._run(scope, messages, receive, send, owned, state)

    async def _claim(self, key: str, request: str, deadline: Deadline) -> Claim:
        """Claim ``key`` for this request, waiting while another request holds it."""
        while True:
            claim = await self.calls.run(deadline, StoreUnavailable, self.store.claim, key, request, time.time())
            if claim.outcome != "running" or deadline.remaining() <= IDEMPOTENCY_POLL_S:
                return claim
            await asyncio.sleep(IDEMPOTENCY_POLL_S)

    async def _replay(self, state: dict[str, Any], stored: Stored, send: Send) -> None:
        original = next((v.decode("latin-1") for n, v in stored.headers if n == b"x-request-id"), None)
        if original is not None:
            state["request_id"] = original  # the access log names the request whose answer this is
        state["replayed"] = True
        await send({"type": "http.response.start", "status": stored.status, "headers": [
            *stored.headers, REPLAYED_HEADER, (b"content-length", str(len(stored.body)).encode())]})
        await send({"type": "http.response.body", "body": stored.body})

    async def _run(self, scope: Scope, messages: list[Message], receive: Receive, send: Send,
                   key: str, state: dict[str, Any]) -> None:
        pending = list(messages)

        async def replaying_receive() -> Message:
            if pending:
                return pending.pop(0)
            return await receive()

        answer: dict[str, Any] = {"status": None, "headers": [], "body": [], "size": 0, "whole": True}

        async def capturing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                answer["headers"] = [(n.lower(), v) for n, v in message.get("headers", [])]
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                answer["size"] += len(chunk)
                if answer["size"] <= IDEMPOTENCY_MAX_STORED_BYTES:
                    answer["body"].append(chunk)
                else:
                    answer["whole"] = False
            await send(message)

        stored = False
        try:
            await self.app(scope, replaying_receive, capturing_send)
            status = answer["status"]
            if status is not None and status < 500 and status != 429 and answer["whole"]:
                headers = [(n, v) for n, v in answer["headers"] if n not in _NOT_REPLAYED]
                headers.append((b"x-request-id", str(state.get("request_id", "")).encode()))
                await self.calls.run(None, StoreUnavailable, self.store.complete, key,
                                     Stored(status, headers, b"".join(answer["body"])))
                stored = True
        except (StoreUnavailable, SQLAlchemyError) as exc:  # answered, but a retry will run it again
            log.warning("idempotency key not stored: %r", exc)
        finally:
            if not stored:
                try:
                    await self.calls.run(None, StoreUnavailable, self.store.release, key)
                except (StoreUnavailable, SQLAlchemyError) as exc:  # its lease runs out instead
                    log.warning("idempotency key not released: %r", exc)


async def read_whole_body(receive: Receive) -> tuple[list[Message] | None, bytes]:
    """The request's body messages and their bytes; ``None`` messages when the client went away."""
    messages: list[Message] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None, b""
        messages.append(message)
        if not message.get("more_body", False):
            return messages, b"".join(m.get("body", b"") for m in messages)


async def _problem(scope: Scope, send: Send, status: int, code: str, detail: str,
                   headers: dict[str, str] | None = None) -> None:
    state = scope.get("state", {})
    state["error_code"] = code
    media_type = PROBLEM_MEDIA_TYPE
    if is_v2(str(scope.get("path", ""))):
        status, document = v2_error(status, code, detail)
        media_type = "application/json"
    else:
        document = problem_body(status, code, detail, field="Idempotency-Key",
                                request_id=state.get("request_id"), instance=scope.get("path"))
    body = json.dumps(document, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", media_type.encode()), (b"content-length", str(len(body)).encode()),
        *[(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]]})
    await send({"type": "http.response.body", "body": body})
