"""Encoding test audio as clients send it: soundfile containers (WAV, FLAC, OGG, MP3) and PyAV
streams (WebM/Opus from browsers, M4A/AAC from phones)."""

from __future__ import annotations

import io

import av
import numpy as np
import scipy.signal
import soundfile as sf


def soundfile_bytes(waveform: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, waveform, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def pyav_bytes(waveform: np.ndarray, container: str, codec: str, rate: int) -> bytes:
    """Encode 16 kHz mono speech as a browser (WebM/Opus) or phone (M4A/AAC) would send it."""
    resampled = scipy.signal.resample_poly(waveform, rate // 1000, 16).astype(np.float32)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(resampled[None, :], format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buffer.getvalue()
