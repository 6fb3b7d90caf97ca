"""Who a request says it is: one reading of the bearer token and the API key for the access check,
the owner of jobs and idempotency keys, and the admin token."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
from pydantic import SecretStr
from starlette.requests import Request

from app.core.access import Access, bearer_token, client_key, is_admin_token
from app.core.idempotency import api_key_owner


def scope(**headers: str) -> dict:
    return {"type": "http", "method": "POST", "path": "/v1/digits/predict", "query_string": b"",
            "headers": [(name.replace("_", "-").encode(), value.encode()) for name, value in headers.items()]}


@pytest.mark.parametrize(("authorization", "token"), [
    ("Bearer alice", "alice"), ("bearer alice", "alice"), ("BEARER  alice ", "alice"),
    ("Bearer ", None), ("Bearer", None), ("Basic YWxpY2U=", None), ("", None), ("alice", None)])
def test_bearer_token(authorization, token):
    assert bearer_token(authorization) == token


def test_the_bearer_token_comes_before_x_api_key():
    assert client_key("Bearer alice", "bob") == "alice"
    assert client_key("Basic YWxpY2U=", " bob ") == "bob"
    assert client_key("", "") is None


@pytest.mark.parametrize("headers", [
    {"authorization": "Bearer alice"}, {"authorization": "bearer   alice"}, {"x_api_key": "alice"},
    {"authorization": "Bearer alice", "x_api_key": "bob"}])
def test_the_owner_is_the_key_the_access_check_reads(headers):
    request = Request(scope(**headers))
    access = Access((hashlib.sha256(b"alice").hexdigest(),), None, None)
    assert access._key(request) == "alice"
    access.check(request)  # accepted: alice's key
    assert api_key_owner(scope(**headers)) == hashlib.sha256(b"alice").digest()


def test_no_key_is_everyone():
    assert api_key_owner(scope()) == b""


def settings(token: str | None) -> SimpleNamespace:
    return SimpleNamespace(admin_token=SecretStr(token) if token is not None else None)


def test_the_admin_token():
    assert is_admin_token("s3cret", settings("s3cret"))
    assert not is_admin_token("s3cret ", settings("s3cret"))
    assert not is_admin_token("other", settings("s3cret"))
    assert not is_admin_token(None, settings("s3cret"))
    assert not is_admin_token("", settings(""))  # none configured: nobody is admin
    assert not is_admin_token("anything", settings(None))
