"""Voice activity for emotion: every held-out speech clip (EmoDB 03+16, the RAVDESS subset, nEMO KD0
and SM0), also 30 dB quieter or with white noise 15 dB below it, carries speech; silence, tones and
noise do not."""

from __future__ import annotations

import numpy as np
import pytest

from app.core.codecs.audio import decode_audio
from app.tasks.emotion.preprocess import FEATURES, MIN_SPEECH_S, has_speech, speech_frames
from tests.support import SHARED_DATA

RATE = FEATURES.sample_rate
T = np.arange(2 * RATE) / RATE


def add_noise(wav: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """White noise ``snr_db`` below the clip's RMS level."""
    rms = float(np.sqrt(np.mean(np.asarray(wav, np.float64) ** 2)))
    return (wav + rng.standard_normal(len(wav)) * rms / 10 ** (snr_db / 20)).astype(np.float32)


def held_out_clips() -> list:
    emodb = [p for p in sorted((SHARED_DATA / "emodb" / "wav").glob("*.wav")) if p.name[:2] in ("03", "16")]
    ravdess = sorted((SHARED_DATA / "ravdess_speech_subset").rglob("*.wav"))
    nemo = [p for p in sorted((SHARED_DATA / "nemo" / "ogg").glob("*.ogg")) if p.name[:3] in ("KD0", "SM0")]
    return emodb + ravdess + nemo[::4]


def decoded(path) -> np.ndarray:
    return decode_audio(path.read_bytes(), path.name, max_seconds=60, target_rate=RATE, reject_silent=False)


def test_every_held_out_speech_clip_has_speech_also_30_db_quieter_and_in_noise():
    clips = held_out_clips()
    assert len(clips) > 300
    rng = np.random.default_rng(42)

    def versions(wav: np.ndarray) -> tuple[np.ndarray, ...]:
        return wav, wav * 10 ** (-30 / 20), add_noise(wav, 15.0, rng)

    quietest = min(int(speech_frames(w).sum()) for path in clips for w in versions(decoded(path)))
    assert quietest * FEATURES.hop_length >= 2 * MIN_SPEECH_S * RATE  # twice the bound, at least


@pytest.mark.parametrize("name, waveform", [
    ("digital silence", np.zeros(2 * RATE)),
    ("440 Hz tone", 0.3 * np.sin(2 * np.pi * 440 * T)),
    ("a quiet 1 kHz tone", 0.003 * np.sin(2 * np.pi * 1000 * T)),
    ("a sweep", 0.3 * np.sin(2 * np.pi * (200 + 500 * T) * T)),
    ("a fast sweep", 0.3 * np.sin(2 * np.pi * (100 + 500 * T) * T)),
    ("a tone in noise", add_noise((0.3 * np.sin(2 * np.pi * 440 * T)).astype(np.float32), 15.0,
                                  np.random.default_rng(2))),
    ("a constant level (DC)", np.full(2 * RATE, 0.25)),
    ("white noise", np.random.default_rng(0).normal(0, 0.1, 2 * RATE)),
    ("quiet white noise", np.random.default_rng(1).normal(0, 0.001, 2 * RATE)),
])
def test_silence_tones_and_noise_have_no_speech(name, waveform):
    assert not has_speech(waveform.astype(np.float32)), name


def test_speech_on_a_dc_offset_is_found():
    clip = decoded(held_out_clips()[0])
    assert has_speech(clip + np.float32(0.3))


def test_speech_after_a_long_silence_is_found():
    clip = decoded(held_out_clips()[0])
    assert has_speech(np.concatenate([np.zeros(20 * RATE, np.float32), clip]))
