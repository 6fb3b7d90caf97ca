"""The streaming resampler: scipy's resample_poly result, block by block, in bounded memory."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal

from app.core.codecs.resample import (
    MAX_RATIO_TERM,
    StreamingResampler,
    resampling_ratio,
)


def stream(x: np.ndarray, orig: int, target: int, rng: np.random.Generator) -> np.ndarray:
    resampler = StreamingResampler(orig, target)
    out, i = [], 0
    while i < x.size:  # irregular blocks, as decoders hand them out
        step = int(rng.integers(1, 70_000))
        out.append(resampler.push(x[i:i + step]))
        i += step
    out.append(resampler.finish())
    return np.concatenate(out)


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 24000, 44100, 48000, 96000, 192000])
@pytest.mark.parametrize("n", [1, 441, 48_000, 100_003])
def test_blocks_give_resample_poly_on_the_whole_signal(rate, n):
    rng = np.random.default_rng(n)
    x = rng.normal(0.0, 0.3, n).astype(np.float32)
    up, down = resampling_ratio(rate, 16000)
    expected = scipy.signal.resample_poly(x, up, down).astype(np.float32)
    got = stream(x, rate, 16000, rng)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_same_rate_passes_through():
    x = np.arange(10, dtype=np.float32)
    resampler = StreamingResampler(16000, 16000)
    np.testing.assert_array_equal(np.concatenate([resampler.push(x), resampler.finish()]), x)


@pytest.mark.parametrize("rate", [191_999, 176_401, 44_101])
def test_awkward_ratios_use_small_terms_and_a_nearby_rate(rate):
    up, down = resampling_ratio(rate, 16000)
    assert max(up, down) <= MAX_RATIO_TERM
    assert abs(rate * up / down - 16000) / 16000 < 1e-3


def test_a_tone_keeps_its_frequency_and_level():
    t = np.arange(44100 * 2) / 44100
    tone = (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    out = stream(tone, 44100, 16000, np.random.default_rng(0))
    spectrum = np.abs(np.fft.rfft(out * np.hanning(out.size)))
    assert np.fft.rfftfreq(out.size, 1 / 16000)[spectrum.argmax()] == pytest.approx(440.0, abs=1.0)
    assert np.sqrt(np.mean(out[1000:-1000] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)
