"""The Docker image as a Heroku-sized dyno: image size, build time, boot to healthy, and the
container's memory after one request per task and while the heaviest requests run (each kind on
both workers at once, then every kind at once), under
``--memory 512m --memory-swap 512m --cpus 1 --read-only`` with the image's two workers.

Memory is the container's cgroup: the working set (usage less the page cache the kernel takes back
first, what ``docker stats`` shows), sampled every 20 ms, and the OOM kills. The kernel's own peak
of the usage is recorded too, but it counts page cache charged to whichever cgroup first read a file
(after a fresh build, the build's), so it varies by over 100 MiB with what ran before.

    python -m bench.docker_image     # needs Debian's docker.io and debootstrap (make docker-test installs them)

Writes bench/results/docker.json, then the deployment figures into app.json and docs/deploy.md
(bench/deploy_figures.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import io
import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import soundfile as sf
from PIL import Image

from bench import deploy_figures
from bench.common import REPO_ROOT, served_versions, write_results
from bench.dockerd import Container, base_image, build_image, daemon, dyno
from bench.liveserver import free_port

EXAMPLES = REPO_ROOT / "examples"
IMAGE_TAG = "ml-inference-service:check"
HEAVY_SIDE = 2048  # SEGMENTATION_MAX_SIDE
AUDIO_SECONDS = 60  # MAX_AUDIO_SECONDS
CLIPS = 5  # 60 s clips in one request: 9.2 MiB of 16 kHz WAV, the most under MAX_UPLOAD_MB (10)
REFUSALS = ("overloaded", "deadline-exceeded")  # the designed answers to more heavy work than fits


def read(name: str) -> bytes:
    return (EXAMPLES / name).read_bytes()


def example_requests() -> dict[str, tuple[str, dict[str, Any]]]:
    """One request per endpoint with the files in examples/, as the curl lines in docs/api.md send them."""
    return {
        "digits": ("/v1/digits/predict", {"files": {"image": ("digit-7.png", read("digit-7.png"), "image/png")}}),
        "digits-drawn": ("/v1/digits/predict", {"content": read("digit-7-drawn.png"),
                                                "headers": {"content-type": "image/png"}}),
        "emotion": ("/v1/emotion/predict",
                    {"files": {"audio": ("a.wav", read("emodb-08a01Wa-anger.wav"), "audio/wav")}}),
        "segmentation": ("/v1/segmentation/predict",
                         {"files": {"image": ("m.png", read("membrane-slice3-crop.png"), "image/png")}}),
        "palette": ("/v1/clustering/palette", {"data": {"colors": "4"},
                                               "files": {"image": ("sunset.png", read("sunset.png"), "image/png")}}),
        "clustering": ("/v1/clustering/predict", {"content": read("mall-customers.json"),
                                                  "headers": {"content-type": "application/json"}}),
        "fit": ("/v1/clustering/fit", {"content": read("mall-fit.json"),
                                       "headers": {"content-type": "application/json"}}),
    }


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def tiled(name: str, side: int, flip: bool = False) -> np.ndarray:
    """An example image repeated to ``side`` x ``side`` (upside down with ``flip``): real content at
    the largest size a task takes, compressing well enough for several to fit in one body."""
    image = np.asarray(Image.open(EXAMPLES / name))
    if flip:
        image = image[::-1]
    reps = [-(-side // image.shape[0]), -(-side // image.shape[1])] + [1] * (image.ndim - 2)
    return np.ascontiguousarray(np.tile(image, reps)[:side, :side])


def long_speech(seconds: float) -> bytes:
    """The EmoDB example utterance looped to ``seconds``, 16 kHz 16-bit WAV."""
    speech, rate = sf.read(EXAMPLES / "emodb-08a01Wa-anger.wav", dtype="int16")
    buffer = io.BytesIO()
    sf.write(buffer, np.resize(speech, int(seconds * rate)), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


@functools.lru_cache(maxsize=1)
def heavy_requests() -> dict[str, tuple[str, dict[str, Any], int]]:
    """The heaviest request of each heavy endpoint, with the number of predictions it answers: a
    2048 x 2048 segmentation, five 60 s clips, a 10 000 x 50 fit scanning k 2-20 (every limit at its
    maximum) and four 2048 x 2048 palettes."""
    clip = long_speech(AUDIO_SECONDS)
    data = np.round(np.random.default_rng(0).normal(size=(10_000, 50)), 2).tolist()
    sunsets = [png(tiled("sunset.png", HEAVY_SIDE, flip=bool(i % 2))) for i in range(4)]
    return {
        "segmentation": ("/v1/segmentation/predict",
                         {"files": {"image": ("m.png", png(tiled("membrane-slice3-crop.png", HEAVY_SIDE)),
                                              "image/png")}}, 1),
        "emotion": ("/v1/emotion/predict",
                    {"files": [("audio", (f"a{i}.wav", clip, "audio/wav")) for i in range(CLIPS)]}, CLIPS),
        "fit": ("/v1/clustering/fit", {"json": {"data": data, "k_min": 2, "k_max": 20}}, 1),
        "palette": ("/v1/clustering/palette",
                    {"data": {"colors": "16"},
                     "files": [("image", (f"s{i}.png", image, "image/png")) for i, image in enumerate(sunsets)]}, 4),
    }


def post_heavy(kind: str, client: httpx.Client) -> dict[str, Any]:
    """One of :func:`heavy_requests` on ``client``: kind, status (None: the connection was cut, its
    worker killed), problem code, predictions, seconds."""
    path, kwargs, _ = heavy_requests()[kind]
    started = time.monotonic()
    try:
        response = client.post(path, **kwargs)
    except httpx.TransportError as exc:
        return {"kind": kind, "status": None, "code": None, "predictions": 0, "error": repr(exc),
                "seconds": round(time.monotonic() - started, 2)}
    is_json = response.headers.get("content-type", "").endswith("json")
    body = response.json() if is_json else {}
    predictions = len(body.get("predictions") or []) if is_json else int(response.content[:4] == b"\x89PNG")
    return {"kind": kind, "status": response.status_code, "code": body.get("code"),
            "predictions": predictions, "seconds": round(time.monotonic() - started, 2)}


def send_heavy(base_url: str, plan: list[list[str]]) -> list[dict[str, Any]]:
    """:func:`heavy_requests` batch by batch, each batch's requests at once on connections of their
    own (each worker takes whichever it accepts first). One record per request (:func:`post_heavy`)."""
    def send(kind: str) -> dict[str, Any]:
        with httpx.Client(base_url=base_url, timeout=120.0) as client:
            return post_heavy(kind, client)

    answers = []
    for batch in plan:
        with concurrent.futures.ThreadPoolExecutor(len(batch)) as pool:
            answers += list(pool.map(send, batch))
    return answers


def answers_per_worker(container: Container, route: str) -> dict[str, float]:
    """How many 200 answers each worker (by pid) has given on ``route``, from the workers'
    prometheus multiprocess files (one per pid), read through the container's root in /proc."""
    from prometheus_client.mmap_dict import MmapedDict

    root = Path(f"/proc/{container.inspect()['State']['Pid']}/root")
    counts: dict[str, float] = {}
    for path in root.glob("tmp/prom-multiproc-*/counter_*.db"):
        pid = path.stem.rsplit("_", 1)[1]
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
            _, name, labels, _ = json.loads(key)
            if name == "http_requests_total" and labels.get("status") == "200" and labels.get("route") == route:
                counts[pid] = counts.get(pid, 0) + value
    return counts


def worker_clients(container: Container, tries: int = 10, at_once: int = 8) -> list[httpx.Client]:
    """Two clients, each with one keep-alive connection, held by a different worker. A connection
    goes to whichever worker accepts it, and one opened while the workers are idle mostly goes to
    the same one; so ``at_once`` connections are opened together (a cheap request on each, sent at
    the same moment), then each one's worker is read from the counters, one request at a time."""
    for _ in range(tries):
        opened = [httpx.Client(base_url=container.base_url, timeout=120.0,
                               limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
                  for _ in range(at_once)]
        with concurrent.futures.ThreadPoolExecutor(at_once) as pool:
            for response in pool.map(lambda c: c.get("/v1/models"), opened):
                response.raise_for_status()
        clients: dict[str, httpx.Client] = {}
        for client in opened:
            before = answers_per_worker(container, "/v1/models")
            client.get("/v1/models").raise_for_status()
            after = answers_per_worker(container, "/v1/models")
            (pid,) = [pid for pid in after if after[pid] > before.get(pid, 0)]
            if pid in clients:
                client.close()
            else:
                clients[pid] = client
        if len(clients) == 2:
            return list(clients.values())
        for client in clients.values():
            client.close()
    raise AssertionError(f"{tries} times {at_once} connections at once, all to one worker")


def on_two_workers(container: Container, clients: list[httpx.Client]) -> bool:
    """Whether a cheap request on each client reaches a different worker, now."""
    before = answers_per_worker(container, "/v1/models")
    for client in clients:
        client.get("/v1/models").raise_for_status()
    after = answers_per_worker(container, "/v1/models")
    return len([pid for pid in after if after[pid] > before.get(pid, 0)]) == len(clients)


def send_to_both_workers(container: Container, kind: str, attempts: int = 6) -> list[dict[str, Any]]:
    """``kind`` twice at once, one on each worker (checked from the workers' counters; tried again
    if a held connection was closed meanwhile, its keep-alive being 5 s). Returns every answer."""
    route = heavy_requests()[kind][0].split("?")[0]
    answers: list[dict[str, Any]] = []
    for _ in range(attempts):
        clients = worker_clients(container)
        try:
            if not on_two_workers(container, clients):  # the first one idled past its keep-alive
                continue
            before = answers_per_worker(container, route)
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                answers += list(pool.map(lambda client: post_heavy(kind, client), clients))
            after = answers_per_worker(container, route)
        finally:
            for client in clients:
                client.close()
        if len([pid for pid in after if after[pid] > before.get(pid, 0)]) == 2:
            return answers
    raise AssertionError(f"{kind}: never answered by both workers at once in {attempts} attempts: {answers}")


KINDS = ("segmentation", "emotion", "fit", "palette")
# Then every kind twice at once, twice: a worker runs a heavy job and an audio job side by side
# (two admission gates), so both workers may hold a fit and five clips at the same moment.
MIXED = [list(KINDS) * 2] * 2


def stop_during_request(container: Container, timeout: int = 30) -> dict[str, Any]:
    """``docker stop -t timeout`` a second into a 2048 x 2048 segmentation (seconds of work on one
    CPU): the segmentation's answer, how long the stop took and how the container exited."""
    import threading

    body = png(tiled("membrane-slice3-crop.png", HEAVY_SIDE))
    answer: dict[str, Any] = {}

    def segment() -> None:
        try:
            answer["response"] = httpx.post(container.base_url + "/v1/segmentation/predict", timeout=60.0,
                                            files={"image": ("m.png", body, "image/png")})
        except httpx.TransportError as exc:
            answer["error"] = repr(exc)

    request = threading.Thread(target=segment)
    request.start()
    time.sleep(1.0)
    in_flight = request.is_alive()
    seconds = container.stop(timeout)
    request.join(60)
    response = answer.get("response")
    state = container.inspect()["State"]
    return {"in_flight_when_stopped": in_flight, "status": response.status_code if response else None,
            "mask_size": list(Image.open(io.BytesIO(response.content)).size)
            if response is not None and response.status_code == 200 else None,
            "error": answer.get("error"), "stop_s": round(seconds, 1), "exit_code": state["ExitCode"],
            "oom_killed": state["OOMKilled"]}


def measure(container: Container) -> dict[str, Any]:
    """Memory after boot, after one request per task, while each heavy kind runs on both workers at
    once (:func:`send_to_both_workers`), and through :data:`MIXED`."""
    after_boot = container.memory()
    models = served_versions(container.base_url)
    for path, kwargs in example_requests().values():
        httpx.post(container.base_url + path, timeout=60.0, **kwargs).raise_for_status()
    after_one = container.memory()
    with container.memory_sampled() as pairs:
        pair_answers = [answer for kind in KINDS for answer in send_to_both_workers(container, kind)]
    with container.memory_sampled() as mixed:
        mixed_answers = send_heavy(container.base_url, MIXED)
    return {"models": models, "after_boot": after_boot, "after_one_request_per_task": after_one,
            "heaviest_of_each_kind_on_both_workers": pairs, "every_heavy_kind_at_once": mixed,
            "answers": {"pairs": pair_answers, "mixed": mixed_answers}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-write-docs", action="store_true", help="only write bench/results/docker.json")
    args = parser.parse_args()
    with daemon() as docker:
        base = base_image(docker)
        build_s = build_image(docker, IMAGE_TAG, base)
        size = docker.image_size_mib(IMAGE_TAG)
        with dyno(docker, IMAGE_TAG, free_port()) as container:
            healthy_s = container.wait_healthy()
            memory = measure(container)
            stopped = stop_during_request(container)
    answers = memory.pop("answers")
    models = memory.pop("models")
    results = {
        "base_image": base, "image_mib": round(size, 1), "build_s": round(build_s, 1),
        "container": "--memory 512m --memory-swap 512m --cpus 1 --read-only, WEB_CONCURRENCY=2",
        "boot_to_healthy_s": round(healthy_s, 1), "models": models,
        "memory_mib": memory,
        "heavy_requests": {phase: {"sent": len(sent), "answered_200": sum(a["status"] == 200 for a in sent),
                                   "refused": {code: sum(a["code"] == code for a in sent) for code in REFUSALS},
                                   "answers": sent} for phase, sent in answers.items()},
        "docker_stop_during_a_segmentation": stopped,
    }
    write_results("docker", results)
    if not args.no_write_docs:
        deploy_figures.write()


if __name__ == "__main__":
    main()
