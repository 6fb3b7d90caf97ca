"""Waveform -> model input for speech-emotion recognition, in numpy/scipy only.

This module is the one source of truth for the features: ``training/emotion.py`` and the serving
path both call it. librosa is the reference implementation (``librosa.feature.mfcc`` with the
parameters in :data:`FEATURES`), but importing it at serving time costs 150-250 MiB RSS and ~12 s
of numba compilation, so the MFCC is re-implemented here step by step as librosa does it, in float64:
centred STFT with zero padding and a periodic Hann window padded to ``n_fft``, power spectrum,
Slaney mel filterbank (built in float32 as librosa builds it), ``power_to_db`` (ref 1, amin 1e-10,
top_db 80) and an orthonormal DCT-II. ``tests/unit/test_emotion_preprocess.py`` proves the match
within 1e-4 on real EmoDB files.

A clip is cut into fixed-length windows (``window_s`` with ``hop_s``; short clips are zero-padded
at the end); each window gives one MFCC map. Only c0 is normalised per window (its mean over the
frames that hold audio is subtracted): c0 is the one coefficient a recording gain moves, while the
absolute values of c1.. carry spectral tilt and shape, which are emotion cues (per-window mean or
variance normalisation of all coefficients cost 20-30 points of speaker-grouped CV accuracy). Frames
past the end of a short clip hold the clip's mean frame, so the window holds no artificial silence
(repeating the clip instead scored 7 points lower in CV).
The global per-coefficient standardisation is a Normalization layer inside the exported model.

Models with a pretrained encoder take the spectrogram that encoder was trained on instead, each
window at ``level_dbfs`` RMS over the audio it holds and a short clip repeated to fill its window
(an encoder reads padding as a pause): the 40-band mel power of the GE2E voice encoder
(``kind="mel"``, :data:`ENCODER_FEATURES`, 25 ms windows, no log) or the 80-band log-mel of
Whisper's speech encoder (``kind="logmel"``, :data:`SPEECH_ENCODER_FEATURES`: ``log10``, floored
80 dB below the window's peak, then ``(x + 4) / 4``, as Whisper scales it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import scipy.fft
import scipy.signal

from app.core.codecs.resample import resample as stream_resample

SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class FeatureParams:
    sample_rate: int = SAMPLE_RATE
    n_fft: int = 512            # 32 ms FFT
    win_length: int = 400       # 25 ms Hann window, centred in the FFT frame
    hop_length: int = 160       # 10 ms
    n_mels: int = 64
    n_mfcc: int = 40
    fmin: float = 0.0
    fmax: float = 8000.0
    top_db: float = 80.0
    amin: float = 1e-10
    window_s: float = 3.0       # model input: 3 s covers most EmoDB utterances (mean 2.78 s)
    hop_s: float = 1.5          # long clips: windows overlap by half
    kind: str = "mfcc"          # "mfcc"; "mel" (GE2E) or "logmel" (Whisper): an encoder's input
    level_dbfs: float = -30.0   # "mel" and "logmel": each window's RMS level

    @property
    def n_features(self) -> int:
        """Values per frame of the model input."""
        return self.n_mfcc if self.kind == "mfcc" else self.n_mels

    @property
    def window_samples(self) -> int:
        return int(round(self.window_s * self.sample_rate))

    @property
    def hop_samples(self) -> int:
        return int(round(self.hop_s * self.sample_rate))

    @property
    def n_frames(self) -> int:
        """Frames per window (centred STFT): 1 + window_samples // hop_length."""
        return 1 + self.window_samples // self.hop_length

    def librosa_kwargs(self) -> dict[str, object]:
        """The arguments that make ``librosa.feature.mfcc`` compute exactly :func:`mfcc`."""
        return {"sr": self.sample_rate, "n_mfcc": self.n_mfcc, "n_fft": self.n_fft,
                "hop_length": self.hop_length, "win_length": self.win_length, "window": "hann",
                "center": True, "pad_mode": "constant", "power": 2.0, "n_mels": self.n_mels,
                "fmin": self.fmin, "fmax": self.fmax, "htk": False, "mel_norm": "slaney",
                "dct_type": 2, "norm": "ortho", "lifter": 0}

    def to_dict(self) -> dict[str, object]:
        if self.kind in ENCODER_KINDS:
            scale = {} if self.kind == "mel" else {
                "scale": f"log10, floored {LOG_MEL_DECADES:g} decades below the window's peak, "
                         f"then (x + {LOG_MEL_OFFSET:g}) / {LOG_MEL_OFFSET:g}"}
            return {**asdict(self), "window_samples": self.window_samples,
                    "hop_samples": self.hop_samples, "n_frames": self.n_frames,
                    "window": "hann (periodic), centred, zero-padded", "power": 2.0,
                    "mel_norm": "slaney", "htk": False, **scale,
                    "normalisation": f"per window: gained to {self.level_dbfs:g} dBFS RMS over its "
                                     "audio; a short clip repeated to fill the window"}
        return {**asdict(self), "window_samples": self.window_samples,
                "hop_samples": self.hop_samples, "n_frames": self.n_frames,
                "window": "hann (periodic), centred, zero-padded", "power": 2.0, "mel_norm": "slaney",
                "htk": False, "dct": "type II, ortho", "db_ref": 1.0,
                "normalisation": "per window: c0 minus its mean over the audio frames; frames "
                                 "past a short clip's end = the clip's mean frame; global "
                                 "standardisation inside the model"}


ENCODER_KINDS = ("mel", "logmel")
# Whisper's log-mel scaling: log10 of the mel power, at most 8 decades (80 dB) below the window's
# peak, then (x + 4) / 4.
LOG_MEL_DECADES = 8.0
LOG_MEL_OFFSET = 4.0

FEATURES = FeatureParams()
# The GE2E voice encoder's input: 40 mel bands of a 400-sample FFT.
ENCODER_FEATURES = FeatureParams(n_fft=400, win_length=400, n_mels=40, kind="mel")
# Whisper's speech encoder's input (training/speech_encoder.py): 80 log-mel bands of a 400-sample FFT.
SPEECH_ENCODER_FEATURES = FeatureParams(n_fft=400, win_length=400, n_mels=80, kind="logmel",
                                        level_dbfs=-25.0)


# ---------------------------------------------------------------- waveform
def to_mono(waveform: np.ndarray) -> np.ndarray:
    """Average the channels of a ``(samples,)`` or ``(samples, channels)`` array."""
    wav = np.asarray(waveform, dtype=np.float32)
    if wav.ndim == 2:
        wav = wav.mean(axis=1, dtype=np.float32)
    elif wav.ndim != 1:
        raise ValueError(f"waveform must be 1-D or (samples, channels), got shape {wav.shape}")
    return wav


def resample(waveform: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling to ``target_sr``: ``scipy.signal.resample_poly``'s result, computed in
    blocks by the same streaming resampler that decodes uploads (one source of truth)."""
    return stream_resample(to_mono(waveform), int(orig_sr), int(target_sr))


def prepare_waveform(waveform: np.ndarray, sample_rate: int,
                     params: FeatureParams = FEATURES) -> np.ndarray:
    """Any channel count and rate -> mono float32 at the model rate."""
    return resample(to_mono(waveform), sample_rate, params.sample_rate)


QUIET_PEAK_DBFS = -6.0  # a clip whose peak is below this is gained to full scale


def peak_normalised(waveform: np.ndarray) -> np.ndarray:
    """The clip at the level the model knows. Every EmoDB recording is peak-normalised to full scale,
    so a quiet recording (a phone held away, a soft voice: peak under QUIET_PEAK_DBFS) is gained to
    it; a clip near full scale is used as it is, sample for sample."""
    wav = np.asarray(waveform, dtype=np.float32)
    peak = float(np.abs(wav).max()) if wav.size else 0.0
    if peak == 0.0 or 20.0 * np.log10(peak) >= QUIET_PEAK_DBFS:
        return wav
    return (wav / np.float32(peak)).astype(np.float32)


def rms_db(waveform: np.ndarray) -> float:
    """Root-mean-square level in dB relative to full scale (floored at -120 dBFS)."""
    wav = np.asarray(waveform, dtype=np.float64)
    rms = float(np.sqrt(np.mean(wav * wav))) if wav.size else 0.0
    return float(20.0 * np.log10(max(rms, 1e-6)))


def window_starts(n_samples: int, params: FeatureParams = FEATURES) -> list[int]:
    """Window start samples covering the clip: every ``hop`` and one flush with the end."""
    win, hop = params.window_samples, params.hop_samples
    if n_samples <= win:
        return [0]
    starts = list(range(0, n_samples - win + 1, hop))
    if starts[-1] + win < n_samples:
        starts.append(n_samples - win)
    return starts


# ---------------------------------------------------------------- MFCC (librosa-equivalent)
def _hz_to_mel(freqs: np.ndarray) -> np.ndarray:
    """Slaney's auditory-toolbox mel scale: linear below 1 kHz, logarithmic above."""
    freqs = np.asanyarray(freqs, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = freqs / f_sp
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    log_t = freqs >= min_log_hz
    mels[log_t] = min_log_mel + np.log(freqs[log_t] / min_log_hz) / logstep
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    mels = np.asanyarray(mels, dtype=np.float64)
    f_sp = 200.0 / 3
    freqs = f_sp * mels
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    log_t = mels >= min_log_mel
    freqs[log_t] = min_log_hz * np.exp(logstep * (mels[log_t] - min_log_mel))
    return freqs


def mel_filterbank(params: FeatureParams = FEATURES) -> np.ndarray:
    """``(n_mels, 1 + n_fft // 2)`` Slaney-normalised triangles, float32 as ``librosa.filters.mel``."""
    n_bins = 1 + params.n_fft // 2
    fft_freqs = np.fft.rfftfreq(n=params.n_fft, d=1.0 / params.sample_rate)
    min_mel, max_mel = _hz_to_mel(np.array([params.fmin, params.fmax]))
    mel_f = _mel_to_hz(np.linspace(min_mel, max_mel, params.n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fft_freqs)
    # librosa stores the triangles in a float32 array before scaling; doing the same keeps the
    # match at the 1e-6 level instead of 1e-5.
    weights = np.zeros((params.n_mels, n_bins), dtype=np.float32)
    for i in range(params.n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:params.n_mels + 2] - mel_f[:params.n_mels]))[:, np.newaxis]
    return weights


_MEL_CACHE: dict[FeatureParams, np.ndarray] = {}


def _mel_basis(params: FeatureParams) -> np.ndarray:
    if params not in _MEL_CACHE:
        _MEL_CACHE[params] = mel_filterbank(params)
    return _MEL_CACHE[params]


def _analysis_window(params: FeatureParams) -> np.ndarray:
    window = scipy.signal.get_window("hann", params.win_length, fftbins=True)
    left = (params.n_fft - params.win_length) // 2
    return np.pad(window, (left, params.n_fft - params.win_length - left))


def _frames(waveform: np.ndarray, params: FeatureParams) -> np.ndarray:
    """Centred, zero-padded analysis frames ``(frames, n_fft)`` as a view (no copy), float64."""
    y = np.asarray(waveform, dtype=np.float64)
    pad = params.n_fft // 2
    y = np.pad(y, (pad, pad), mode="constant")
    if y.size < params.n_fft:
        raise ValueError(f"waveform too short for n_fft={params.n_fft}")
    return np.lib.stride_tricks.sliding_window_view(y, params.n_fft)[::params.hop_length]


def _power(frames: np.ndarray, params: FeatureParams) -> np.ndarray:
    spectrum = np.fft.rfft(frames * _analysis_window(params), n=params.n_fft, axis=-1)
    return (spectrum.real ** 2 + spectrum.imag ** 2).T


def power_spectrogram(waveform: np.ndarray, params: FeatureParams = FEATURES) -> np.ndarray:
    """``|STFT|^2`` as ``(1 + n_fft // 2, frames)``: centred frames, zero padding, float64."""
    return _power(_frames(waveform, params), params)


MEL_CHUNK_FRAMES = 512  # frames per FFT pass: a minute of audio never needs its whole spectrogram


def mel_power(waveform: np.ndarray, params: FeatureParams = FEATURES) -> np.ndarray:
    """Mel power spectrogram ``(n_mels, frames)``, computed 512 frames at a time (the same values
    as the mel basis applied to :func:`power_spectrogram`, in a fraction of the memory)."""
    frames = _frames(waveform, params)
    basis = _mel_basis(params).astype(np.float64)
    out = np.empty((params.n_mels, frames.shape[0]), dtype=np.float64)
    for start in range(0, frames.shape[0], MEL_CHUNK_FRAMES):
        chunk = frames[start:start + MEL_CHUNK_FRAMES]
        out[:, start:start + chunk.shape[0]] = basis @ _power(chunk, params)
    return out


def power_to_db(power: np.ndarray, params: FeatureParams = FEATURES) -> np.ndarray:
    """``librosa.power_to_db(S, ref=1.0, amin=1e-10, top_db=80)``."""
    log_spec = 10.0 * np.log10(np.maximum(params.amin, power))
    return np.maximum(log_spec, log_spec.max() - params.top_db)


def mfcc(waveform: np.ndarray, params: FeatureParams = FEATURES) -> np.ndarray:
    """MFCCs ``(n_mfcc, frames)`` of a mono waveform at ``params.sample_rate`` (librosa-equal)."""
    mel = mel_power(waveform, params)
    return scipy.fft.dct(power_to_db(mel, params), axis=-2, type=2, norm="ortho")[:params.n_mfcc]


def normalise(coefficients: np.ndarray, n_valid: int) -> np.ndarray:
    """Subtract c0's mean over the first ``n_valid`` frames; later (padding) frames get each
    coefficient's mean over those frames, so padding adds no artificial silence."""
    n_valid = max(1, min(n_valid, coefficients.shape[1]))
    out = np.array(coefficients, dtype=np.float64)
    out[0] -= out[0, :n_valid].mean()
    out[:, n_valid:] = out[:, :n_valid].mean(axis=1, keepdims=True)
    return out


def window_features(window: np.ndarray, n_valid_samples: int | None = None,
                    params: FeatureParams = FEATURES) -> np.ndarray:
    """One model input ``(n_frames, n_mfcc)`` float32 from up to ``window_samples`` of audio.

    Shorter audio is zero-padded at the end; ``n_valid_samples`` (default: the audio's length)
    says how much of it is real: the normalisation and the mean-fill use those frames only.
    """
    audio = np.asarray(window, dtype=np.float32)[:params.window_samples]
    n_valid = audio.size if n_valid_samples is None else min(n_valid_samples, audio.size)
    if params.kind in ENCODER_KINDS:
        return encoder_features(audio[:n_valid], params)
    padded = np.zeros(params.window_samples, dtype=np.float32)
    padded[:audio.size] = audio
    valid_frames = min(params.n_frames, 1 + n_valid // params.hop_length)
    coefficients = normalise(mfcc(padded, params), valid_frames)
    return coefficients.T.astype(np.float32)


def log_mel(power: np.ndarray) -> np.ndarray:
    """Whisper's scaling of a mel power spectrogram: ``log10`` (power floored at 1e-10), at most
    :data:`LOG_MEL_DECADES` below its peak, then ``(x + 4) / 4``."""
    logs = np.log10(np.maximum(power, 1e-10))
    logs = np.maximum(logs, logs.max() - LOG_MEL_DECADES)
    return (logs + LOG_MEL_OFFSET) / LOG_MEL_OFFSET


def encoder_features(audio: np.ndarray, params: FeatureParams = ENCODER_FEATURES) -> np.ndarray:
    """An encoder's input ``(n_frames, n_mels)`` float32 from up to one window of audio, gained to
    ``level_dbfs`` RMS and repeated to fill the window when shorter: mel power (``kind="mel"``)
    or :func:`log_mel` of it (``kind="logmel"``)."""
    audio = np.asarray(audio, dtype=np.float64)[:params.window_samples]
    if audio.size == 0:
        audio = np.zeros(1)
    gain = 10.0 ** (params.level_dbfs / 20.0) / max(float(np.sqrt(np.mean(audio * audio))), 1e-6)
    filled = np.resize(audio * gain, params.window_samples)
    power = mel_power(filled, params)
    return (log_mel(power) if params.kind == "logmel" else power).T.astype(np.float32)


def clip_windows(waveform: np.ndarray, params: FeatureParams = FEATURES
                 ) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """A mono model-rate clip -> ``(windows, n_frames, n_features)`` batch and each window's (start, end) s,
    from the clip at full scale (:func:`peak_normalised`)."""
    wav = peak_normalised(waveform)
    batch, spans = [], []
    for start in window_starts(wav.size, params):
        piece = wav[start:start + params.window_samples]
        batch.append(window_features(piece, piece.size, params))
        spans.append((start / params.sample_rate, (start + piece.size) / params.sample_rate))
    return np.stack(batch), spans


# ---------------------------------------------------------------- monitoring
SUMMARY_MFCC = 5


def summary_features(waveform: np.ndarray, params: FeatureParams = FEATURES) -> dict[str, float]:
    """Privacy-safe per-clip summary for the prediction log and drift reference.

    Duration, RMS and peak level in dBFS, and the clip means of the first raw (un-normalised)
    MFCCs: c0 follows loudness, c1-c4 the spectral tilt and shape of the channel and voice.
    Takes the mono waveform at the model rate.
    """
    wav = np.asarray(waveform, dtype=np.float32)
    coefficients = mfcc(wav, params)[:SUMMARY_MFCC] if wav.size else np.zeros((SUMMARY_MFCC, 1))
    peak = float(np.max(np.abs(wav))) if wav.size else 0.0
    features = {
        "duration_s": round(wav.size / params.sample_rate, 4),
        "rms_db": round(rms_db(wav), 4),
        "peak_db": round(float(20.0 * np.log10(max(peak, 1e-6))), 4),
    }
    for i, mean in enumerate(coefficients.mean(axis=1)):
        features[f"mfcc{i}_mean"] = round(float(mean), 4)
    return features


# ---- voice activity -------------------------------------------------------------------------------
# A frame carries speech when it is loud enough within the clip (within ACTIVE_RANGE_DB of its
# loudest frame: how loud the clip is overall does not matter), its 100-4000 Hz spectrum is not flat
# like noise (spectral flatness below MAX_FLATNESS) and not one line like a tone (its three
# strongest bins hold less than MAX_PEAK_SHARE of the band: a tone's hold 0.93-0.98, a soft low
# voice's voiced frames 0.3-0.97, median 0.88). Silence, a steady or swept tone and white noise
# have at most a couple of such frames; every clip of EmoDB, the RAVDESS subset and nEMO, also
# 30 dB quieter or with white noise 15 dB below it, has 40 or more (tests/unit/test_emotion_vad.py).
SPEECH_BAND_HZ = (100.0, 4000.0)
ACTIVE_RANGE_DB = 35.0
ABSOLUTE_FLOOR_DB = -100.0  # band power of digital silence and dither, whatever the clip's level
MAX_FLATNESS = 0.3
MAX_PEAK_SHARE = 0.9
MIN_SPEECH_S = 0.2


def speech_frames(waveform: np.ndarray, params: FeatureParams = FEATURES) -> np.ndarray:
    """One flag per analysis frame (the MFCC frames): whether it carries speech."""
    frames = _frames(waveform, params)
    freqs = np.fft.rfftfreq(params.n_fft, 1.0 / params.sample_rate)
    band = (freqs >= SPEECH_BAND_HZ[0]) & (freqs <= SPEECH_BAND_HZ[1])
    energy, flatness, peak_share = (np.empty(frames.shape[0]) for _ in range(3))
    for start in range(0, frames.shape[0], MEL_CHUNK_FRAMES):
        chunk = frames[start:start + MEL_CHUNK_FRAMES]
        # Each frame's mean removed: a DC offset's window leakage would otherwise reach the band as
        # a few strong low bins (a constant signal passed for speech).
        power = _power(chunk - chunk.mean(axis=1, keepdims=True), params)[band] + 1e-20
        stop = start + power.shape[1]
        mean = power.mean(axis=0)
        energy[start:stop] = 10.0 * np.log10(mean)
        flatness[start:stop] = np.exp(np.log(power).mean(axis=0)) / mean
        peak_share[start:stop] = np.sort(power, axis=0)[-3:].sum(axis=0) / power.sum(axis=0)
    active = (energy > ABSOLUTE_FLOOR_DB) & (energy > energy.max() - ACTIVE_RANGE_DB)
    return active & (flatness < MAX_FLATNESS) & (peak_share < MAX_PEAK_SHARE)


def enough_speech(frames: np.ndarray, params: FeatureParams = FEATURES) -> bool:
    """Whether :func:`speech_frames`' flags hold at least MIN_SPEECH_S of speech."""
    return int(np.sum(frames)) * params.hop_length >= MIN_SPEECH_S * params.sample_rate


def has_speech(waveform: np.ndarray, params: FeatureParams = FEATURES) -> bool:
    """At least MIN_SPEECH_S of speech frames."""
    return enough_speech(speech_frames(waveform, params), params)
