"""Emotion features with parameters other than the model's, the STFT against librosa's, and the
edges of windows, levels and normalisation."""

from __future__ import annotations

import librosa
import numpy as np
import pytest

from app.tasks.emotion.preprocess import (
    ENCODER_FEATURES,
    FEATURES,
    SPEECH_ENCODER_FEATURES,
    FeatureParams,
    clip_windows,
    encoder_features,
    mfcc,
    normalise,
    peak_normalised,
    power_spectrogram,
    prepare_waveform,
    rms_db,
    summary_features,
    to_mono,
    window_features,
    window_starts,
)

SMALL = FeatureParams(sample_rate=8000, n_fft=256, win_length=200, hop_length=80, n_mels=32, n_mfcc=13,
                      fmax=4000.0, window_s=1.0, hop_s=0.5)


def noise(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 0.1, int(seconds * rate)).astype(np.float32)


def test_the_parameters_describe_themselves_for_the_models_metadata():
    assert (FEATURES.window_samples, FEATURES.hop_samples, FEATURES.n_frames) == (48000, 24000, 301)
    described = FEATURES.to_dict()
    assert described == {
        "sample_rate": 16000, "n_fft": 512, "win_length": 400, "hop_length": 160, "n_mels": 64, "n_mfcc": 40,
        "fmin": 0.0, "fmax": 8000.0, "top_db": 80.0, "amin": 1e-10, "window_s": 3.0, "hop_s": 1.5,
        "kind": "mfcc", "level_dbfs": -30.0, "window_samples": 48000, "hop_samples": 24000, "n_frames": 301,
        "window": "hann (periodic), centred, zero-padded", "power": 2.0, "mel_norm": "slaney", "htk": False,
        "dct": "type II, ortho", "db_ref": 1.0,
        "normalisation": "per window: c0 minus its mean over the audio frames; frames past a short clip's end "
                         "= the clip's mean frame; global standardisation inside the model"}
    assert (SMALL.window_samples, SMALL.hop_samples, SMALL.n_frames) == (8000, 4000, 101)


def test_the_power_spectrogram_is_librosas():
    y = noise(0.5, 16000)
    reference = np.abs(librosa.stft(y.astype(np.float64), n_fft=512, hop_length=160, win_length=400,
                                    window="hann", center=True, pad_mode="constant")) ** 2
    np.testing.assert_allclose(power_spectrogram(y), reference, rtol=1e-6, atol=1e-10)
    small = np.abs(librosa.stft(y.astype(np.float64), n_fft=256, hop_length=80, win_length=200, window="hann",
                                center=True, pad_mode="constant")) ** 2
    np.testing.assert_allclose(power_spectrogram(y, SMALL), small, rtol=1e-6, atol=1e-10)


def test_mfcc_with_other_parameters_is_librosas_with_the_same():
    y = noise(1.0, 8000)
    reference = librosa.feature.mfcc(y=y.astype(np.float64), **SMALL.librosa_kwargs())
    got = mfcc(y, SMALL)
    assert got.shape == (13, 101)
    np.testing.assert_allclose(got, reference, atol=1e-4)


def test_windows_and_features_follow_the_parameters_given():
    y = noise(2.2, 8000)
    batch, spans = clip_windows(y, SMALL)
    assert batch.shape == (4, 101, 13) and batch.dtype == np.float32
    assert spans == [(0.0, 1.0), (0.5, 1.5), (1.0, 2.0), (1.2, 2.2)]
    np.testing.assert_array_equal(batch[3], window_features(peak_normalised(y)[9600:], None, SMALL))
    assert window_starts(y.size, SMALL) == [0, 4000, 8000, 9600]


def test_a_summary_with_other_parameters_uses_their_rate_and_mfcc():
    y = noise(1.5, 8000)
    features = summary_features(y, SMALL)
    assert features["duration_s"] == 1.5
    assert features["mfcc1_mean"] == round(float(mfcc(y, SMALL)[1].mean()), 4)


@pytest.mark.parametrize("extra, starts", [
    (0, [0]), (1, [0, 1]), (24000, [0, 24000]), (24001, [0, 24000, 24001]), (47999, [0, 24000, 47999]),
    (48000, [0, 24000, 48000]),
])
def test_window_starts_just_past_each_hop(extra, starts):
    assert window_starts(48000 + extra) == starts


def test_the_level_of_silence_full_scale_and_half_scale():
    assert rms_db(np.array([])) == pytest.approx(-120.0)
    assert rms_db(np.zeros(10)) == pytest.approx(-120.0)
    assert rms_db(np.ones(10, dtype=np.float32)) == 0.0
    assert rms_db(np.full(10, -0.5)) == pytest.approx(-6.0206, abs=1e-4)


def test_the_summary_of_an_empty_clip_is_silence():
    assert summary_features(np.array([], dtype=np.float32)) == {
        "duration_s": 0.0, "rms_db": -120.0, "peak_db": -120.0, "mfcc0_mean": 0.0, "mfcc1_mean": 0.0,
        "mfcc2_mean": 0.0, "mfcc3_mean": 0.0, "mfcc4_mean": 0.0}


def test_the_summary_rounds_to_four_decimals():
    y = noise(0.3, 16000, seed=4)
    features = summary_features(y)
    assert features["duration_s"] == 0.3
    assert features["rms_db"] == round(rms_db(y), 4)
    assert features["peak_db"] == round(float(20 * np.log10(np.abs(y).max())), 4)
    assert features["mfcc0_mean"] == round(float(mfcc(y)[0].mean()), 4)


def test_mono_mixing_refuses_other_shapes():
    assert to_mono(np.array([[1.0, 0.0], [0.5, 0.5]])).tolist() == [0.5, 0.5]
    assert to_mono(np.array([[1, 0], [1, 1]], dtype=np.int16)).dtype == np.float32
    with pytest.raises(ValueError, match=r"^waveform must be 1-D or \(samples, channels\), got shape \(1, 2, 2\)$"):
        to_mono(np.zeros((1, 2, 2)))


def test_resampling_uses_the_parameters_rate():
    assert prepare_waveform(noise(1.0, 16000), 16000, SMALL).shape == (8000,)


def test_normalising_with_one_valid_frame_uses_that_frame_alone():
    coefficients = np.array([[1.0, 3.0, 5.0], [2.0, 4.0, 6.0]])
    assert normalise(coefficients, 1).tolist() == [[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]]
    assert normalise(coefficients, 0).tolist() == [[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]]
    assert normalise(coefficients, 2).tolist() == [[-1.0, 1.0, 0.0], [2.0, 4.0, 3.0]]
    assert normalise(coefficients.astype(np.float32), 9).dtype == np.float64


def test_fewer_valid_samples_than_the_audio_change_the_window_features():
    y = noise(2.0, 16000, seed=2)
    assert not np.allclose(window_features(y, 8000), window_features(y))
    np.testing.assert_array_equal(window_features(y, 10**9), window_features(y))


def test_a_quiet_copy_of_a_clip_gives_the_same_windows():
    y = noise(2.2, 8000)
    loud, _ = clip_windows(y, SMALL)
    quiet, _ = clip_windows((y * 10 ** (-44 / 20)).astype(np.float32), SMALL)
    np.testing.assert_allclose(quiet, loud, atol=1e-3)


def test_a_quiet_clip_is_gained_to_full_scale_and_one_near_full_scale_is_left_as_it_is():
    """EmoDB is peak-normalised: a clip peaking under QUIET_PEAK_DBFS (-6 dBFS) is scaled to a peak
    of 1; one at or above it is used sample for sample; silence and an empty clip stay as they are."""
    y = noise(1.0, 16000)
    y = (y / np.abs(y).max()).astype(np.float32)  # a peak of exactly 1
    for level in (0.1, 0.5):  # -20 dBFS, -6.02 dBFS
        quiet = (y * level).astype(np.float32)
        gained = peak_normalised(quiet)
        np.testing.assert_array_equal(gained, quiet / np.float32(np.abs(quiet).max()))
        assert np.abs(gained).max() == pytest.approx(1.0, abs=1e-6)
    for level in (0.51, 0.9, 1.0):  # -5.85, -0.92 and 0 dBFS
        clip = (y * level).astype(np.float32)
        np.testing.assert_array_equal(peak_normalised(clip), clip)
    silence = np.zeros(800, dtype=np.float32)
    np.testing.assert_array_equal(peak_normalised(silence), silence)
    assert peak_normalised(np.zeros(0, dtype=np.float32)).size == 0


def test_the_voice_encoders_input_is_librosas_mel_power_at_minus_30_dbfs():
    """A window for a voice-encoder model is the mel power spectrogram the encoder was trained on
    (librosa.feature.melspectrogram, 400-sample FFT, 40 bands), of the window at -30 dBFS RMS."""
    y = noise(3.0, 16000, seed=3)
    features = window_features(y, params=ENCODER_FEATURES)
    assert features.shape == (ENCODER_FEATURES.n_frames, ENCODER_FEATURES.n_features) == (301, 40)
    level = y.astype(np.float64) * (10 ** (-30 / 20) / np.sqrt(np.mean(y.astype(np.float64) ** 2)))
    reference = librosa.feature.melspectrogram(y=level, sr=16000, n_fft=400, hop_length=160, n_mels=40,
                                               center=True, pad_mode="constant")
    np.testing.assert_allclose(features, reference.T, rtol=1e-4, atol=1e-8)
    batch, _ = clip_windows(y, ENCODER_FEATURES)
    np.testing.assert_allclose(batch[0], features, rtol=1e-5)  # the same, from the peak-normalised clip


def test_the_encoders_windows_do_not_depend_on_the_level_and_repeat_a_short_clip():
    y = noise(1.0, 16000, seed=4)
    quiet = encoder_features(y * 0.01)
    np.testing.assert_allclose(quiet, encoder_features(y), rtol=1e-3, atol=1e-8)
    np.testing.assert_allclose(encoder_features(y), encoder_features(np.tile(y, 3)), rtol=1e-5, atol=1e-10)
    # a window holding half a second of audio: the rest is that half second again, not zeros
    assert encoder_features(y[:8000])[-10:].min() > 0
    assert ENCODER_FEATURES.to_dict()["kind"] == "mel" and FEATURES.n_features == FEATURES.n_mfcc


def test_the_voice_encoders_parameters_describe_themselves():
    assert ENCODER_FEATURES.to_dict() == {
        "sample_rate": 16000, "n_fft": 400, "win_length": 400, "hop_length": 160, "n_mels": 40, "n_mfcc": 40,
        "fmin": 0.0, "fmax": 8000.0, "top_db": 80.0, "amin": 1e-10, "window_s": 3.0, "hop_s": 1.5,
        "kind": "mel", "level_dbfs": -30.0, "window_samples": 48000, "hop_samples": 24000, "n_frames": 301,
        "window": "hann (periodic), centred, zero-padded", "power": 2.0, "mel_norm": "slaney", "htk": False,
        "normalisation": "per window: gained to -30 dBFS RMS over its audio; a short clip repeated to fill "
                         "the window"}


def test_the_speech_encoders_input_is_whispers_log_mel_of_librosas_mel_power_at_minus_25_dbfs():
    """Whisper's scaling of librosa's 80-band mel power (400-sample FFT) of the window at -25 dBFS
    RMS: log10, floored 8 decades below the window's peak, then (x + 4) / 4."""
    y = noise(3.0, 16000, seed=5) * np.linspace(0.0, 1.0, 48000, dtype=np.float32) ** 8  # a fade-in
    features = window_features(y, params=SPEECH_ENCODER_FEATURES)
    assert features.shape == (SPEECH_ENCODER_FEATURES.n_frames, SPEECH_ENCODER_FEATURES.n_features) == (301, 80)
    level = y.astype(np.float64) * (10 ** (-25 / 20) / np.sqrt(np.mean(y.astype(np.float64) ** 2)))
    power = librosa.feature.melspectrogram(y=level, sr=16000, n_fft=400, hop_length=160, n_mels=80,
                                           center=True, pad_mode="constant")
    logs = np.log10(np.maximum(power, 1e-10))
    reference = (np.maximum(logs, logs.max() - 8.0) + 4.0) / 4.0
    assert (logs < logs.max() - 8.0).any()  # the floor is reached in the fade-in
    np.testing.assert_allclose(features, reference.T, rtol=1e-5, atol=1e-5)
    batch, _ = clip_windows(y, SPEECH_ENCODER_FEATURES)
    np.testing.assert_allclose(batch[0], features, rtol=1e-5, atol=1e-5)
    assert SPEECH_ENCODER_FEATURES.to_dict()["scale"] == ("log10, floored 8 decades below the window's "
                                                          "peak, then (x + 4) / 4")
    assert "scale" not in ENCODER_FEATURES.to_dict()


def test_the_speech_encoders_windows_do_not_depend_on_the_level():
    y = noise(1.0, 16000, seed=6)
    loud, quiet = encoder_features(y, SPEECH_ENCODER_FEATURES), encoder_features(y * 0.001, SPEECH_ENCODER_FEATURES)
    np.testing.assert_allclose(quiet, loud, atol=1e-4)
    assert loud.dtype == np.float32 and loud.max() <= (np.log10(loud.size) + 4.0) / 4.0 + 1.0


def test_the_encoders_window_of_nothing_or_of_one_sample():
    empty = encoder_features(np.zeros(0, np.float32))
    assert empty.shape == (301, 40) and empty.dtype == np.float32 and not empty.any()
    one = encoder_features(np.array([0.5], np.float32))  # one sample repeated: a constant, at -30 dBFS
    assert one.dtype == np.float32 and one[150, 0] > 0


def test_the_encoders_windows_follow_the_parameters_given():
    small = FeatureParams(sample_rate=8000, n_fft=200, win_length=200, hop_length=80, n_mels=20,
                          fmax=4000.0, window_s=1.0, hop_s=0.5, kind="mel")
    features = window_features(noise(0.4, 8000), params=small)
    assert features.shape == (small.n_frames, small.n_features) == (101, 20)
    np.testing.assert_array_equal(features, encoder_features(noise(0.4, 8000), small))
