"""Emotion models scored through HTTP on every held-out corpus and channel, as clients send them.

    .venv-dev/bin/python -m bench.emotion_eval [--versions 1.5.0,1.4.0] [--requests 100] [--limit N]

For each version a real server is started (``running_server``, one worker) with that version pinned
(``MODEL_VERSIONS='{"emotion": "<version>"}'``) and every clip is uploaded to
``POST /v1/emotion/predict`` as a file, one request per clip:

- EmoDB speakers 03+16 (German, held out): the original WAV files; and the same clips through the
  channels of ``training/audio_channels.py``: telephone (300-3400 Hz, 8 kHz mu-law WAV), Opus at
  24 kbit/s (WebM, as a browser records), white noise at 15 dB SNR and 30 dB quieter (16-bit WAV);
- nEMO speakers KD0+SM0 (Polish, held out): the original Ogg/Opus files;
- the RAVDESS speech subset (English, evaluation only): the original WAV files.

Each version is scored on the clips whose emotion it offers (its ``/v1/models`` labels): accuracy,
unweighted average recall (UAR), expected calibration error (15 equal-width bins), mean
confidence, per-class recall, and how many speech clips were refused (any answer but 200).
Then the latency of one 3.0 s WAV clip (sequential requests, connection kept alive, after a
warm-up). Writes ``bench/results/emotion_eval.json``.
"""

from __future__ import annotations

import argparse
import csv
import io
import time

import httpx
import numpy as np
import soundfile as sf

from bench.common import (
    SHARED_DATA,
    cpu_model,
    percentiles,
    serving_python,
    write_results,
)
from bench.liveserver import serving_version
from training import audio_channels as channels
from training.common import expected_calibration_error

URL = "/v1/emotion/predict"
BINS = 15
SEED = 42
EMODB_LETTERS = {"W": "anger", "L": "boredom", "E": "disgust", "A": "fear", "F": "happiness",
                 "T": "sadness", "N": "neutral"}
NEMO_LABELS = {"anger": "anger", "fear": "fear", "happiness": "happiness", "neutral": "neutral",
               "sadness": "sadness", "surprised": "surprise"}
RAVDESS_LABELS = {"01": "neutral", "03": "happiness", "04": "sadness", "05": "anger", "06": "fear",
                  "07": "disgust", "08": "surprise"}
LATENCY_CLIP = "16b10Td.wav"  # 3.93 s; the first 3.0 s are sent


def wav_bytes(waveform: np.ndarray, rate: int = channels.RATE) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, waveform, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


# ---- the sets: (file name, bytes, true label) ----------------------------------------------------
Clip = tuple[str, bytes, str]


def emodb_sets(limit: int) -> dict[str, list[Clip]]:
    paths = sorted(p for p in (SHARED_DATA / "emodb" / "wav").glob("*.wav") if p.name[:2] in ("03", "16"))
    paths = paths[:limit] if limit else paths
    labels = [EMODB_LETTERS[p.name[5]] for p in paths]
    waves = [sf.read(p, dtype="float32")[0] for p in paths]  # EmoDB is 16 kHz mono
    rng = np.random.default_rng(SEED)  # the same noise as training/emotion.py's channel copies
    return {
        "EmoDB 03+16": [(p.name, p.read_bytes(), y) for p, y in zip(paths, labels)],
        "EmoDB 03+16 telephone": [(p.stem + ".wav", channels.telephone_wav_bytes(w), y)
                                  for p, w, y in zip(paths, waves, labels)],
        "EmoDB 03+16 opus 24 kbit/s": [(p.stem + ".webm", channels.opus_bytes(w, 24_000), y)
                                       for p, w, y in zip(paths, waves, labels)],
        "EmoDB 03+16 noise 15 dB SNR": [(p.name, wav_bytes(channels.add_noise(w, 15.0, rng)), y)
                                        for p, w, y in zip(paths, waves, labels)],
        "EmoDB 03+16 30 dB quieter": [(p.name, wav_bytes(channels.gain(w, -30.0)), y)
                                      for p, w, y in zip(paths, waves, labels)],
    }


def nemo_set(limit: int) -> list[Clip]:
    root = SHARED_DATA / "nemo"
    with open(root / "data.tsv", newline="", encoding="utf-8") as handle:
        rows = sorted((r for r in csv.DictReader(handle, delimiter="\t") if r["speaker_id"] in ("KD0", "SM0")),
                      key=lambda r: r["file"])
    rows = rows[:limit] if limit else rows
    return [(r["file"], (root / "ogg" / r["file"]).read_bytes(), NEMO_LABELS[r["emotion"]]) for r in rows]


def ravdess_set(limit: int) -> list[Clip]:
    paths = [p for p in sorted((SHARED_DATA / "ravdess_speech_subset").glob("Actor_*/*.wav"))
             if p.name.split("-")[2] in RAVDESS_LABELS]
    paths = paths[:limit] if limit else paths
    return [(p.name, p.read_bytes(), RAVDESS_LABELS[p.name.split("-")[2]]) for p in paths]


# ---- scoring -------------------------------------------------------------------------------------
def score(client: httpx.Client, clips: list[Clip], offered: list[str]) -> dict:
    scored = [c for c in clips if c[2] in offered]
    truth, predicted, confidence, refused = [], [], [], []
    for name, data, label in scored:
        response = client.post(URL, files={"audio": (name, data, "application/octet-stream")})
        if response.status_code != 200:
            refused.append(f"{name}: {response.status_code} {response.json().get('code')}")
            continue
        answer = response.json()["predictions"][0]
        truth.append(label)
        predicted.append(answer["label"])
        confidence.append(answer["confidence"])
    truth_arr, pred_arr = np.array(truth), np.array(predicted)
    recall = {label: round(float((pred_arr[truth_arr == label] == label).mean()), 4)
              for label in offered if (truth_arr == label).any()}
    correct = truth_arr == pred_arr
    return {"n": len(scored), "answered": len(truth), "refused": refused,
            "accuracy": round(float(correct.mean()), 4),
            "uar": round(float(np.mean(list(recall.values()))), 4),
            "ece": round(expected_calibration_error(np.array(confidence), correct, BINS), 4),
            "mean_confidence": round(float(np.mean(confidence)), 4),
            "per_class_recall": recall}


def latency(client: httpx.Client, requests: int) -> dict:
    waveform, rate = sf.read(SHARED_DATA / "emodb" / "wav" / LATENCY_CLIP, dtype="float32")
    clip = wav_bytes(waveform[:3 * rate], rate)
    for _ in range(10):
        client.post(URL, files={"audio": ("3s.wav", clip, "audio/wav")}).raise_for_status()
    samples = []
    for _ in range(requests):
        t0 = time.perf_counter()
        response = client.post(URL, files={"audio": ("3s.wav", clip, "audio/wav")})
        samples.append((time.perf_counter() - t0) * 1000.0)
        response.raise_for_status()
    return {**percentiles(samples), "clip": f"first 3.0 s of EmoDB {LATENCY_CLIP}, 16 kHz PCM16 WAV"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", default="1.5.0,1.4.0", help="comma-separated emotion versions")
    parser.add_argument("--requests", type=int, default=100, help="latency requests (0: none)")
    parser.add_argument("--limit", type=int, default=0, help="first N of each set (smoke runs)")
    args = parser.parse_args()

    started = time.perf_counter()
    sets = {**emodb_sets(args.limit), "nEMO KD0+SM0": nemo_set(args.limit),
            "RAVDESS subset": ravdess_set(args.limit)}
    print(f"sets built in {time.perf_counter() - started:.0f}s: { {k: len(v) for k, v in sets.items()} }",
          flush=True)

    python = serving_python()
    results: dict[str, dict] = {}
    for version in [v.strip() for v in args.versions.split(",") if v.strip()]:
        with serving_version("emotion", version, python) as client:
            offered = next(m["labels"] for m in client.get("/v1/models").json()["models"]
                           if m["task"] == "emotion")
            scores: dict[str, dict] = {}
            for name, clips in sets.items():
                t0 = time.perf_counter()
                scores[name] = score(client, clips, offered)
                s = scores[name]
                print(f"{version} {name}: accuracy {s['accuracy']:.3f} UAR {s['uar']:.3f} "
                      f"ECE {s['ece']:.3f} n={s['n']} refused={len(s['refused'])} "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
            timing = latency(client, args.requests) if args.requests else None
            if timing:
                print(f"{version} 3.0 s clip: p50 {timing['p50_ms']:.1f} ms, p95 {timing['p95_ms']:.1f} ms",
                      flush=True)
            results[version] = {"labels": offered, "sets": scores, "latency_3s_clip": timing}

    write_results("emotion_eval" if not args.limit else "emotion_eval-smoke", {
        "model": "emotion", "through": f"POST {URL} on a real server (bench/liveserver.py), one worker, "
                                       "one clip per request, one server per version",
        "cpu": cpu_model(), "serving_python": python, "ece_bins": BINS,
        "scored_on": "the clips whose emotion the version offers (its labels)",
        "sets": {"EmoDB 03+16": "EmoDB speakers 03 and 16, original WAV",
                 "EmoDB 03+16 telephone": "300-3400 Hz Butterworth, 8 kHz, mu-law WAV",
                 "EmoDB 03+16 opus 24 kbit/s": "libopus 24 kbit/s, 16 kHz mono, WebM",
                 "EmoDB 03+16 noise 15 dB SNR": f"white Gaussian noise 15 dB below the clip RMS (seed {SEED}), PCM16 WAV",
                 "EmoDB 03+16 30 dB quieter": "x 10^(-30/20), PCM16 WAV",
                 "nEMO KD0+SM0": "nEMO speakers KD0 and SM0, original Ogg/Opus 16 kHz",
                 "RAVDESS subset": "../shared/data/ravdess_speech_subset, original WAV (evaluation only)"},
        "limit": args.limit, "versions": results,
    })


if __name__ == "__main__":
    main()
