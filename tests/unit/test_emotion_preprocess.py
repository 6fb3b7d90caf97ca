"""The serving MFCC (numpy/scipy) is librosa's MFCC, and the windowing and summaries behave.

librosa is imported here only: it is the reference implementation the request path must match.
"""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import soundfile as sf

from app.tasks.emotion.preprocess import (
    FEATURES,
    clip_windows,
    mel_filterbank,
    mfcc,
    prepare_waveform,
    summary_features,
    window_features,
    window_starts,
)
from tests.support import SHARED_DATA

EMODB = SHARED_DATA / "emodb" / "wav"
# Five speakers, both sentence lengths, five emotions; 08b03Tc is the longest file (8.98 s).
PARITY_FILES = ["03a01Fa.wav", "08b03Tc.wav", "10b03Tb.wav", "14a05Aa.wav", "16b10Td.wav"]


def load(name: str) -> np.ndarray:
    waveform, sr = sf.read(EMODB / name, dtype="float32")
    assert sr == FEATURES.sample_rate
    return waveform


@pytest.mark.parametrize("name", PARITY_FILES)
def test_mfcc_matches_librosa_within_1e4_on_emodb(name: str) -> None:
    waveform = load(name)
    reference = librosa.feature.mfcc(y=waveform.astype(np.float64), **FEATURES.librosa_kwargs())
    ours = mfcc(waveform)
    assert ours.shape == reference.shape == (40, 1 + waveform.size // 160)
    assert np.max(np.abs(ours - reference)) < 1e-4


@pytest.mark.parametrize("name", PARITY_FILES[:2])
def test_mfcc_of_a_padded_model_window_matches_librosa(name: str) -> None:
    window = np.zeros(FEATURES.window_samples, dtype=np.float32)
    audio = load(name)[:FEATURES.window_samples]
    window[:audio.size] = audio
    reference = librosa.feature.mfcc(y=window.astype(np.float64), **FEATURES.librosa_kwargs())
    assert np.max(np.abs(mfcc(window) - reference)) < 1e-4


def test_mel_filterbank_is_librosas() -> None:
    reference = librosa.filters.mel(sr=16000, n_fft=512, n_mels=64, fmin=0.0, fmax=8000.0)
    np.testing.assert_array_equal(mel_filterbank(), reference)


def test_window_features_remove_c0_mean_and_fill_a_short_clip_with_its_mean_frame() -> None:
    audio = load("03a01Fa.wav")  # 1.90 s, shorter than the 3 s window
    features = window_features(audio)
    valid = 1 + audio.size // FEATURES.hop_length  # 190 frames hold audio
    raw = mfcc(np.pad(audio, (0, FEATURES.window_samples - audio.size))).T
    assert features.shape == (FEATURES.n_frames, FEATURES.n_mfcc) == (301, 40)
    assert features.dtype == np.float32
    assert features[:valid, 0].mean() == pytest.approx(0.0, abs=1e-3)
    np.testing.assert_allclose(features[:valid, 1:], raw[:valid, 1:], atol=1e-3)
    np.testing.assert_allclose(features[valid:], np.tile(features[:valid].mean(axis=0), (111, 1)),
                               atol=1e-4)


def test_window_features_ignore_recording_gain() -> None:
    audio = load("14a05Aa.wav")
    np.testing.assert_allclose(window_features(audio * 0.25), window_features(audio), atol=1e-3)


def test_long_clips_are_covered_by_overlapping_windows_ending_flush() -> None:
    sr = FEATURES.sample_rate
    assert window_starts(2 * sr) == [0]
    assert window_starts(3 * sr) == [0]
    assert window_starts(7 * sr) == [0, int(1.5 * sr), 3 * sr, 4 * sr]
    batch, spans = clip_windows(np.random.default_rng(0).normal(0, 0.1, 7 * sr).astype(np.float32))
    assert batch.shape == (4, 301, 40)
    assert spans == [(0.0, 3.0), (1.5, 4.5), (3.0, 6.0), (4.0, 7.0)]


def test_stereo_44k1_is_mixed_down_and_resampled_to_16k() -> None:
    t = np.arange(44100) / 44100
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    stereo = np.stack([tone, 0.5 * tone], axis=1)
    mono = prepare_waveform(stereo, 44100)
    assert mono.dtype == np.float32 and mono.shape == (16000,)
    assert np.sqrt(np.mean(mono[1000:-1000] ** 2)) == pytest.approx(0.75 / np.sqrt(2), rel=1e-2)


def test_summary_features_follow_loudness() -> None:
    audio = load("03a01Fa.wav")
    quiet, loud = summary_features(audio), summary_features(audio * 4.0)  # +12 dB
    assert set(quiet) == {"duration_s", "rms_db", "peak_db", "mfcc0_mean", "mfcc1_mean",
                          "mfcc2_mean", "mfcc3_mean", "mfcc4_mean"}
    assert quiet["duration_s"] == pytest.approx(1.8982, abs=1e-3)
    assert loud["rms_db"] - quiet["rms_db"] == pytest.approx(12.04, abs=0.01)
    assert loud["peak_db"] - quiet["peak_db"] == pytest.approx(12.04, abs=0.01)
    assert loud["mfcc0_mean"] > quiet["mfcc0_mean"] + 50
    assert all(isinstance(v, float) for v in quiet.values())
