"""The bounds that keep a public deployment up, one by one: the client behind a proxy, the rate
limiter's memory, bodies still arriving, database calls in time, the prediction log's bytes, the
shadow queue's bytes, consent sent twice, request ids only this service can make."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest
from limits import parse
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy import create_engine

from app.core.access import BoundedMemoryStorage
from app.core.clients import TrustedProxies
from app.core.errors import ProblemError
from app.core.execution import BlockingCalls, Deadline
from app.core.middleware import Uploads, new_request_id, request_id_age_s, request_id_key
from app.core.pipeline import Instance, Job, consent, json_values_bound
from app.core.shadow import JSON_MEMORY_FACTOR, job_bytes
from app.core.worker import accept_batch, connection_cap
from app.monitoring.store import PredictionLog

# ---- the client behind a proxy ------------------------------------------------------------------


@pytest.mark.parametrize(("setting", "peer", "header", "client"), [
    ("*", "10.1.2.3", [b"6.6.6.6, 203.0.113.9"], "203.0.113.9"),  # Heroku: the router's own entry
    ("*", "10.1.2.3", [b"6.6.6.6", b"203.0.113.9"], "203.0.113.9"),  # two header lines: one list
    ("*", "10.1.2.3", [b"not-an-address"], "10.1.2.3"),  # nonsense: the peer stands
    ("*", "10.1.2.3", [b"6.6.6.6, " + b"x" * 8000], "10.1.2.3"),
    ("127.0.0.1", "127.0.0.1", [b"6.6.6.6, 203.0.113.9"], "203.0.113.9"),
    ("127.0.0.1", "198.51.100.1", [b"203.0.113.9"], "198.51.100.1"),  # an untrusted peer's header
    ("127.0.0.1, 10.0.0.0/8", "127.0.0.1", [b"6.6.6.6, 203.0.113.9, 10.0.0.5"], "203.0.113.9"),  # two proxies
    ("127.0.0.1", "127.0.0.1", [b"[2001:db8::1]:443"], "2001:db8::1"),
    ("127.0.0.1", "127.0.0.1", [], "127.0.0.1"),
])
def test_the_client_is_the_entry_the_trusted_proxy_appended(setting, peer, header, client):
    assert TrustedProxies.parse(setting).client(peer, header) == client


def test_forwarded_proto_is_believed_only_from_a_trusted_proxy():
    proxies = TrustedProxies.parse("127.0.0.1")
    assert proxies.scheme("127.0.0.1", b"https", "http") == "https"
    assert proxies.scheme("127.0.0.1", b"http, https", "http") == "https"
    assert proxies.scheme("198.51.100.1", b"https", "http") == "http"
    assert proxies.scheme("127.0.0.1", b"gopher", "http") == "http"


def test_a_setting_that_is_not_an_address_is_refused():
    with pytest.raises(ValueError, match="FORWARDED_ALLOW_IPS: 'heroku'"):
        TrustedProxies.parse("127.0.0.1, heroku")


# ---- the in-memory rate limiter --------------------------------------------------------------------


def test_the_limiter_forgets_expired_clients_and_keeps_at_most_its_bound():
    storage = BoundedMemoryStorage(max_keys=100, sweep_s=3600)
    limiter = MovingWindowRateLimiter(storage)
    limit = parse("2/second")
    for i in range(1000):
        assert limiter.hit(limit, f"client-{i}")
    assert storage.keys <= 100
    assert limiter.hit(limit, "client-999") and not limiter.hit(limit, "client-999")  # the newest kept
    time.sleep(1.1)  # a sleep, not a wait: the one-second window must pass on the limiter's clock
    storage.sweep()
    assert storage.keys == 0


def test_the_limiter_evicts_the_clients_idle_the_longest():
    storage = BoundedMemoryStorage(max_keys=3, sweep_s=3600)
    limiter = MovingWindowRateLimiter(storage)
    limit = parse("5/minute")
    for name in ("a", "b", "c"):
        limiter.hit(limit, name)
        time.sleep(0.01)  # distinct hit times: the clock orders who was idle the longest
    limiter.hit(limit, "a")  # a is recent again
    limiter.hit(limit, "d")  # b goes
    assert sorted(k.split("/")[1] for k in storage.events) == ["a", "c", "d"]


# ---- bodies still arriving ----------------------------------------------------------------------------


def test_bodies_arriving_are_capped_per_client_and_in_all():
    uploads = Uploads(per_client=2, in_all=3)
    assert [uploads.begin("a"), uploads.begin("a"), uploads.begin("a")] == [None, None, "busy_client"]
    assert uploads.begin("b") is None
    assert uploads.begin("c") == "busy_worker"
    uploads.end("a")
    assert uploads.begin("c") is None
    assert uploads.arriving == {"a": 1, "b": 1, "c": 1}
    for client in ("a", "b", "c"):
        uploads.end(client)
    assert (uploads.arriving, uploads.total) == ({}, 0)


# ---- the connection cap ---------------------------------------------------------------------------------


@pytest.mark.parametrize("files", [256, 512, 1024, 10_000, 65_536])
def test_connections_and_a_burst_of_accepts_fit_under_the_file_limit(files):
    assert 8 <= connection_cap(files) <= 1000
    assert connection_cap(files) + accept_batch(files) + 64 <= max(files, 8 + 64 + 64)


# ---- database calls in time -----------------------------------------------------------------------------


def unavailable(reason: str) -> ProblemError:
    return ProblemError(503, "database-unavailable", reason)


def test_a_blocking_call_past_its_timeout_answers_and_a_full_pool_refuses_at_once():
    calls = BlockingCalls(threads=1, queue=1, timeout_s=0.2, name="test-db")
    release = threading.Event()

    async def scenario() -> list[str]:
        outcomes = []
        for _ in range(3):
            started = time.monotonic()
            try:
                await calls.run(Deadline(5.0), unavailable, release.wait, 10)
            except ProblemError as exc:
                outcomes.append(f"{exc.detail} {time.monotonic() - started < 0.5}")
        return outcomes

    try:
        # two calls wait out their timeout (one running, one queued); the third is refused at once
        assert asyncio.run(scenario()) == ["timeout True", "timeout True", "busy True"]
    finally:
        release.set()
        calls.shutdown()


def test_a_blocking_call_never_waits_past_the_requests_deadline():
    calls = BlockingCalls(threads=1, queue=1, timeout_s=30.0, name="test-db")
    try:
        with pytest.raises(ProblemError, match="timeout"):
            asyncio.run(calls.run(Deadline(0.1), unavailable, time.sleep, 1.0))  # a call that blocks 1 s
        assert asyncio.run(calls.run(Deadline(5.0), unavailable, lambda: 42)) == 42
    finally:
        calls.shutdown()


# ---- the prediction log's bytes ---------------------------------------------------------------------------


def test_inputs_beyond_the_buffers_bytes_are_dropped_and_their_rows_kept(tmp_path):
    log = PredictionLog(create_engine(f"sqlite:///{tmp_path / 'log.db'}"), store_inputs=True)
    log.max_input_bytes = 25
    row = {"prediction": "7", "confidence": 0.9, "features": {"ink": 0.1}}
    kept = [log.enqueue(f"r{i}", "digits", "1.0.1", [row], latency_ms=1.0, raw_inputs=[b"x" * 10]).inputs
            for i in range(4)]
    assert kept == [1, 1, 0, 0]
    assert log.buffered == 4
    assert log.status() == {"database": "ok", "buffered_rows": 4, "buffered_input_bytes": 20}
    assert log.flush(5.0)
    assert log.status()["buffered_input_bytes"] == 0
    assert log.enqueue("r9", "digits", "1.0.1", [row], latency_ms=1.0, raw_inputs=[b"x" * 10]).inputs == 1


def test_summary_rows_beyond_the_buffers_bytes_are_dropped_and_counted(tmp_path):
    log = PredictionLog(create_engine(f"sqlite:///{tmp_path / 'log.db'}"))
    log.max_row_bytes = 3 * (512 + 96)
    row = {"prediction": "7", "confidence": 0.9, "features": {"ink": 0.1}}
    assert log.enqueue("r", "digits", "1.0.1", [row] * 5, latency_ms=1.0) == 3
    assert log.rows_dropped == 2


# ---- the shadow queue's bytes ------------------------------------------------------------------------------


def test_a_queued_jobs_bytes_are_its_files_or_its_parsed_json():
    files = Job(None, [Instance("image[0]", data=b"x" * 100), Instance("image[1]", data=b"y" * 50)],
                None, None, None, body_bytes=400)
    parsed = Job(None, [Instance("instances[0]", value=[1, 2, 3])], None, None, None, body_bytes=400)
    assert job_bytes(files) == 150
    assert job_bytes(parsed) == 400 * JSON_MEMORY_FACTOR


# ---- consent, JSON values, request ids ---------------------------------------------------------------------


def request_with(*values: str):
    class Headers:
        def getlist(self, name: str) -> list[str]:
            return list(values)

    return SimpleNamespace(headers=Headers())


@pytest.mark.parametrize(("values", "granted"), [
    ((), False), (("granted",), True), (("denied",), False), (("granted", "granted"), True),
    (("Granted", " granted "), True), (("denied", "denied"), False)])
def test_consent_is_granted_only_when_every_value_grants_it(values, granted):
    assert consent(request_with(*values)) is granted


@pytest.mark.parametrize("values", [("granted", "denied"), ("granted, denied",), ("denied", "granted"),
                                    ("yes",), ("granted", "maybe")])
def test_consent_that_disagrees_or_is_unknown_is_a_422(values):
    with pytest.raises(ProblemError) as info:
        consent(request_with(*values))
    assert (info.value.status, info.value.code, info.value.field) == (422, "invalid-consent", "X-Data-Consent")


def test_a_json_values_bound_counts_every_value_unparsed():
    assert json_values_bound(b'{"instances": [[1, 2, 3], [4, 5, 6]]}') >= 6
    assert json_values_bound(b"[0]," * 1000 + b"[0]") == 1001


def test_only_request_ids_this_service_made_have_an_age():
    made = new_request_id()
    assert 0 <= request_id_age_s(made) < 5
    forged = made[:22] + ("0" if made[22] != "0" else "1") + made[23:]  # a tag one digit off
    assert request_id_age_s(forged) is None
    other = f"{int(time.time() * 1000):012x}" + "ab" * 10
    assert request_id_age_s(other) is None


def test_a_request_id_tag_is_hmac_sha256_of_the_rest_under_the_key():
    """The tag is the first 40 bits of HMAC-SHA256 (the ids a running service issued stay known
    after a deploy): the same as the one-shot ``hmac.digest``, under a secret's key too."""
    import hashlib
    import hmac

    original = request_id_key.key
    try:
        for secret in (None, "dyno-secret"):
            request_id_key.use(secret)
            made = new_request_id()
            assert made[22:] == hmac.digest(request_id_key.key, made[:22].encode(), "sha256")[:5].hex()
        assert request_id_key.key == hashlib.sha256(b"dyno-secret").digest()
    finally:
        request_id_key.key = original


def test_request_ids_made_under_one_secret_are_known_under_the_same_secret_only():
    original = request_id_key.key
    try:
        request_id_key.use("dyno-secret")
        made = new_request_id()
        request_id_key.use("another-secret")
        assert request_id_age_s(made) is None
        request_id_key.use("dyno-secret")  # another dyno with the same REQUEST_ID_SECRET
        assert request_id_age_s(made) is not None
    finally:
        request_id_key.key = original
