"""schemathesis against the live server: every operation, every phase (examples, coverage, fuzzing,
stateful), the five response checks, zero failures. The seed is fixed so CI is repeatable; change it
(or drop --seed) to explore new cases locally."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.liveserver import running_server

TOKEN = "schemathesis-admin-token"
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,response_headers_conformance")


@pytest.fixture(scope="module")
def admin_server():
    with running_server(workers=1, env={"ADMIN_TOKEN": TOKEN}) as live:
        yield live


def test_schemathesis_finds_no_failure(admin_server, tmp_path):
    command = [str(Path(sys.executable).parent / "schemathesis"), "run", admin_server.base_url + "/openapi.json",
               "--checks", CHECKS, "--max-examples", "25", "--seed", "20261125",
               "-H", f"Authorization: Bearer {TOKEN}", "--no-color"]
    # Run from a scratch directory: schemathesis keeps a cache (.schemathesis/) where it runs.
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert " passed" in output and "failed" not in output.split("SUMMARY")[-1], output[-3000:]
    lines = admin_server.log_text().splitlines()
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    statuses = [e["status"] for e in entries if e.get("logger") == "app.access"]
    assert statuses and max(statuses) < 500, "a 5xx answer in the access log"
