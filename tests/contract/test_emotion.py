"""POST /v1/emotion/predict against the real gunicorn server with real EmoDB speech, sent the way
clients send it: WAV, FLAC, OGG/Vorbis, MP3, 44.1 kHz stereo, browser WebM/Opus and phone M4A/AAC;
and every kind of bad upload answered with a problem+json 4xx, never a guess or a 500."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import scipy.signal
import soundfile as sf

from tests.audio import pyav_bytes, soundfile_bytes
from tests.support import SHARED_DATA, assert_problem

EMODB = SHARED_DATA / "emodb" / "wav"
URL = "/v1/emotion/predict"
LABELS = ["anger", "boredom", "disgust", "fear", "happiness", "neutral", "sadness"]
# A held-out test speaker (03), angry, 1.88 s.
CLIP = "03a01Wa.wav"


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    waveform, sr = sf.read(EMODB / CLIP, dtype="float32")
    assert sr == 16000
    return waveform


def post(client: httpx.Client, data: bytes, name: str = "clip.wav", mime: str = "audio/wav",
         field: str = "audio") -> httpx.Response:
    return client.post(URL, files={field: (name, data, mime)})


@pytest.fixture(scope="module")
def wav_answer(live_server: str, speech: np.ndarray) -> dict:
    with httpx.Client(base_url=live_server, timeout=30.0) as client:
        response = post(client, soundfile_bytes(speech, 16000, "WAV"))
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["predictions"]
    return {**response.json(), **prediction}


def only(response: httpx.Response) -> dict:
    """The one prediction of a one-clip request."""
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["predictions"]
    return prediction


def test_a_wav_clip_gets_its_emotion_with_probabilities_and_segments(wav_answer):
    assert wav_answer["label"] == "anger"
    assert list(wav_answer["probabilities"]) == LABELS
    assert sum(wav_answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
    assert wav_answer["duration_s"] == 1.878
    assert wav_answer["segments"] == [{"start_s": 0.0, "end_s": wav_answer["duration_s"],
                                       "label": "anger", "confidence": wav_answer["confidence"]}]
    assert wav_answer["model"] == "emotion" and wav_answer["request_id"]


@pytest.mark.parametrize("fmt,subtype,mime", [("FLAC", None, "audio/flac"),
                                              ("OGG", "VORBIS", "audio/ogg"),
                                              ("MP3", None, "audio/mpeg")])
def test_the_same_audio_as_flac_ogg_mp3_gives_the_same_emotion(client, speech, wav_answer,
                                                              fmt, subtype, mime):
    response = post(client, soundfile_bytes(speech, 16000, fmt, subtype), f"clip.{fmt.lower()}", mime)
    assert response.status_code == 200, response.text
    assert only(response)["label"] == wav_answer["label"]


def test_44k1_stereo_gives_the_same_emotion_and_duration(client, speech, wav_answer):
    resampled = scipy.signal.resample_poly(speech, 441, 160).astype(np.float32)
    stereo = np.stack([resampled, 0.8 * resampled], axis=1)
    response = post(client, soundfile_bytes(stereo, 44100, "WAV"))
    assert response.status_code == 200, response.text
    assert only(response)["label"] == wav_answer["label"]
    assert only(response)["duration_s"] == pytest.approx(wav_answer["duration_s"], abs=0.01)


@pytest.mark.parametrize("container,codec,rate,mime", [("webm", "libopus", 48000, "audio/webm"),
                                                       ("mp4", "aac", 44100, "audio/mp4")])
def test_browser_webm_opus_and_phone_m4a_are_accepted(client, speech, wav_answer, container, codec,
                                                      rate, mime):
    response = post(client, pyav_bytes(speech, container, codec, rate), f"clip.{container}", mime)
    assert response.status_code == 200, response.text
    assert only(response)["label"] == wav_answer["label"]


def test_a_long_clip_is_scored_in_overlapping_windows(client):
    speech, _ = sf.read(EMODB / "16a05Tb.wav", dtype="float32")  # 6.79 s
    response = post(client, soundfile_bytes(speech, 16000, "FLAC"), "long.flac", "audio/flac")
    assert response.status_code == 200, response.text
    starts = [s["start_s"] for s in only(response)["segments"]]
    assert starts[:3] == [0.0, 1.5, 3.0] and len(starts) >= 3


def test_shorter_than_0_3_s_is_422(client, speech):
    assert_problem(post(client, soundfile_bytes(speech[:3200], 16000, "WAV")), 422,
                   code="audio-too-short", field="audio[0]")


def test_longer_than_60_s_is_413(client, speech):
    body = assert_problem(post(client, soundfile_bytes(np.tile(speech, 33), 16000, "FLAC"),
                               "long.flac", "audio/flac"), 413, code="audio-too-long", field="audio[0]")
    assert "60 s" in body["detail"]


@pytest.mark.parametrize("name, waveform", [
    ("silence", np.zeros(32000, np.float32)),
    ("a 440 Hz tone", (0.3 * np.sin(2 * np.pi * 440 * np.arange(32000) / 16000)).astype(np.float32)),
    ("white noise", np.random.default_rng(0).normal(0, 0.1, 32000).astype(np.float32)),
])
def test_silence_a_tone_and_noise_are_422_no_speech_not_a_guess(client, name, waveform):
    body = assert_problem(post(client, soundfile_bytes(waveform, 16000, "WAV")), 422,
                          code="no-speech", field="audio[0]")
    assert body["field"] == "audio[0]" and "no speech" in body["detail"], name


def test_quiet_but_clear_speech_is_answered_like_the_same_clip_at_full_level(client, speech, wav_answer):
    quiet = speech / np.abs(speech).max() * 10 ** (-44 / 20)  # peak at -44 dBFS
    response = post(client, soundfile_bytes(quiet.astype(np.float32), 16000, "WAV"))
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["label"] == wav_answer["label"]


def test_corrupt_audio_is_422(client, speech):
    truncated = soundfile_bytes(speech, 16000, "FLAC")[:2500]
    assert_problem(post(client, truncated, "clip.flac", "audio/flac"), 422,
                   code="corrupt-audio", field="audio[0]")


def test_not_audio_is_415_naming_the_formats(client):
    body = assert_problem(post(client, b"%PDF-1.4 not audio at all\n" * 50, "doc.pdf",
                               "application/pdf"), 415, code="unsupported-audio-format",
                          field="audio[0]")
    assert "WAV" in body["detail"] and "WebM/Opus" in body["detail"]


def test_empty_file_is_422(client):
    assert_problem(post(client, b""), 422, code="empty-file", field="audio[0]")


def test_wrong_field_name_is_422_naming_audio(client, speech):
    response = post(client, soundfile_bytes(speech, 16000, "WAV"), field="file")
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["field"] == "audio"


def test_several_clips_and_a_raw_body_each_get_their_own_answer(client, speech):
    """Two files in one request give two predictions in order; a raw audio/wav body is one clip."""
    wav = soundfile_bytes(speech, 16000, "WAV")
    quiet = soundfile_bytes(speech[:16000] * 0.5, 16000, "WAV")
    both = client.post(URL, files=[("audio", ("a.wav", wav, "audio/wav")), ("audio", ("b.wav", quiet, "audio/wav"))])
    assert both.status_code == 200, both.text
    first, second = both.json()["predictions"]
    assert (first["duration_s"], second["duration_s"]) == (1.878, 1.0)
    raw = client.post(URL, content=wav, headers={"content-type": "audio/wav"})
    assert only(raw)["probabilities"] == first["probabilities"]
    assert raw.headers["x-model-version"] == raw.json()["version"]
    assert "inference;dur=" in raw.headers["server-timing"]


def test_the_model_says_what_it_is_for(client):
    card = client.get("/v1/models/emotion").json()["card"]
    assert card["languages"] == ["de", "pl"]
    assert [corpus.split(":")[0] for corpus in card["trained_on"]] == ["EmoDB", "nEMO", "voice encoder"]
    assert "CC BY-NC-SA 4.0" in card["licence"] and "non-commercial" in card["licence"]
    held_out = card["held_out"]
    assert list(held_out) == ["EmoDB speakers 03+16 (German, held out)",
                              "nEMO speakers KD0+SM0 (Polish, held out)",
                              "RAVDESS speech subset (English, evaluation only)"]
    assert held_out["EmoDB speakers 03+16 (German, held out)"]["accuracy"] > 0.7
    assert all(set(figures) == {"n", "accuracy", "uar", "ece"} for figures in held_out.values())
    assert [name.split(" through ")[1] for name in card["channels"]] == [
        "telephone", "opus 24 kbit/s", "noise 15 dB SNR", "30 dB quieter"]
    assert card["labels"] == LABELS
    assert card["model_card"] == "docs/models/emotion.md"
