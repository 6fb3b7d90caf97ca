"""The Docker image, built from the real Dockerfile and run as a 512 MiB Heroku dyno (`make docker-test`).

A Docker daemon of its own (bench/dockerd.py: Debian's docker.io, host network, stopped by pid at
the end) builds the image on the official base image or, where no registry can be reached, on a
Debian stand-in, and runs it with ``--memory 512m --memory-swap 512m --cpus 1 --read-only``, tmpfs
for /tmp and the SQLite log, ``PORT`` and ``DYNO`` set. Then, from outside: Docker's own health
status, every task with the files in examples/, the page, /v2, /metrics, a problem+json; the
heaviest request of each kind on both workers at once with at most 480 MiB held by the processes;
every heavy kind at once with no OOM kill; ``docker stop`` while a
request runs. Run on its own file (``pytest tests/deploy/check_docker.py``); not part of ``make test``.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from app.core.limits import DYNO_MIB_PER_BIG_JOB
from bench.docker_image import (
    HEAVY_SIDE,
    KINDS,
    MIXED,
    REFUSALS,
    example_requests,
    heavy_requests,
    send_heavy,
    send_to_both_workers,
    stop_during_request,
)
from bench.dockerd import CONTAINER_USER_ID, Container, Docker, base_image, build_image, daemon, dyno
from bench.liveserver import free_port

pytestmark = pytest.mark.timeout(1800)  # the first run makes the base image and installs everything

IMAGE_TAG = "ml-inference-service:check"
# Of the dyno's 512 MiB, what the processes may hold at most (sampled every 20 ms) while the heaviest
# requests run. Page cache is not counted: the kernel takes it back before killing anything, and how
# much of it the container is charged for depends on what read the image's files first.
MEMORY_CEILING_MIB = 480
IMAGE_CEILING_MIB = 800  # TensorFlow or a build cache in the image would add hundreds of MiB
DYNO_NAME = "web.1"


@pytest.fixture(scope="module")
def docker() -> Iterator[Docker]:
    with daemon() as started:
        yield started


@pytest.fixture(scope="module")
def image(docker: Docker) -> str:
    base = base_image(docker)
    seconds = build_image(docker, IMAGE_TAG, base)
    print(f"\nimage {IMAGE_TAG} on {base}: built in {seconds:.0f} s, "
          f"{docker.image_size_mib(IMAGE_TAG):.0f} MiB", flush=True)
    return IMAGE_TAG


@pytest.fixture(scope="module")
def container(docker: Docker, image: str) -> Iterator[Container]:
    with dyno(docker, image, free_port(), dyno_name=DYNO_NAME) as running:
        seconds = running.wait_healthy()
        print(f"\nhealthy {seconds:.1f} s after start; memory {running.memory()}", flush=True)
        yield running


@pytest.fixture
def client(container: Container) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=container.base_url, timeout=60.0) as c:
        yield c


def shell(docker: Docker, image: str, script: str) -> str:
    """``script``'s output in a throw-away container of ``image``, run as root to see every file."""
    return docker.output("run", "--rm", "--network", "none", "--user", "0", "--entrypoint", "sh", image,
                         "-c", script)


# ---- the image -------------------------------------------------------------------------------------

def test_the_image_is_small_and_its_size_is_printed(docker, image):
    size = docker.image_size_mib(image)
    print(f"\nimage size: {size:.0f} MiB", flush=True)
    assert size < IMAGE_CEILING_MIB


def test_the_image_holds_the_service_and_no_tests_training_bench_or_caches(docker, image):
    top = shell(docker, image, "ls -A /app").split()
    assert {"app", "models", "gunicorn.conf.py", "var"} <= set(top)
    assert not {"tests", "training", "bench", "docs", "examples", ".git", "requirements-train.txt"} & set(top)
    assert "/app/models/digits/1.0.1" in shell(docker, image, "ls -d /app/models/*/*").split()  # for rollback
    assert not {"pip", "pip3"} & set(shell(docker, image, "ls /opt/venv/bin").split())
    leftovers = shell(docker, image, "find /app /opt/venv /home /root /tmp \\( -name tests -o -name .cache "
                                     "-o -name '*.whl' -o -name report \\) 2>/dev/null || true")
    assert leftovers == ""  # package test suites, pip caches, wheels, model training reports


def test_neither_the_ca_bundle_nor_the_package_index_is_left_in_the_image(docker, image):
    config = json.loads(docker.output("image", "inspect", image))[0]["Config"]
    assert not [v for v in config["Env"] if v.startswith(("PIP_", "REQUESTS_CA", "SSL_CERT"))]
    left = shell(docker, image, "ls /run/secrets /etc/pip.conf /etc/xdg/pip /root/.config/pip 2>&1 || true")
    assert left.count("No such file") == 4, left


def test_the_image_runs_as_a_user_who_cannot_write_the_code(docker, image, container):
    assert json.loads(docker.output("image", "inspect", image))[0]["Config"]["User"] == "app"
    status = docker.output("exec", container.name, "cat", "/proc/1/status")
    uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)", status, re.M).groups()
    assert uids == (str(CONTAINER_USER_ID), str(CONTAINER_USER_ID))
    assert "Read-only file system" in docker.run("exec", container.name, "touch", "/app/app/x", check=False).stderr


# ---- the running container -------------------------------------------------------------------------

def test_docker_reports_the_container_healthy_from_the_dockerfiles_own_check(container):
    state = container.inspect()
    assert state["State"]["Health"]["Status"] == "healthy"
    assert "/health/live" in " ".join(state["Config"]["Healthcheck"]["Test"])
    assert state["HostConfig"]["ReadonlyRootfs"] is True
    assert state["HostConfig"]["Memory"] == 512 * 2**20 and state["HostConfig"]["MemorySwap"] == 512 * 2**20


def test_the_service_started_without_an_error_in_its_log(container):
    lines = [json.loads(line) for line in container.logs(tail=400).splitlines() if line.startswith("{")]
    assert lines, container.logs()
    errors = [line for line in lines if line.get("level") in ("error", "critical", "ERROR", "CRITICAL")]
    assert errors == []


def test_every_example_file_gets_its_expected_answer(client):
    answers = {name: client.post(path, **kwargs) for name, (path, kwargs) in example_requests().items()}
    assert {name: r.status_code for name, r in answers.items()} == {name: 200 for name in answers}
    assert answers["digits"].json()["predictions"][0]["label"] == "7"
    assert answers["digits-drawn"].json()["predictions"][0]["label"] == "7"
    assert answers["emotion"].json()["predictions"][0]["label"] == "anger"
    assert Image.open(io.BytesIO(answers["segmentation"].content)).size == (256, 256)
    assert len(answers["palette"].json()["predictions"][0]["colors"]) == 4
    assert len(answers["clustering"].json()["predictions"]) == 6
    assert answers["fit"].json()["predictions"][0]["n_rows"] == 40


def test_the_web_page_and_its_modules_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    modules = re.findall(r'<script[^>]+src="([^"]+)"', page.text)
    assert modules
    for src in modules:
        script = client.get(src)
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]


def test_the_v2_protocol_answers(client):
    assert client.get("/v2").json()["name"] == "ml-inference-service"
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2/models/digits").json()["name"] == "digits"


def test_the_service_reads_the_dynos_memory_limit_and_bounds_its_big_jobs(client):
    places = client.get("/health/ready").json()["places"]
    assert places["places"] == 512 // DYNO_MIB_PER_BIG_JOB == 2, places  # from the cgroup's 512 MiB


def test_metrics_are_served_and_name_the_dyno(client):
    client.post("/v1/digits/predict", **example_requests()["digits"][1])
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    requests = [line for line in metrics.text.splitlines() if line.startswith("http_requests_total{")]
    assert requests and all(f'dyno="{DYNO_NAME}"' in line for line in requests)
    assert re.search(r'^predictions_total\{[^}]*model="digits"', metrics.text, re.M)


def test_a_bad_upload_gets_a_problem_json_naming_it(client):
    response = client.post("/v1/digits/predict", files={"image": ("x.png", b"not an image", "image/png")})
    assert 400 <= response.status_code < 500
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == response.status_code and problem["code"] and problem["detail"]


# ---- memory under the heaviest requests ------------------------------------------------------------

def check_answers(answers: list[dict]) -> None:
    """Each answer complete, or the service's designed refusal of more heavy work than a worker takes."""
    expected = {kind: n for kind, (_, _, n) in heavy_requests().items()}
    for answer in answers:
        assert answer["status"] == 200 or (answer["status"] == 503 and answer["code"] in REFUSALS), answer
        if answer["status"] == 200:
            assert answer["predictions"] == expected[answer["kind"]], answer


def report(what: str, answers: list[dict], memory: dict) -> None:
    print(f"\n{what}: {len(answers)} sent, {sum(a['status'] == 200 for a in answers)} answered 200; memory "
          f"peak {memory['peak_anon_mib']} MiB held by the processes, {memory['peak_working_set_mib']} MiB "
          f"working set, {memory['peak_usage_mib']} MiB usage (the kernel's peak, page cache included); "
          f"OOM kills {memory['oom_kills']}", flush=True)


def assert_no_oom_kill(container: Container, memory: dict) -> None:
    assert memory["oom_kills"] == 0
    assert not container.inspect()["State"]["OOMKilled"]
    assert "SIGKILL" not in container.logs(tail=1000)  # gunicorn reports a worker the kernel killed


def test_the_heaviest_request_of_each_kind_on_both_workers_stays_under_480_mib(container):
    with container.memory_sampled() as memory:
        answers = [answer for kind in KINDS for answer in send_to_both_workers(container, kind)]
    report("the heaviest request of each kind on both workers at once", answers, memory)
    check_answers(answers)
    assert {a["kind"] for a in answers if a["status"] == 200} == set(KINDS)
    assert_no_oom_kill(container, memory)
    assert memory["peak_anon_mib"] <= MEMORY_CEILING_MIB


def test_every_heavy_kind_at_once_is_answered_or_refused_without_an_oom_kill(container):
    with container.memory_sampled() as memory:
        answers = send_heavy(container.base_url, MIXED)
    report("every heavy kind twice at once, twice", answers, memory)
    check_answers(answers)
    assert sum(a["status"] == 200 for a in answers) >= len(answers) // 4
    assert_no_oom_kill(container, memory)


# ---- shutdown (last: it stops the container) -------------------------------------------------------

def test_docker_stop_during_a_request_answers_it_and_exits_0(container):
    stopped = stop_during_request(container, timeout=30)
    print(f"\ndocker stop during a segmentation: {stopped}", flush=True)
    assert stopped["in_flight_when_stopped"]
    assert stopped["status"] == 200 and stopped["mask_size"] == [HEAVY_SIDE, HEAVY_SIDE]
    assert stopped["exit_code"] == 0 and not stopped["oom_killed"]
    assert stopped["stop_s"] < 30  # not killed at the deadline
