"""The Idempotency-Key store and middleware: claims, replays, leases, expiry, what is not stored."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from app.core.idempotency import IdempotencyMiddleware, IdempotencyStore, Stored, fingerprint, parse_key


def store(tmp_path: Path, ttl_s: float = 3600.0, lease_s: float = 30.0) -> IdempotencyStore:
    return IdempotencyStore(f"sqlite:///{tmp_path / 'keys.db'}", ttl_s=ttl_s, lease_s=lease_s)


def test_a_key_is_claimed_once_then_replayed(tmp_path: Path):
    keys = store(tmp_path)
    assert keys.claim("k", "f", now=100.0).outcome == "claimed"
    assert keys.claim("k", "f", now=101.0).outcome == "running"
    assert keys.claim("k", "other", now=101.0).outcome == "reused"
    keys.complete("k", Stored(201, [(b"x-request-id", b"abc")], b"{}"))
    replay = keys.claim("k", "f", now=102.0)
    assert replay.outcome == "replay" and replay.stored == Stored(201, [(b"x-request-id", b"abc")], b"{}")


def test_a_claim_whose_worker_died_is_taken_over_after_its_lease(tmp_path: Path):
    keys = store(tmp_path, lease_s=30.0)
    assert keys.claim("k", "f", now=100.0).outcome == "claimed"
    assert keys.claim("k", "f", now=129.0).outcome == "running"
    assert keys.claim("k", "f", now=131.0).outcome == "claimed"  # the lease ran out
    assert keys.claim("k", "f", now=132.0).outcome == "running"  # and is held again


def test_a_released_key_runs_again_and_an_expired_one_is_new(tmp_path: Path):
    keys = store(tmp_path, ttl_s=60.0)
    keys.claim("k", "f", now=100.0)
    keys.release("k")
    assert keys.claim("k", "f", now=101.0).outcome == "claimed"
    keys.complete("k", Stored(200, [], b"1"))
    assert keys.claim("k", "other", now=160.0).outcome == "reused"
    assert keys.claim("k", "other", now=162.0).outcome == "claimed"  # 24 h (here 60 s) later: a new key
    keys.complete("k", Stored(200, [], b"2"))
    assert keys.purge(now=1000.0) == 1 and keys.claim("k", "f", now=1000.0).outcome == "claimed"


def test_the_fingerprint_ignores_the_multipart_boundary_and_nothing_else():
    scope = {"method": "POST", "path": "/v1/digits/predict", "query_string": b""}
    body = b'--AAA\r\nContent-Disposition: form-data; name="image"\r\n\r\nxyz\r\n--AAA--\r\n'
    one = fingerprint(scope, body, b"multipart/form-data; boundary=AAA")
    assert one == fingerprint(scope, body.replace(b"AAA", b"BBB"), b"multipart/form-data; boundary=BBB")
    assert one != fingerprint(scope, body.replace(b"xyz", b"xyy"), b"multipart/form-data; boundary=AAA")
    assert one != fingerprint({**scope, "query_string": b"top_k=3"}, body, b"multipart/form-data; boundary=AAA")
    assert one != fingerprint({**scope, "path": "/v1/emotion/predict"}, body, b"multipart/form-data; boundary=AAA")


@pytest.mark.parametrize(("raw", "key"), [(b"abc-123", "abc-123"), (b'"abc"', "abc"), (b"", None),
                                          (b"a b", None), (b"x" * 256, None), ("é".encode(), None)])
def test_keys_are_visible_ascii_of_at_most_255_characters(raw, key):
    assert parse_key(raw) == key


def run(middleware: IdempotencyMiddleware, key: str) -> tuple[int, dict[bytes, bytes]]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/x", "query_string": b"", "state": {},
             "headers": [(b"idempotency-key", key.encode()), (b"content-type", b"application/json")]}
    asyncio.run(middleware(scope, receive, send))
    return sent[0]["status"], dict(sent[0]["headers"])


def test_an_answer_that_says_retry_is_not_stored(tmp_path: Path):
    calls: list[int] = []
    statuses = iter([503, 429, 200])

    async def app(scope, receive, send) -> None:
        await receive()
        calls.append(1)
        await send({"type": "http.response.start", "status": next(statuses), "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    middleware = IdempotencyMiddleware(app, store(tmp_path))
    assert [run(middleware, "k")[0] for _ in range(4)] == [503, 429, 200, 200]
    assert len(calls) == 3  # the 503 and the 429 ran again; the 200 was replayed
    assert run(middleware, "k")[1][b"idempotent-replayed"] == b"true"
