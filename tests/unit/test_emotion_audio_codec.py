"""decode_audio: every supported container/codec decodes to the same speech, and bad uploads get
the right problem (415 unknown format, 413 too long, 422 corrupt/short/silent/non-finite)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import scipy.signal
import soundfile as sf

from app.core.codecs.audio import SUPPORTED_FORMATS, decode_audio
from app.core.errors import ProblemError
from tests.audio import pyav_bytes, soundfile_bytes
from tests.support import SHARED_DATA

EMODB = SHARED_DATA / "emodb" / "wav"


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    waveform, sr = sf.read(EMODB / "03a01Wa.wav", dtype="float32")  # 1.88 s, 16 kHz mono, anger
    assert sr == 16000
    return waveform






def decode(data: bytes, **limits) -> np.ndarray:
    """Decoded to mono 16 kHz, the emotion model's rate."""
    return decode_audio(data, "audio", max_seconds=limits.pop("max_seconds", 60.0),
                        target_rate=16000, **limits)


def assert_problem(data: bytes, status: int, code: str, **limits) -> ProblemError:
    with pytest.raises(ProblemError) as caught:
        decode(data, **limits)
    assert (caught.value.status, caught.value.code, caught.value.field) == (status, code, "audio")
    return caught.value


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", None),
                                         ("OGG", "VORBIS"), ("MP3", None)])
def test_soundfile_formats_decode_to_the_original_speech(speech, fmt, subtype):
    waveform = decode(soundfile_bytes(speech, 16000, fmt, subtype))
    assert waveform.dtype == np.float32 and waveform.ndim == 1
    if fmt in ("WAV", "FLAC"):  # lossless
        np.testing.assert_allclose(waveform, speech, atol=1e-4)
    else:  # lossy codecs keep the duration to within a frame's delay
        assert abs(waveform.size - speech.size) < 2400


@pytest.mark.parametrize("container,codec,rate", [("webm", "libopus", 48000), ("mp4", "aac", 44100)])
def test_browser_webm_opus_and_phone_m4a_aac_decode_through_pyav(speech, container, codec, rate):
    waveform = decode(pyav_bytes(speech, container, codec, rate))
    assert abs(waveform.size / 16000 - speech.size / 16000) < 0.1


def test_stereo_is_mixed_down(speech):
    stereo = np.stack([speech, 0.5 * speech], axis=1)
    np.testing.assert_allclose(decode(soundfile_bytes(stereo, 16000, "WAV", "FLOAT")), 0.75 * speech,
                               atol=1e-6)


def test_other_rates_are_resampled_to_the_model_rate_as_resample_poly_would(speech):
    at_48k = scipy.signal.resample_poly(speech, 3, 1).astype(np.float32)
    waveform = decode(soundfile_bytes(at_48k, 48000, "WAV", "FLOAT"))
    np.testing.assert_allclose(waveform, scipy.signal.resample_poly(at_48k, 1, 3), atol=1e-5)


@pytest.mark.parametrize("rate", [4000, 7999, 192001, 384000])
def test_sample_rates_outside_8_to_192_khz_are_422_before_decoding(speech, rate):
    problem = assert_problem(soundfile_bytes(speech, rate, "WAV"), 422, "unsupported-sample-rate")
    assert "8000-192000 Hz" in problem.detail


def test_an_awkward_rate_near_the_top_is_resampled_in_bounded_time(speech):
    # 191 999 Hz is coprime with 16 kHz: an exact polyphase filter would have ~3.8 M taps.
    clip = np.tile(speech, 4)  # 7.5 s of audio at 191 999 Hz (read as such), 1.44 M samples
    started = time.perf_counter()
    waveform = decode(soundfile_bytes(clip, 191_999, "WAV", "FLOAT"))
    assert time.perf_counter() - started < 2.0
    assert abs(waveform.size - round(clip.size * 16000 / 191_999)) <= 1


def test_unknown_bytes_are_415_naming_the_supported_formats():
    problem = assert_problem(b"this is a text file, not audio\n" * 40, 415, "unsupported-audio-format")
    assert all(fmt in problem.detail for fmt in SUPPORTED_FORMATS)


def test_truncated_flac_is_422_corrupt(speech):
    assert_problem(soundfile_bytes(speech, 16000, "FLAC")[:3000], 422, "corrupt-audio")


def test_empty_upload_is_422():
    assert_problem(b"", 422, "empty-file")


def test_shorter_than_0_3_s_is_422(speech):
    problem = assert_problem(soundfile_bytes(speech[:4000], 16000, "WAV"), 422, "audio-too-short")
    assert "0.25 s" in problem.detail


def test_longer_than_the_limit_is_413_from_the_header_without_decoding(speech):
    long_flac = soundfile_bytes(np.tile(speech, 40), 16000, "FLAC")  # 75.1 s
    problem = assert_problem(long_flac, 413, "audio-too-long")
    assert "60 s" in problem.detail
    assert_problem(soundfile_bytes(speech, 16000, "WAV"), 413, "audio-too-long", max_seconds=1.0)


def test_long_opus_without_a_declared_length_stops_decoding_at_the_limit(speech):
    webm = pyav_bytes(np.tile(speech, 4), "webm", "libopus", 48000)  # 7.5 s
    assert_problem(webm, 413, "audio-too-long", max_seconds=5.0)


def test_digital_silence_is_422_no_speech():
    problem = assert_problem(soundfile_bytes(np.zeros(16000, np.float32), 16000, "WAV"),
                             422, "silent-audio")
    assert problem.detail.startswith("no speech: the audio is silent")


def test_nan_samples_are_422(speech):
    broken = speech.copy()
    broken[100] = np.nan
    assert_problem(soundfile_bytes(broken, 16000, "WAV", "FLOAT"), 422, "invalid-samples")
