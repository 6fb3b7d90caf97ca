"""Hostile inputs against the real server (one worker, as on a 512 MiB dyno, unless stated): small,
well-formed uploads that would expand into a lot of memory or CPU, floods, guessed ids and leaks.

Each upload must be answered (2xx or 4xx) within 10 s with the worker's RSS growing by less than
200 MiB, while a light request made meanwhile still answers quickly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import json
import shutil
import statistics
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.core.limits import GATES
from bench.common import mnist_digit_png as digit_png
from bench.common import timed_post
from bench.hostile_inputs import (
    big_digit_png,
    flac_dc,
    flat_png,
    jpeg_scans,
    tiff_pages,
    wav_noise,
)
from bench.liveserver import LiveServer, MemorySampler, running_server
from tests.support import MODELS, wait_until

# Bounds in seconds are orders of magnitude, not speed checks (speed is measured by bench/hostile.py,
# figures in bench/results/hostile.json): a refusal from a header is ~0.05 s there and asserted under
# 1 s, where decoding the hostile file took 47-98 s; a digit beside a hostile request is ~0.05 s and
# asserted under LIGHT_MAX_SECONDS; every hostile request is answered within MAX_SECONDS.
MAX_SECONDS = 10.0
MAX_GROWTH_MIB = 200.0
LIGHT_MAX_SECONDS = 1.0  # ~20x the measured digit beside a hostile request
REFUSED_MAX_SECONDS = 1.0  # ~20x the measured refusals
BOUNDED_WORK_MAX_SECONDS = 2.0  # ~10x the measured first-page TIFF and pixel-budget refusals


@pytest.fixture(scope="module")
def one_worker() -> LiveServer:
    with running_server(workers=1) as live:
        yield live


@pytest.fixture(scope="module")
def mnist_digit_png() -> bytes:
    return digit_png()


def hostile(server: LiveServer, path: str, light_png: bytes, **kwargs) -> tuple[httpx.Response, float, float]:
    """POST a hostile request while a digit prediction is made on the side; return the response, its
    time and the worker's peak RSS growth. Asserts the light request stayed fast."""
    with MemorySampler(server) as memory, concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(timed_post, server.base_url, path, **kwargs)
        lights = []  # digits asked one after another for as long as the hostile request runs
        while not lights or not pending.done():
            lights.append(timed_post(server.base_url, "/v1/digits/predict",
                                     files={"image": ("7.png", light_png, "image/png")}))
        response, seconds = pending.result()
    assert all(light.status_code == 200 for light, _ in lights), [light.text for light, _ in lights]
    slowest = max(light_s for _, light_s in lights)
    assert slowest < LIGHT_MAX_SECONDS, f"a digit took {slowest:.2f} s meanwhile"
    return response, seconds, memory.peak_growth_mib


def assert_bounded(response: httpx.Response, seconds: float, growth: float) -> None:
    assert 200 <= response.status_code < 500, response.text
    assert seconds < MAX_SECONDS, f"answered after {seconds:.1f} s"
    assert growth < MAX_GROWTH_MIB, f"worker RSS grew by {growth:.0f} MiB"


# ---- audio ------------------------------------------------------------------------------------


def test_a_384_khz_flac_is_refused_from_its_header(one_worker, mnist_digit_png):
    data = flac_dc(384_000, 60.0)  # 80 KB for 23 M samples
    response, seconds, growth = hostile(one_worker, "/v1/emotion/predict", mnist_digit_png,
                                        files={"audio": ("dc.flac", data, "audio/flac")})
    assert_bounded(response, seconds, growth)
    assert (response.status_code, response.json()["code"]) == (422, "unsupported-sample-rate")
    assert seconds < REFUSED_MAX_SECONDS


def test_a_minute_at_192_khz_is_decoded_in_blocks_in_bounded_memory(one_worker, mnist_digit_png):
    data = flac_dc(192_000, 59.0)  # 11.3 M samples in 33 KB: decoded and resampled block by block
    response, seconds, growth = hostile(one_worker, "/v1/emotion/predict", mnist_digit_png,
                                        files={"audio": ("dc.flac", data, "audio/flac")})
    assert_bounded(response, seconds, growth)
    # Decoded whole (a minute of DC is no speech: refused after decoding, by the voice-activity step).
    assert (response.status_code, response.json()["code"]) == (422, "no-speech"), response.text
    assert growth < 60, f"worker RSS grew by {growth:.0f} MiB"


@pytest.mark.parametrize("rate", [383_999, 191_999])
def test_a_rate_coprime_with_16_khz_needs_no_giant_filter(one_worker, mnist_digit_png, rate):
    data = wav_noise(rate, 1.0)
    response, seconds, growth = hostile(one_worker, "/v1/emotion/predict", mnist_digit_png,
                                        files={"audio": ("odd.wav", data, "audio/wav")})
    assert_bounded(response, seconds, growth)
    # Above 192 kHz refused from the header; below, decoded and resampled, then found to be noise.
    expected = "unsupported-sample-rate" if rate > 192_000 else "no-speech"
    assert (response.status_code, response.json()["code"]) == (422, expected), response.text


def test_three_long_high_rate_clips_at_once_stay_bounded(one_worker, mnist_digit_png):
    data = flac_dc(192_000, 59.0)

    def post(_: int) -> httpx.Response:
        return httpx.post(one_worker.base_url + "/v1/emotion/predict", timeout=60.0,
                          files={"audio": ("dc.flac", data, "audio/flac")})

    with MemorySampler(one_worker) as memory, concurrent.futures.ThreadPoolExecutor(3) as pool:
        started = time.perf_counter()
        responses = list(pool.map(post, range(3)))
        seconds = time.perf_counter() - started
    assert [(r.status_code, r.json()["code"]) for r in responses] == [(422, "no-speech")] * 3  # decoded whole
    assert seconds < MAX_SECONDS
    assert memory.peak_growth_mib < 100, f"worker RSS grew by {memory.peak_growth_mib:.0f} MiB"


# ---- images -----------------------------------------------------------------------------------


def test_a_tiff_with_90_000_pages_is_read_from_its_first_page_only(one_worker, mnist_digit_png):
    data = tiff_pages(90_000)  # ~10 MB; counting its pages alone took 98 s before
    assert len(data) < 10 * 1024 * 1024
    response, seconds, growth = hostile(one_worker, "/v1/clustering/palette", mnist_digit_png,
                                        files={"image": ("pages.tif", data, "image/tiff")})
    assert_bounded(response, seconds, growth)
    assert response.status_code == 200, response.text
    assert seconds < BOUNDED_WORK_MAX_SECONDS


@pytest.mark.parametrize("path,field", [("/v1/segmentation/predict", "image"),
                                        ("/v1/digits/predict", "image"),
                                        ("/v1/clustering/palette", "image")])
def test_a_jpeg_with_75_000_scans_is_refused_before_decoding(one_worker, mnist_digit_png, path, field):
    data = jpeg_scans(75_000)  # ~0.9 MB; took 47 s to decode on segmentation before
    response, seconds, growth = hostile(one_worker, path, mnist_digit_png,
                                        files={field: ("scans.jpg", data, "image/jpeg")})
    assert_bounded(response, seconds, growth)
    assert (response.status_code, response.json()["code"]) == (422, "too-many-scans")
    assert response.json()["field"].startswith(field)
    assert seconds < REFUSED_MAX_SECONDS


def test_ordinary_progressive_jpegs_are_still_accepted(one_worker):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, "JPEG", progressive=True)
    response = httpx.post(one_worker.base_url + "/v1/clustering/palette",
                          files={"image": ("p.jpg", buffer.getvalue(), "image/jpeg")})
    assert response.status_code == 200, response.text


def test_256_digit_images_of_4096_pixels_square_are_refused_by_the_request_pixel_budget(
        one_worker, mnist_digit_png):
    png = big_digit_png(4096)  # ~22 KB each, 16.8 M pixels each
    files = [("image", (f"{i}.png", png, "image/png")) for i in range(256)]
    response, seconds, growth = hostile(one_worker, "/v1/digits/predict", mnist_digit_png, files=files)
    assert_bounded(response, seconds, growth)
    assert (response.status_code, response.json()["code"]) == (413, "request-too-large")
    assert seconds < BOUNDED_WORK_MAX_SECONDS
    within_budget = [("image", (f"{i}.png", png, "image/png")) for i in range(3)]
    response, seconds, growth = hostile(one_worker, "/v1/digits/predict", mnist_digit_png,
                                        files=within_budget)
    assert_bounded(response, seconds, growth)
    assert response.status_code == 200, response.text


def test_a_4096_pixel_square_palette_stays_in_bounded_memory(one_worker, mnist_digit_png):
    data = flat_png(4096, 16)
    response, seconds, growth = hostile(one_worker, "/v1/clustering/palette", mnist_digit_png,
                                        files={"image": ("bands.png", data, "image/png")},
                                        data={"colors": "16"})
    assert_bounded(response, seconds, growth)
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"][0]["colors"]) == 16
    assert growth < 120, f"worker RSS grew by {growth:.0f} MiB"


# ---- concurrency and admission ----------------------------------------------------------------


def test_twenty_concurrent_2048_segmentations_on_two_workers(mnist_digit_png):
    """Beyond one running and the queue per worker, heavy requests get a fast 503 with Retry-After;
    queued ones that could not finish are refused by their deadline; digits keep a p99 under 1 s
    and the dyno stays under 512 MiB."""
    segmentation = flat_png(2048, 4)  # 16 KB
    with running_server(workers=2) as two:
        def heavy(_: int) -> httpx.Response:
            return httpx.post(two.base_url + "/v1/segmentation/predict", timeout=60.0,
                              files={"image": ("big.png", segmentation, "image/png")})

        light_times: list[float] = []
        with MemorySampler(two, interval=0.5, pss=True) as memory, \
                concurrent.futures.ThreadPoolExecutor(20) as pool:
            started = time.perf_counter()
            pending = [pool.submit(heavy, i) for i in range(20)]
            while not all(p.done() for p in pending):
                response, seconds = timed_post(two.base_url, "/v1/digits/predict",
                                               files={"image": ("7.png", mnist_digit_png, "image/png")})
                assert response.status_code == 200
                light_times.append(seconds)
            responses = [p.result() for p in pending]
            total = time.perf_counter() - started
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) <= {200, 503}, statuses
        codes = [r.json()["code"] for r in responses if r.status_code == 503]
        assert set(codes) <= {"overloaded", "deadline-exceeded"}
        # Beyond the queue, a refusal is immediate; a queued request that could not finish in time
        # is refused no later than its deadline; none hangs towards the router's 30 s.
        overloaded = [r for r in responses if r.status_code == 503 and r.json()["code"] == "overloaded"]
        running, queue = GATES["heavy"][:2]
        assert len(overloaded) >= 20 - 2 * (running + queue)
        assert statuses.count(200) >= 2
        # Refused at once (milliseconds) rather than after a queue wait (the deadline, 25 s).
        assert all(r.elapsed.total_seconds() < 2.0 and int(r.headers["retry-after"]) > 0 for r in overloaded)
        assert all(r.elapsed.total_seconds() < 26.0 for r in responses)
        p99 = float(np.percentile(light_times, 99))
        # A digit queued behind the heavy gate would wait out a segmentation (seconds each); beside
        # it, on its own gate, a digit takes tens of milliseconds (the p99 is printed below).
        assert p99 < 1.0, f"digits p99 {p99:.2f} s over {len(light_times)} requests"
        assert total < 30.0
        print(f"2048 x 2048 x 20 on 2 workers: {statuses.count(200)} done, {len(overloaded)} refused at "
              f"once, digits p99 {p99:.3f} s over {len(light_times)}, peak {memory.peak_pss:.0f} MiB PSS")
        assert memory.peak_pss < 512, f"master + workers peaked at {memory.peak_pss:.0f} MiB PSS"


def test_readiness_reports_a_saturated_worker(one_worker):
    segmentation = flat_png(2048, 4)
    enough = sum(GATES["heavy"][:2]) + 1  # more than the gate runs and queues
    with concurrent.futures.ThreadPoolExecutor(enough) as pool:
        pending = [pool.submit(httpx.post, one_worker.base_url + "/v1/segmentation/predict",
                               files={"image": ("big.png", segmentation, "image/png")}, timeout=60.0)
                   for _ in range(enough)]
        # Asked until the worker reports the gate full (it does once the requests are in), or they end.
        ready = httpx.get(one_worker.base_url + "/health/ready")
        while ready.status_code == 200 and not all(p.done() for p in pending):
            time.sleep(0.05)  # a poll whose end is the requests' end, not a deadline of its own
            ready = httpx.get(one_worker.base_url + "/health/ready")
        [p.result() for p in pending]
    assert (ready.status_code, ready.json()["code"]) == (503, "saturated")
    assert ready.json()["saturated"] == ["heavy"]
    assert httpx.get(one_worker.base_url + "/health/ready").status_code == 200


def test_work_stops_at_the_deadline_and_frees_the_worker(mnist_digit_png):
    segmentation = flat_png(2048, 4)  # 64 tiles each, four of them: seconds of work on any CPU; the deadline is 1 s
    with running_server(workers=1, env={"REQUEST_TIMEOUT_S": "1"}) as live:
        response, seconds = timed_post(live.base_url, "/v1/segmentation/predict", params={"format": "json"},
                                       files=[("image", (f"{i}.png", segmentation, "image/png")) for i in range(4)])
        assert (response.status_code, response.json()["code"]) == (503, "deadline-exceeded")
        # Answered once the tile running at the deadline ends, not after the other tiles: a bound
        # several times under the whole run's time.
        assert seconds < 4.0
        # The heavy gate is free again at once: the tiles stopped, they did not run on.
        gates = httpx.get(live.base_url + "/health/ready").json()["gates"]
        assert gates["heavy"]["running"] == 0 and gates["heavy"]["waiting"] == 0
        response = httpx.post(live.base_url + "/v1/segmentation/predict",
                              files={"image": ("small.png", flat_png(256, 4), "image/png")})
        assert response.status_code == 200


def test_a_client_that_goes_away_stops_its_work(mnist_digit_png):
    segmentation = flat_png(2048, 4)
    with running_server(workers=1) as live:
        with pytest.raises(httpx.ReadTimeout):  # four 2048 x 2048 images: seconds of work on any CPU
            httpx.post(live.base_url + "/v1/segmentation/predict?format=json", timeout=1.0,
                       files=[("image", (f"big-{i}.png", segmentation, "image/png")) for i in range(4)])
        # The next tile checks the deadline, finds the client gone and stops: logged, gate free.
        assert wait_until(lambda: "client went away" in live.log_text(), 10)
        gates = httpx.get(live.base_url + "/health/ready").json()["gates"]
        assert gates["heavy"]["running"] == 0
        response = httpx.post(live.base_url + "/v1/segmentation/predict",
                              files={"image": ("small.png", flat_png(256, 4), "image/png")})
        assert response.status_code == 200


def test_a_burst_of_health_checks_does_not_recycle_the_worker_under_heavy_work(one_worker,
                                                                              mnist_digit_png):
    (pid,) = one_worker.worker_pids()
    segmentation = flat_png(2048, 4)

    async def burst() -> list[float]:
        async with httpx.AsyncClient(base_url=one_worker.base_url, timeout=30.0) as client:
            heavy = asyncio.ensure_future(client.post("/v1/segmentation/predict",
                                                      files={"image": ("b.png", segmentation, "image/png")}))
            gaps, last = [], time.perf_counter()
            for _ in range(44):
                await asyncio.gather(*[client.get("/health/live") for _ in range(50)])
                now = time.perf_counter()
                gaps.append(now - last)
                last = now
            assert (await heavy).status_code == 200
            return gaps

    gaps = asyncio.run(burst())  # 2 200 health checks, as many as once reached max_requests
    # 50 checks take ~0.2 s; a worker being replaced (models reloaded) stalls them for many seconds.
    assert max(gaps) < 5.0, f"a stall of {max(gaps):.1f} s"
    assert one_worker.worker_pids() == [pid]


# ---- feedback ---------------------------------------------------------------------------------


def test_a_feedback_flood_for_unknown_ids_does_not_slow_predictions(one_worker, mnist_digit_png):
    """3 000 feedback posts for made-up ids at concurrency 50, predictions made meanwhile."""
    async def flood() -> tuple[list[int | str], list[float], float]:
        limits = httpx.Limits(max_connections=60, max_keepalive_connections=60)
        async with httpx.AsyncClient(base_url=one_worker.base_url, timeout=30.0, limits=limits) as client:
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(3000):
                queue.put_nowait(i)
            statuses: list[int | str] = []

            async def sender() -> None:
                while not queue.empty():
                    i = queue.get_nowait()
                    response = await client.post("/v1/feedback", json={
                        "request_id": f"user-42-upload-{i}", "label": "7"})
                    statuses.append(response.status_code if response.status_code != 429
                                    else response.json()["code"])

            async def predictions() -> list[float]:
                times = []
                while not queue.empty():
                    started = time.perf_counter()
                    response = await client.post("/v1/digits/predict",
                                                 files={"image": ("7.png", mnist_digit_png, "image/png")})
                    assert response.status_code == 200
                    times.append(time.perf_counter() - started)
                return times

            started = time.perf_counter()
            results = await asyncio.gather(predictions(), *[sender() for _ in range(50)])
            return statuses, results[0], time.perf_counter() - started

    statuses, latencies, seconds = asyncio.run(flood())
    # Each is the 404 of an unknown id, or, when this one client has more than UPLOADS_PER_CLIENT
    # bodies still arriving at once (a loaded machine reads them slower), the designed 429.
    assert len(statuses) == 3000 and set(statuses) <= {404, "too-many-uploads"}
    assert statuses.count(404) >= 2700
    assert seconds < 120.0  # only that the flood ends; what it must not do is slow predictions (below)
    assert len(latencies) >= 10
    # The load generator shares the server's 2 cores; a post that held a thread while it waited for
    # the unknown id would push the digits p50 to seconds.
    assert statistics.median(latencies) < 0.5, f"digits p50 {statistics.median(latencies):.3f} s"


def test_request_ids_cannot_be_chosen_guessed_or_shared(one_worker, mnist_digit_png):
    def predict(correlation: str) -> httpx.Response:
        return httpx.post(one_worker.base_url + "/v1/digits/predict", headers={"X-Request-ID": correlation},
                          files={"image": ("7.png", mnist_digit_png, "image/png")})

    first, second = predict("user-42-upload-7"), predict("user-42-upload-7")
    ids = [first.json()["request_id"], second.json()["request_id"]]
    assert ids[0] != ids[1] and "user-42-upload-7" not in ids
    assert first.headers["x-correlation-id"] == "user-42-upload-7"
    # The client-chosen id is no key: feedback on it is refused, as is a near miss of a real id.
    for guess in ("user-42-upload-7", ids[0][:-1] + ("0" if ids[0][-1] != "0" else "1")):
        response = httpx.post(one_worker.base_url + "/v1/feedback", json={"request_id": guess, "label": "7"})
        assert response.status_code == 404, response.text
    # The owner labels its prediction; a second label does not reveal the first.
    owner = httpx.post(one_worker.base_url + "/v1/feedback", json={"request_id": ids[0], "label": "3"})
    assert owner.status_code == 201, owner.text
    again = httpx.post(one_worker.base_url + "/v1/feedback", json={"request_id": ids[0], "label": "7"})
    assert again.status_code == 200 and again.json()["replaced"] is True
    assert '"3"' not in again.text


# ---- no 500, no leaks -------------------------------------------------------------------------


def test_inputs_that_used_to_give_500s_are_4xx(one_worker):
    huge_int = b'{"instances": [{"pixels": [[' + b"1" * 5000 + b"]]}]}"
    digits = httpx.post(one_worker.base_url + "/v1/digits/predict", content=huge_int,
                        headers={"content-type": "application/json"})
    assert (digits.status_code, digits.json()["code"]) == (400, "malformed-json"), digits.text
    rows = [[1e308, 1e308], [-1e308, 1e308], [1e308, -1e308], [0.0, 1.0], [1.0, 0.0]]
    for scale in (True, False):
        fit = httpx.post(one_worker.base_url + "/v1/clustering/fit",
                         json={"data": rows, "k": 2, "scale": scale})
        assert (fit.status_code, fit.json()["code"]) == (422, "value-out-of-range"), fit.text
    predict = httpx.post(one_worker.base_url + "/v1/clustering/predict",
                         json={"instances": [{"annual_income": 1e308, "spending_score": -1e308}]})
    assert (predict.status_code, predict.json()["code"]) == (422, "value-out-of-range"), predict.text
    for big in (b"1" * 5000, b"1e400", b"-1e400"):
        body = b'{"instances": [{"annual_income": ' + big + b', "spending_score": 3}]}'
        response = httpx.post(one_worker.base_url + "/v1/clustering/predict", content=body,
                              headers={"content-type": "application/json"})
        assert 400 <= response.status_code < 500, response.text


def test_every_line_the_server_printed_is_one_json_object(one_worker):
    lines = [line for line in one_worker.log_text().splitlines() if line.strip()]
    assert lines
    for line in lines:
        entry = json.loads(line)
        assert {"ts", "level", "logger", "msg"} <= set(entry)


def test_no_redirect_echoes_the_host_header(one_worker):
    response = httpx.get(one_worker.base_url + "/v1/models/", headers={"Host": "evil.example"},
                         follow_redirects=False)
    assert response.status_code == 404
    assert "location" not in response.headers
    assert "evil.example" not in response.text


def test_forwarded_headers_are_trusted_only_from_the_configured_proxies():
    spoof = {"X-Forwarded-For": "203.0.113.9", "X-Request-ID": "xff-check"}
    with running_server(workers=1, env={"FORWARDED_ALLOW_IPS": "192.0.2.1"}) as live:
        httpx.get(live.base_url + "/health/live", headers=spoof)
        untrusted = _access_entry(live, "xff-check")
    with running_server(workers=1) as live:  # the default trusts loopback only
        httpx.get(live.base_url + "/health/live", headers=spoof)
        trusted = _access_entry(live, "xff-check")
    assert untrusted["client"] == "127.0.0.1"
    assert trusted["client"] == "203.0.113.9"


def _access_entry(live: LiveServer, correlation_id: str) -> dict:
    return live.access_entries(correlation_id)[0]


def test_a_model_that_fails_to_load_leaks_no_server_path(tmp_path):
    models = tmp_path / "models"
    shutil.copytree(MODELS, models)
    for version in (models / "digits").iterdir():
        (version / "model.tflite").write_bytes(b"not a model")
    with running_server(workers=1, ready=False, env={"MODELS_DIR": str(models)}) as live:
        responses = [httpx.get(live.base_url + "/health/ready"), httpx.get(live.base_url + "/v1/models"),
                     httpx.post(live.base_url + "/v1/digits/predict",
                                files={"image": ("a.png", big_digit_png(64), "image/png")})]
    assert [r.status_code for r in responses] == [503, 200, 503]
    for response in responses:
        assert str(tmp_path) not in response.text
        assert str(Path.cwd()) not in response.text
        assert "/tmp/" not in response.text and "/work/" not in response.text
    assert "digits" in responses[0].json()["not_ready"]
