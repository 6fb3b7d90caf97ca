"""Each dyno's metrics, named by DYNO: in /metrics, and pushed to a Pushgateway by one worker per dyno
(METRICS_PUSH_URL), which another worker takes over when it dies. The receiver here speaks the
Pushgateway's protocol (PUT /metrics/job/<job>/dyno/<dyno> with the text format)."""

from __future__ import annotations

import base64
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.liveserver import LiveServer, running_server
from tests.contract.test_examples import read
from tests.deploy.pushgateway import Receiver, receiving
from tests.support import wait_until

DYNO = "web.7"
JOB = "ml-inference-service"


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with receiving() as server:
        yield server


@pytest.fixture(scope="module")
def pushing_server(receiver: Receiver) -> Iterator[LiveServer]:
    env = {"DYNO": DYNO, "METRICS_PUSH_URL": receiver.url, "METRICS_PUSH_INTERVAL_S": "1"}
    with running_server(env, workers=2) as live:
        yield live


def lock_holders(server: LiveServer) -> set[int]:
    """The pids holding the push lock, from the kernel's table of file locks."""
    lock = server.log_path.parent / "prometheus" / "metrics-push.lock"
    inode = os.stat(lock).st_ino
    holders = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "FLOCK" in fields and int(fields[-3].rsplit(":", 1)[1]) == inode:
            holders.add(int(fields[-4]))
    return holders


def test_metrics_name_the_dyno_on_every_sample(pushing_server):
    text = httpx.get(pushing_server.base_url + "/metrics").text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    assert samples and {s.labels.get("dyno") for s in samples} == {DYNO}


def test_without_dyno_the_metrics_carry_no_dyno_label(live_server):
    text = httpx.get(live_server + "/metrics").text
    assert not [s for f in text_string_to_metric_families(text) for s in f.samples if "dyno" in s.labels]


def test_the_dyno_pushes_its_predictions_under_its_name_with_basic_auth(pushing_server, receiver):
    httpx.post(pushing_server.base_url + "/v1/digits/predict",
               files={"image": ("d.png", read("digit-7.png"), "image/png")}).raise_for_status()
    push = receiver.wait_for(lambda p: (p.sample("predictions_total", model="digits", dyno=DYNO) or 0) >= 1)
    assert push.method == "PUT"
    assert push.path == f"/metrics/job/{JOB}/dyno/{DYNO}"
    assert push.authorization == "Basic " + base64.b64encode(b"pusher:s3cret").decode()


def test_one_worker_pushes_and_another_takes_over_when_it_is_killed(pushing_server, receiver):
    workers = set(pushing_server.worker_pids())
    receiver.wait_for(lambda p: True)
    (pusher,) = lock_holders(pushing_server)
    assert pusher in workers
    os.kill(pusher, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_until(lambda: lock_holders(pushing_server) - {pusher}, 30, 0.2)
    (successor,) = lock_holders(pushing_server)
    assert successor != pusher and successor in set(pushing_server.worker_pids())
    receiver.wait_for(lambda p: p.at > killed_at + 0.5 and p.path.endswith(f"/dyno/{DYNO}"))


def test_an_unreachable_gateway_costs_one_log_line_and_no_answer():
    closed = Receiver()
    url = f"http://127.0.0.1:{closed.server_address[1]}"
    closed.server_close()  # connections are refused
    env = {"DYNO": DYNO, "METRICS_PUSH_URL": url, "METRICS_PUSH_INTERVAL_S": "1"}
    with running_server(env, workers=1) as live:
        wait_until(lambda: "metrics not pushed" in live.log_text(), 10, 0.1)  # the first push has failed
        # A sleep, not a wait: a refused push leaves no trace (that is what is checked), so nothing
        # says the next ones have happened.
        time.sleep(2.5)  # two and a half more push intervals, each failing again: still one line
        response = httpx.post(live.base_url + "/v1/digits/predict",
                              files={"image": ("d.png", read("digit-7.png"), "image/png")})
        assert response.status_code == 200
        assert live.log_text().count("metrics not pushed") == 1
