"""Emotion through HTTP on a real server: accuracy/UAR on the held-out speakers, RSS, latency.

    .venv-train/bin/python -m bench.emotion [--requests 100] [--workers 1]

1. Accuracy and unweighted average recall (UAR) on every EmoDB file of the test speakers 03+16
   whose emotion the served model offers, each uploaded as its original WAV file, exactly as a
   client would (``bench/emotion_eval.py`` scores every held-out corpus and channel).
2. Worker RSS after warm-up (psutil on the gunicorn workers, the server process's children). The
   worker serves all four models, so this is the whole service's worker, not the emotion model alone.
3. Latency: ``--requests`` sequential uploads of one 3.0 s clip (16 kHz WAV), end to end from the
   client with the connection kept alive, after a warm-up.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import soundfile as sf

from bench.common import SHARED_DATA, percentiles, serving_python, write_results
from bench.liveserver import running_server

URL = "/v1/emotion/predict"
LETTER_TO_LABEL = {"W": "anger", "L": "boredom", "E": "disgust", "A": "fear", "F": "happiness",
                   "T": "sadness", "N": "neutral"}
TEST_SPEAKERS = ("03", "16")
LATENCY_CLIP = "16b10Td.wav"  # 3.93 s; the first 3.0 s are sent


def recall_scores(truth: list[str], predicted: list[str]) -> tuple[float, float, dict[str, float]]:
    truth_arr, pred_arr = np.array(truth), np.array(predicted)
    recall = {label: round(float((pred_arr[truth_arr == label] == label).mean()), 4)
              for label in LETTER_TO_LABEL.values() if (truth_arr == label).any()}
    return float((truth_arr == pred_arr).mean()), float(np.mean(list(recall.values()))), recall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "emodb" / "wav")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    all_files = sorted(p for p in args.data.glob("*.wav") if p.name[:2] in TEST_SPEAKERS)
    waveform, sr = sf.read(args.data / LATENCY_CLIP, dtype="float32")
    buffer = io.BytesIO()
    sf.write(buffer, waveform[:3 * sr], sr, format="WAV", subtype="PCM_16")
    clip_3s = buffer.getvalue()

    python = serving_python()
    with running_server(workers=args.workers, python=python) as server, \
            httpx.Client(base_url=server.base_url, timeout=60.0) as client:
        print(f"server up in {server.boot_seconds:.1f}s ({python or 'this interpreter'})", flush=True)
        models = client.get("/v1/models").json()["models"]
        version, offered = next((m["version"], m["labels"]) for m in models if m["task"] == "emotion")
        files = [p for p in all_files if LETTER_TO_LABEL[p.name[5]] in offered]
        truth = [LETTER_TO_LABEL[p.name[5]] for p in files]

        predicted, started = [], time.perf_counter()
        for i, path in enumerate(files):
            response = client.post(URL, files={"audio": (path.name, path.read_bytes(), "audio/wav")})
            response.raise_for_status()
            predicted.append(response.json()["predictions"][0]["label"])
            if (i + 1) % 30 == 0:
                print(f"  {i + 1:>3}/{len(files)} clips", flush=True)
        accuracy_seconds = time.perf_counter() - started
        accuracy, uar, recall = recall_scores(truth, predicted)
        print(f"speakers {'+'.join(TEST_SPEAKERS)} through HTTP: accuracy {accuracy:.2%}, "
              f"UAR {uar:.2%} ({len(files)} clips)", flush=True)

        for _ in range(10):
            client.post(URL, files={"audio": ("3s.wav", clip_3s, "audio/wav")}).raise_for_status()
        latency_ms = []
        for _ in range(args.requests):
            t0 = time.perf_counter()
            response = client.post(URL, files={"audio": ("3s.wav", clip_3s, "audio/wav")})
            latency_ms.append((time.perf_counter() - t0) * 1000.0)
            response.raise_for_status()
        latency = percentiles(latency_ms)
        print(f"3.0 s WAV clip: p50 {latency['p50_ms']:.1f} ms, p95 {latency['p95_ms']:.1f} ms "
              f"({args.requests} sequential requests)", flush=True)

        workers = [psutil.Process(pid) for pid in server.worker_pids()]
        rss_mib = [round(w.memory_info().rss / 2**20, 1) for w in workers]
        print(f"worker RSS after warm-up: {rss_mib} MiB", flush=True)

    write_results("emotion", {
        "model": "emotion", "version": version, "workers": args.workers,
        "serving_python": python or "training venv",
        "accuracy": {"dataset": f"EmoDB speakers {'+'.join(TEST_SPEAKERS)} (held out), every file of "
                                f"an emotion the model offers",
                     "n": len(files), "accuracy": round(accuracy, 4), "uar": round(uar, 4),
                     "per_class_recall": recall, "upload": "original WAV files, multipart",
                     "seconds": round(accuracy_seconds, 2)},
        "latency_3s_clip": {**latency, "clip": f"first 3.0 s of {LATENCY_CLIP}, 16 kHz PCM16 WAV"},
        "worker_rss_mib": rss_mib,
        "worker_rss_note": "whole worker after warm-up (all four models loaded), psutil RSS",
    })


if __name__ == "__main__":
    main()
