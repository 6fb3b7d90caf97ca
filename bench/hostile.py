"""Hostile uploads against the real server: time to answer and the worker's peak RSS growth for
each, a light request's latency meanwhile, and 20 concurrent 2048 x 2048 segmentations on two
workers (digits p99, peak PSS). Writes bench/results/hostile.json.

    python -m bench.hostile
"""

from __future__ import annotations

import concurrent.futures
import time

import numpy as np

from bench.common import (
    mnist_digit_png,
    serving_python,
    timed_post,
    write_results,
)
from bench.hostile_inputs import (
    big_digit_png,
    flac_dc,
    flat_png,
    jpeg_scans,
    tiff_pages,
    wav_noise,
)
from bench.liveserver import MemorySampler, running_server


def main() -> None:
    light = mnist_digit_png()
    cases = {
        "flac 384 kHz, 60 s of DC (80 KB)": ("/v1/emotion/predict", {"files": {"audio": ("a.flac", flac_dc(384_000, 60), "audio/flac")}}),
        "flac 192 kHz, 59 s of DC (33 KB)": ("/v1/emotion/predict", {"files": {"audio": ("a.flac", flac_dc(192_000, 59), "audio/flac")}}),
        "wav 1 s at 383 999 Hz (750 KB)": ("/v1/emotion/predict", {"files": {"audio": ("a.wav", wav_noise(383_999, 1), "audio/wav")}}),
        "wav 1 s at 191 999 Hz": ("/v1/emotion/predict", {"files": {"audio": ("a.wav", wav_noise(191_999, 1), "audio/wav")}}),
        "tiff with 90 000 pages (10 MB), palette": ("/v1/clustering/palette", {"files": {"image": ("a.tif", tiff_pages(90_000), "image/tiff")}}),
        "jpeg with 75 000 scans (0.9 MB), segmentation": ("/v1/segmentation/predict", {"files": {"image": ("a.jpg", jpeg_scans(75_000), "image/jpeg")}}),
        "256 digit PNGs of 4096 x 4096 (5.6 MB)": ("/v1/digits/predict", {"files": [("image", (f"{i}.png", big_digit_png(), "image/png")) for i in range(256)]}),
        "palette of a 4096 x 4096 PNG, 16 colours": ("/v1/clustering/palette", {"files": {"image": ("a.png", flat_png(4096, 16), "image/png")}, "data": {"colors": "16"}}),
        "segmentation of a 2048 x 2048 PNG (16 KB)": ("/v1/segmentation/predict", {"files": {"image": ("a.png", flat_png(2048, 4), "image/png")}}),
    }
    results = {}
    with running_server(workers=1, python=serving_python()) as live:
        for name, (path, kwargs) in cases.items():
            with MemorySampler(live) as memory, concurrent.futures.ThreadPoolExecutor(1) as pool:
                pending = pool.submit(timed_post, live.base_url, path, **kwargs)
                time.sleep(0.3)
                _, light_s = timed_post(live.base_url, "/v1/digits/predict", files={"image": ("7.png", light, "image/png")})
                response, seconds = pending.result()
            code = response.json().get("code") if response.headers.get("content-type", "").endswith("json") and response.status_code >= 400 else ""
            results[name] = {"status": response.status_code, "code": code, "seconds": round(seconds, 3),
                             "worker_rss_growth_mib": round(memory.peak_growth_mib, 1),
                             "digit_meanwhile_s": round(light_s, 3)}
            print(name, results[name], flush=True)

    segmentation = flat_png(2048, 4)
    with running_server(workers=2, python=serving_python()) as two:
        baseline = two.pss_mib()
        light_times: list[float] = []
        with MemorySampler(two, interval=0.5, pss=True) as memory, concurrent.futures.ThreadPoolExecutor(20) as pool:
            pending = [pool.submit(timed_post, two.base_url, "/v1/segmentation/predict",
                                   files={"image": ("b.png", segmentation, "image/png")}) for _ in range(20)]
            while not all(p.done() for p in pending):
                _, seconds = timed_post(two.base_url, "/v1/digits/predict", files={"image": ("7.png", light, "image/png")})
                light_times.append(seconds)
            answers = [p.result() for p in pending]
        codes = [r.json()["code"] if r.status_code != 200 else "ok" for r, _ in answers]
        results["20 concurrent 2048 x 2048 segmentations, 2 workers"] = {
            "completed": codes.count("ok"), "overloaded": codes.count("overloaded"),
            "deadline_exceeded": codes.count("deadline-exceeded"),
            "refusal_seconds_max": round(max((s for (r, s), c in zip(answers, codes) if c == "overloaded"), default=0), 3),
            "slowest_answer_s": round(max(s for _, s in answers), 2),
            "digits_requests": len(light_times), "digits_p50_s": round(float(np.percentile(light_times, 50)), 3),
            "digits_p99_s": round(float(np.percentile(light_times, 99)), 3),
            "pss_before_mib": round(baseline), "peak_pss_mib": round(memory.peak_pss),
            "pss_after_mib": round(two.pss_mib())}
        print(results["20 concurrent 2048 x 2048 segmentations, 2 workers"])
    write_results("hostile", {"server": "gunicorn, 1 worker (2 for the last case)", "cases": results})


if __name__ == "__main__":
    main()
