"""Polyphase resampling of audio that arrives in blocks, in bounded memory.

:class:`StreamingResampler` gives the same samples as ``scipy.signal.resample_poly`` on the whole
signal (Kaiser window, beta 5, ``10 * max(up, down)`` taps each side: scipy's defaults), but holds
only one block plus the filter's context at a time: an upload is decoded and resampled block by
block and only the model-rate waveform is ever kept. Each block is cut at a multiple of ``down``
input samples with ``context`` input samples of real neighbours on each side, so every output sample
sees exactly the inputs it would see in one pass; the stream's two ends are zero-padded, as
``resample_poly`` pads.

Rates whose reduced ratio has a term above :data:`MAX_RATIO_TERM` (383 999 Hz -> 16 000 Hz reduces
to 16000/383999 and would need a ~7.7 M-tap filter) are resampled by the nearest ratio with terms
up to that bound instead: 191 999 Hz -> 16 000 Hz becomes 1/12, a rate error of 5 ppm.
"""

from __future__ import annotations

from fractions import Fraction
from math import ceil, gcd

import numpy as np
import scipy.signal

MAX_RATIO_TERM = 1000  # largest up/down term: filters of at most 20 001 taps
BLOCK_TARGET = 32_768  # input samples per resampling step (rounded to a multiple of ``down``)


def resampling_ratio(orig_sr: int, target_sr: int) -> tuple[int, int]:
    """``(up, down)``: exact when its terms are small, else the nearest ratio with small terms."""
    g = gcd(int(orig_sr), int(target_sr))
    up, down = int(target_sr) // g, int(orig_sr) // g
    if max(up, down) <= MAX_RATIO_TERM:
        return up, down
    limit = MAX_RATIO_TERM
    while True:
        ratio = Fraction(int(target_sr), int(orig_sr)).limit_denominator(limit)
        if max(ratio.numerator, ratio.denominator) <= MAX_RATIO_TERM and ratio.numerator > 0:
            return ratio.numerator, ratio.denominator
        limit //= 2


class StreamingResampler:
    """Feed mono float blocks with :meth:`push`, then call :meth:`finish`; each returns the
    resampled samples that are ready (float32)."""

    def __init__(self, orig_sr: int, target_sr: int) -> None:
        self.orig_sr, self.target_sr = int(orig_sr), int(target_sr)
        self.up, self.down = resampling_ratio(self.orig_sr, self.target_sr)
        self.passthrough = self.up == self.down
        self.n_in = 0
        self.n_out = 0
        if self.passthrough:
            return
        max_rate = max(self.up, self.down)
        half_len = 10 * max_rate
        # scipy's resample_poly filter (it multiplies by ``up`` itself when given the window array)
        self.window = scipy.signal.firwin(2 * half_len + 1, 1.0 / max_rate, window=("kaiser", 5.0))
        context = ceil((half_len + 1) / self.up) + 1
        self.context = ceil(context / self.down) * self.down
        self.block = max(1, BLOCK_TARGET // self.down) * self.down
        self._buffer = np.zeros(self.context, dtype=np.float32)  # leading zeros, as resample_poly pads

    def _run(self, chunk: np.ndarray, n_real: int) -> np.ndarray:
        """Resample ``chunk`` (context + n_real + context samples) and keep the centre's outputs."""
        out = scipy.signal.resample_poly(chunk, self.up, self.down, window=self.window)
        start = self.context * self.up // self.down
        return out[start:start + n_real * self.up // self.down].astype(np.float32)

    def push(self, samples: np.ndarray) -> np.ndarray:
        samples = np.asarray(samples, dtype=np.float32).ravel()
        self.n_in += samples.size
        if self.passthrough:
            self.n_out += samples.size
            return samples
        self._buffer = np.concatenate([self._buffer, samples])
        pieces = []
        span = self.context + self.block + self.context
        while self._buffer.size >= span:
            pieces.append(self._run(self._buffer[:span], self.block))
            self._buffer = self._buffer[self.block:]
        return self._emit(pieces)

    def finish(self) -> np.ndarray:
        """The last samples: the stream's end is zero-padded and the output trimmed to
        ``ceil(n_in * up / down)`` samples, as ``resample_poly`` returns."""
        if self.passthrough:
            return np.zeros(0, dtype=np.float32)
        real = self._buffer.size - self.context
        padded_real = ceil(real / self.down) * self.down
        chunk = np.concatenate([self._buffer, np.zeros(padded_real - real + self.context, np.float32)])
        self._buffer = np.zeros(0, dtype=np.float32)
        total = ceil(self.n_in * self.up / self.down)
        last = self._run(chunk, padded_real) if padded_real else np.zeros(0, dtype=np.float32)
        return self._emit([last[:max(0, total - self.n_out)]])

    def _emit(self, pieces: list[np.ndarray]) -> np.ndarray:
        out = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
        self.n_out += out.size
        return out


def resample(waveform: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """A whole mono waveform through :class:`StreamingResampler` (float32)."""
    resampler = StreamingResampler(orig_sr, target_sr)
    wav = np.asarray(waveform, dtype=np.float32)
    return np.concatenate([resampler.push(wav), resampler.finish()])
