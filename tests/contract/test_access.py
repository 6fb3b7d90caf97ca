"""API keys and rate limits on the real server: keys stored as digests, limits counted in the real
Redis and shared by both workers."""

from __future__ import annotations

import secrets

import httpx
import pytest
import redis

from app.core.access import key_digest
from bench.liveserver import running_server

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module")
def keys() -> tuple[str, str]:
    return secrets.token_hex(16), secrets.token_hex(16)


@pytest.fixture(scope="module")
def keyed_server(keys):
    env = {"API_KEYS": ",".join(key_digest(k) for k in keys), "RATE_LIMIT": "6/minute", "REDIS_URL": REDIS_URL}
    with running_server(workers=2, env=env) as live:
        yield live


def predict(base: str, **headers: str) -> httpx.Response:
    # A new connection each time, so the two workers share the requests.
    return httpx.post(base + "/v1/clustering/predict", headers=headers,
                      json={"instances": [{"annual_income": 15, "spending_score": 39}]})


def test_predictions_need_a_valid_key_and_the_server_keeps_only_digests(keyed_server, keys):
    missing = predict(keyed_server.base_url)
    wrong = predict(keyed_server.base_url, authorization="Bearer not-a-key")
    assert (missing.status_code, missing.json()["code"]) == (401, "api-key-required")
    assert (wrong.status_code, wrong.json()["code"]) == (401, "api-key-invalid")
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert predict(keyed_server.base_url, authorization=f"Bearer {keys[0]}").status_code == 200
    assert predict(keyed_server.base_url, **{"x-api-key": keys[0]}).status_code == 200
    assert keys[0] not in keyed_server.log_text()
    assert httpx.get(keyed_server.base_url + "/health/ready").status_code == 200  # health stays open


def test_each_key_has_its_own_limit_counted_in_redis_across_both_workers(keyed_server, keys):
    first = [predict(keyed_server.base_url, authorization=f"Bearer {keys[1]}") for _ in range(8)]
    assert [r.status_code for r in first] == [200] * 6 + [429] * 2
    refused = first[-1]
    assert refused.json()["code"] == "rate-limited"
    assert 0 < int(refused.headers["retry-after"]) <= 60
    assert (refused.headers["ratelimit-limit"], refused.headers["ratelimit-remaining"]) == ("6", "0")
    assert first[0].headers["ratelimit-remaining"] == "5"
    # The counters are in Redis (shared by every worker and dyno), keyed by the key's digest.
    stored = redis.Redis.from_url(REDIS_URL).keys(f"*{key_digest(keys[1])[:16]}*")
    assert stored, "no rate-limit counter in Redis"


def test_without_keys_the_limit_is_per_client_address():
    with running_server(workers=1, env={"RATE_LIMIT": "3/minute"}) as live:
        statuses = [predict(live.base_url).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
