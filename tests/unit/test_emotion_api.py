"""The emotion model class and endpoint in-process (TestClient) on the committed model."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.tasks.emotion.model import EmotionModel
from app.tasks.emotion.preprocess import ENCODER_FEATURES, SPEECH_ENCODER_FEATURES, clip_windows
from tests.support import SHARED_DATA, committed_version, single_task_client

EMODB = SHARED_DATA / "emodb" / "wav"
URL = "/v1/emotion/predict"



def wav_bytes(waveform: np.ndarray, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, waveform, rate, format="WAV")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model() -> EmotionModel:
    return EmotionModel.load(committed_version("emotion"), Settings())


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[TestClient]:
    """An app whose models dir holds only the committed emotion model."""
    with single_task_client(tmp_path_factory.mktemp("emotion"), "emotion") as test_client:
        yield test_client


def test_model_takes_its_feature_parameters_from_metadata(model):
    assert model.params == ENCODER_FEATURES
    assert model.runner.input_shape[1:] == (ENCODER_FEATURES.n_frames, ENCODER_FEATURES.n_mels)
    assert model.labels == ["anger", "boredom", "disgust", "fear", "happiness", "neutral", "sadness"]


def test_a_clips_answer_does_not_depend_on_the_clip_before_it(model):
    """Every window starts from the model's initial state (LiteRT keeps an LSTM's state in
    variable tensors between runs unless they are reset)."""
    clip, _ = sf.read(EMODB / "03a01Wa.wav", dtype="float32")
    other, _ = sf.read(EMODB / "08b03Tc.wav", dtype="float32")
    windows, _ = clip_windows(clip, model.params)
    alone = model.predict(windows)
    model.predict(clip_windows(other, model.params)[0])
    np.testing.assert_array_equal(model.predict(windows), alone)


def test_long_clip_is_scored_in_overlapping_windows_and_averaged(model):
    speech, _ = sf.read(EMODB / "08b03Tc.wav", dtype="float32")  # 8.98 s of sadness
    result = model.classify(speech, 16000)
    assert [(s["start_s"], s["end_s"]) for s in result.segments] == [
        (0.0, 3.0), (1.5, 4.5), (3.0, 6.0), (4.5, 7.5), (5.978, 8.978)]
    assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-3)
    assert result.duration_s == pytest.approx(8.978, abs=1e-3)
    assert result.emotion == max(result.probabilities, key=result.probabilities.get)


def test_silent_stretches_are_not_scored(model):
    speech, _ = sf.read(EMODB / "03a01Wa.wav", dtype="float32")  # 1.88 s
    padded = np.concatenate([speech, np.full(16000 * 6, 1e-5, dtype=np.float32)])  # 7.88 s
    result = model.classify(padded, 16000)
    # Only the speech (to its last voiced frame + 0.15 s) is scored: one window.
    assert [(s["start_s"], s["end_s"]) for s in result.segments] == [(0.0, 1.9)]
    assert result.duration_s == 7.878


def test_a_pause_before_the_voice_is_cut_and_window_times_stay_in_the_upload(model):
    speech, _ = sf.read(EMODB / "03a01Wa.wav", dtype="float32")
    late = np.concatenate([np.zeros(16000 * 2, np.float32), speech])  # 2 s of silence first
    result = model.classify(late, 16000)
    assert [(s["start_s"], s["end_s"]) for s in result.segments] == [(1.98, 3.878)]
    alone = model.classify(speech, 16000)  # the same but for the 0.15 s margin of silence
    assert result.emotion == alone.emotion
    assert result.probabilities == pytest.approx(alone.probabilities, abs=0.1)


def test_predict_answers_with_the_documented_body(client):
    speech, _ = sf.read(EMODB / "03a01Wa.wav", dtype="float32")
    response = client.post(URL, files={"audio": ("a.wav", wav_bytes(speech), "audio/wav")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"model", "version", "request_id", "predictions"}
    assert body["model"] == "emotion" and body["version"] == committed_version("emotion").name
    assert body["version"] == response.headers["x-model-version"]
    assert body["request_id"] == response.headers["x-request-id"]
    (prediction,) = body["predictions"]
    assert set(prediction) == {"label", "confidence", "probabilities", "classes", "duration_s", "segments"}
    assert prediction["confidence"] == prediction["probabilities"][prediction["label"]]
    assert [(c["label"], c["probability"]) for c in prediction["classes"]] == list(prediction["probabilities"].items())
    assert prediction["duration_s"] == 1.878


def test_a_wrong_field_name_is_a_422_naming_audio(client):
    response = client.post(URL, files={"file": ("a.wav", b"RIFF", "audio/wav")})
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["field"] == "audio"


def test_the_serving_path_imports_neither_librosa_nor_tensorflow():
    code = ("import sys, app.tasks.emotion.router, app.tasks.emotion.model, app.core.codecs.audio; "
            "print(sorted(m for m in ('librosa', 'numba', 'tensorflow', 'keras', 'matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_app_is_told_to_reset_the_lstm_state_before_each_window(model):
    steps = model.preprocessing()["steps"]
    assert model.preprocessing()["parameters"]["kind"] == "mel"
    assert any("40-band mel power at -30 dBFS RMS" in step for step in steps)
    assert any("reset the interpreter's variable tensors" in step for step in steps)
    mfcc_model = EmotionModel.load(committed_version("emotion").parent / "1.4.0", Settings())
    older = mfcc_model.preprocessing()["steps"]
    assert any("40 MFCCs" in step for step in older) and not any("reset" in step for step in older)


def test_a_log_mel_models_steps_name_whispers_scaling_and_no_state_to_reset():
    """A version trained with ``training.emotion --encoder whisper`` reads Whisper's log-mel; a
    transformer keeps no state between runs."""
    speech = object.__new__(EmotionModel)  # preprocessing() reads only the parameters
    speech.params = SPEECH_ENCODER_FEATURES
    steps = speech.preprocessing()["steps"]
    assert speech.preprocessing()["parameters"]["kind"] == "logmel"
    assert any("80-band log-mel (log10, floored 80 dB below the window's peak, then (x + 4) / 4) at "
               "-25 dBFS RMS (a short clip repeated to fill the window)" in step for step in steps)
    assert "one run per window" in steps and not any("reset" in step for step in steps)


def test_a_request_analyses_voice_activity_once_and_its_answer_is_unchanged(client, model, monkeypatch):
    """The router's voice-activity flags are the ones the model cuts the speech span with."""
    from app.tasks.emotion import model as model_module
    from app.tasks.emotion import router as router_module
    from app.tasks.emotion.preprocess import speech_frames

    def answer(result):
        return result.emotion, result.probabilities, result.segments, result.duration_s

    clip, _ = sf.read(EMODB / "03a01Wa.wav", dtype="float32")
    padded = np.concatenate([np.zeros(8000, np.float32), clip, np.zeros(8000, np.float32)])
    alone = answer(model.classify(padded, 16000))
    assert alone[2][0]["start_s"] > 0.3  # the leading pause is cut
    assert answer(model.classify(padded, 16000, speech_frames(padded))) == alone
    # flags of another signal are not taken for this clip's
    assert answer(model.classify(padded, 16000, np.zeros(10, bool))) == alone
    assert answer(model.classify(padded, 16000, np.zeros_like(speech_frames(padded)))) != alone
    calls = []

    def counted(waveform, *args):
        calls.append(len(waveform))
        return speech_frames(waveform, *args)

    monkeypatch.setattr(router_module, "speech_frames", counted)
    monkeypatch.setattr(model_module, "speech_frames", counted)
    response = client.post(URL, files={"audio": ("a.wav", wav_bytes(padded), "audio/wav")})
    assert response.status_code == 200, response.text
    assert calls == [padded.size]
    assert response.json()["predictions"][0]["label"] == alone[0]
