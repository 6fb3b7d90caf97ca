"""The channels a voice reaches the service through, simulated on a 16 kHz mono clip.

Training augments with them (``training/emotion.py``) and ``bench/emotion_eval.py`` scores the
held-out speakers through fixed instances of them, so both mean the same thing by "telephone" or
"Opus at 24 kbit/s". Pure numpy/scipy, plus PyAV for the Opus codec.
"""

from __future__ import annotations

import io

import av
import numpy as np
import scipy.signal
import soundfile as sf

RATE = 16_000
TELEPHONE_BAND_HZ = (300.0, 3400.0)
TELEPHONE_RATE = 8_000
MU = 255.0


def _as_float32(wav: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(wav, dtype=np.float32), -1.0, 1.0).astype(np.float32)


def mu_law(wav: np.ndarray) -> np.ndarray:
    """8-bit mu-law (G.711) quantisation, decoded back to float."""
    x = np.clip(wav, -1.0, 1.0)
    code = np.round(np.sign(x) * np.log1p(MU * np.abs(x)) / np.log1p(MU) * 127.0) / 127.0
    return (np.sign(code) * np.expm1(np.abs(code) * np.log1p(MU)) / MU).astype(np.float32)


def telephone(wav: np.ndarray) -> np.ndarray:
    """300-3400 Hz band (4th-order Butterworth), 8 kHz, mu-law: ``(samples at 8 kHz)``."""
    sos = scipy.signal.butter(4, TELEPHONE_BAND_HZ, btype="bandpass", fs=RATE, output="sos")
    band = scipy.signal.sosfilt(sos, np.asarray(wav, dtype=np.float64))
    return mu_law(scipy.signal.resample_poly(band, 1, 2))


def telephone_wav_bytes(wav: np.ndarray) -> bytes:
    """A telephone-channel copy as the 8 kHz mu-law WAV file a phone gateway would pass on."""
    buffer = io.BytesIO()
    sf.write(buffer, telephone(wav), TELEPHONE_RATE, format="WAV", subtype="ULAW")
    return buffer.getvalue()


def opus_bytes(wav: np.ndarray, bit_rate: int, container: str = "webm") -> bytes:
    """The clip encoded with libopus at ``bit_rate`` bit/s (16 kHz input, mono), as a browser's
    MediaRecorder sends it (WebM) or in Ogg."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream("libopus", rate=RATE)
        stream.layout = "mono"
        stream.bit_rate = int(bit_rate)
        frame = av.AudioFrame.from_ndarray(_as_float32(wav)[None, :], format="flt", layout="mono")
        frame.sample_rate = RATE
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buffer.getvalue()


def decode_to_16k(data: bytes) -> np.ndarray:
    """Any PyAV-readable bytes -> mono float32 at 16 kHz."""
    with av.open(io.BytesIO(data)) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=RATE)
        chunks = []
        for frame in container.decode(audio=0):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


def opus(wav: np.ndarray, bit_rate: int) -> np.ndarray:
    """The clip after an Opus round trip at ``bit_rate``, trimmed or padded to its length."""
    decoded = decode_to_16k(opus_bytes(wav, bit_rate))
    out = np.zeros(len(wav), dtype=np.float32)
    n = min(len(out), len(decoded))
    out[:n] = decoded[:n]
    return out


def noise(n: int, rng: np.random.Generator, colour: str = "white") -> np.ndarray:
    """Unit-RMS noise: white, pink (1/f) or brown (1/f^2) as in rooms, fans and traffic."""
    white = rng.standard_normal(n)
    if colour != "white":
        spectrum = np.fft.rfft(white)
        f = np.maximum(np.fft.rfftfreq(n, 1.0 / RATE), 20.0)
        spectrum /= np.sqrt(f) if colour == "pink" else f
        white = np.fft.irfft(spectrum, n)
    return (white / (np.sqrt(np.mean(white ** 2)) + 1e-12)).astype(np.float32)


def add_noise(wav: np.ndarray, snr_db: float, rng: np.random.Generator,
              colour: str = "white") -> np.ndarray:
    """Noise at ``snr_db`` below the clip's RMS level."""
    rms = float(np.sqrt(np.mean(np.asarray(wav, np.float64) ** 2))) + 1e-8
    return _as_float32(wav + noise(len(wav), rng, colour) * np.float32(rms / 10 ** (snr_db / 20)))


def reverb(wav: np.ndarray, rt60_s: float, rng: np.random.Generator, wet: float = 0.5) -> np.ndarray:
    """A synthetic room: exponentially decaying noise impulse response with reverberation time
    ``rt60_s``, mixed with the direct sound, at the clip's peak level."""
    length = int(rt60_s * RATE)
    t = np.arange(length) / RATE
    response = rng.standard_normal(length) * np.exp(-6.9 * t / rt60_s)
    response[0] = 0.0
    response /= np.sqrt(np.sum(response ** 2)) + 1e-12
    wet_signal = scipy.signal.fftconvolve(wav, response)[:len(wav)]
    mixed = (1.0 - wet) * np.asarray(wav, np.float64) + wet * wet_signal
    peak = float(np.max(np.abs(wav))) or 1.0
    return _as_float32(mixed * peak / (float(np.max(np.abs(mixed))) + 1e-12))


def gain(wav: np.ndarray, db: float) -> np.ndarray:
    """Level change by ``db`` (clipped at full scale) and 16-bit quantisation, as a WAV stores it."""
    out = np.clip(np.asarray(wav, np.float64) * 10 ** (db / 20), -1.0, 1.0)
    return (np.round(out * 32767.0) / 32767.0).astype(np.float32)


def speed(wav: np.ndarray, factor: float) -> np.ndarray:
    """Played ``factor`` times faster (pitch moves with it), as tape or resampling would."""
    up = 100
    down = round(up * factor)
    return _as_float32(scipy.signal.resample_poly(wav, up, down))


def muffled(wav: np.ndarray, cutoff_hz: float) -> np.ndarray:
    """A cheap microphone or a hand over the phone: low-pass at ``cutoff_hz`` plus a gentle
    low-cut at 150 Hz."""
    sos = scipy.signal.butter(4, (150.0, cutoff_hz), btype="bandpass", fs=RATE, output="sos")
    return _as_float32(scipy.signal.sosfilt(sos, np.asarray(wav, np.float64)))


def upsampled_telephone(wav: np.ndarray) -> np.ndarray:
    """:func:`telephone` brought back to 16 kHz as the server's decoder does."""
    from app.tasks.emotion.preprocess import resample

    return resample(telephone(wav), TELEPHONE_RATE, RATE)[:len(wav)]


def random_channel(wav: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One training copy: speed 0.9-1.1 (half the copies), a room (30 %), a codec or band
    (telephone, Opus 8-32 kbit/s, muffled microphone or none), noise at 5-20 dB SNR (half), and
    a gain from -30 to +10 dB."""
    out = np.asarray(wav, dtype=np.float32)
    if rng.random() < 0.5:
        out = speed(out, float(rng.uniform(0.9, 1.1)))
    if rng.random() < 0.3:
        out = reverb(out, float(rng.uniform(0.2, 0.8)), rng, wet=float(rng.uniform(0.2, 0.6)))
    if rng.random() < 0.5:
        out = add_noise(out, float(rng.uniform(5, 20)), rng,
                        colour=str(rng.choice(["white", "pink", "brown"])))
    channel = rng.random()
    if channel < 0.25:
        out = upsampled_telephone(out)
    elif channel < 0.5:
        out = opus(out, int(rng.choice([8000, 12000, 16000, 24000, 32000])))
    elif channel < 0.6:
        out = muffled(out, float(rng.uniform(3000, 6000)))
    return gain(out, float(rng.uniform(-30, 10)))
