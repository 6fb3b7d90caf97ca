"""Audio bytes -> float32 waveform, with the limits applied in one place.

Two decoders, tried in order:
- ``soundfile`` (libsndfile >= 1.1): WAV, FLAC, OGG/Vorbis, OGG/Opus and MP3, fast and exact.
- PyAV (``av``, which ships its own FFmpeg): WebM/Opus from browsers' MediaRecorder, M4A/AAC from
  phones, and anything else FFmpeg reads that libsndfile does not.

Decoding is bounded in memory and CPU, whatever the upload claims:
- the sample rate must be within 8-192 kHz and the channels at most 32 (checked from the header,
  before decoding);
- the header's length is checked first where there is one, and decoding stops one block past
  ``max_seconds`` otherwise, so a small, highly compressed upload cannot expand into gigabytes;
- each decoded block is mixed down to mono and resampled to the model rate at once
  (:class:`~app.core.codecs.resample.StreamingResampler`): only the model-rate waveform is kept,
  never the native-rate signal (60 s at 192 kHz would be 46 MB of float32 per channel);
- the request's deadline is checked between blocks (:func:`~app.core.execution.checkpoint`).

Statuses: 415 when no decoder recognises the bytes (the detail names the supported formats),
422 when a recognised file is corrupt, too short, silent or holds non-finite samples, and
413 when it is longer than the limit.
"""

from __future__ import annotations

import io
import logging

import numpy as np

from app.core.codecs.resample import StreamingResampler
from app.core.errors import ProblemError
from app.core.execution import checkpoint, memory_budget
from app.core.limits import AUDIO_SAMPLE_RATES, MAX_AUDIO_CHANNELS, MIN_AUDIO_SECONDS

log = logging.getLogger("app.codecs.audio")

SUPPORTED_FORMATS = ("WAV", "FLAC", "OGG/Vorbis", "OGG/Opus", "MP3", "WebM/Opus", "M4A/AAC")
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = AUDIO_SAMPLE_RATES
MAX_CHANNELS = MAX_AUDIO_CHANNELS
SILENCE_RMS_DBFS = -60.0   # quieter than this over the whole clip: nothing to classify
_BLOCK_FRAMES = 65_536


class _TooLong(Exception):
    pass


def _supported() -> str:
    return ", ".join(SUPPORTED_FORMATS)


def _unsupported(field: str) -> ProblemError:
    return ProblemError(415, "unsupported-audio-format",
                        f"{field} is not audio in a supported format ({_supported()}).",
                        field=field, supported=list(SUPPORTED_FORMATS))


def _corrupt(field: str, exc: Exception) -> ProblemError:
    reason = str(exc).strip().rstrip(".") or type(exc).__name__
    return ProblemError(422, "corrupt-audio", f"{field} could not be decoded: {reason}.", field=field)


def _too_long(field: str, max_seconds: float, seconds: float | None = None) -> ProblemError:
    length = f"{seconds:.1f} s long" if seconds is not None else f"longer than {max_seconds:g} s"
    return ProblemError(413, "audio-too-long",
                        f"{field} is {length}; the limit is {max_seconds:g} s.",
                        field=field, max_seconds=max_seconds)


def _check_stream(field: str, sample_rate: int, channels: int) -> None:
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise ProblemError(422, "unsupported-sample-rate",
                           f"{field} has a sample rate of {sample_rate} Hz; supported rates are "
                           f"{MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz.", field=field)
    if not 1 <= channels <= MAX_CHANNELS:
        raise ProblemError(422, "unsupported-channels",
                           f"{field} has {channels} channels; at most {MAX_CHANNELS} are supported.",
                           field=field)


class _Collector:
    """Mixes decoded blocks ``(frames, channels)`` down to mono and resamples them to the target
    rate as they arrive; refuses more than ``max_frames`` input frames (the duration limit)."""

    def __init__(self, sample_rate: int, target_rate: int, max_frames: int) -> None:
        self.max_frames = max_frames
        self.resampler = StreamingResampler(sample_rate, target_rate)
        self.blocks: list[np.ndarray] = []
        self.frames = 0

    def add(self, block: np.ndarray) -> None:
        block = np.asarray(block, dtype=np.float32)
        if block.size == 0:
            return
        checkpoint()
        memory_budget(block.nbytes)
        self.frames += block.shape[0]
        if self.frames > self.max_frames:
            raise _TooLong
        mono = block.mean(axis=1, dtype=np.float32) if block.ndim == 2 else block
        self.blocks.append(self.resampler.push(mono))

    def result(self) -> np.ndarray:
        self.blocks.append(self.resampler.finish())
        return np.concatenate(self.blocks)


def _decode_soundfile(data: bytes, field: str, max_seconds: float, target_rate: int
                      ) -> np.ndarray | None:
    """Decode with libsndfile; ``None`` when it does not recognise the format."""
    import soundfile as sf

    try:
        handle = sf.SoundFile(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        return None
    with handle:
        sample_rate, channels = int(handle.samplerate), int(handle.channels)
        _check_stream(field, sample_rate, channels)
        max_frames = int(max_seconds * sample_rate)
        if handle.frames > max_frames and handle.frames < 2**62:  # unknown length reads as huge
            raise _too_long(field, max_seconds, handle.frames / sample_rate)
        collector = _Collector(sample_rate, target_rate, max_frames)
        try:
            while True:
                block = handle.read(_BLOCK_FRAMES, dtype="float32", always_2d=True)
                if block.shape[0] == 0:
                    break
                collector.add(block)
        except _TooLong:
            raise _too_long(field, max_seconds) from None
        except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
            raise _corrupt(field, exc) from exc
    return collector.result()


def _decode_pyav(data: bytes, field: str, max_seconds: float, target_rate: int) -> np.ndarray:
    """Decode with FFmpeg through PyAV (WebM/Opus, M4A/AAC, ...); 415 when FFmpeg cannot either."""
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, UnicodeDecodeError) as exc:
        raise _unsupported(field) from exc
    with container:
        streams = [s for s in container.streams if s.type == "audio"]
        if not streams:
            raise _unsupported(field)
        stream = streams[0]
        sample_rate = int(stream.codec_context.sample_rate or stream.rate or 0)
        channels = int(stream.codec_context.channels or 0)
        _check_stream(field, sample_rate, channels)
        max_frames = int(max_seconds * sample_rate)
        if stream.duration is not None and stream.time_base is not None:
            declared = float(stream.duration * stream.time_base)
            if declared > max_seconds + 0.5:  # container durations are rounded; decoding decides
                raise _too_long(field, max_seconds, declared)
        # Planar float at the stream's own rate and layout: frames come as (channels, samples).
        resampler = av.AudioResampler(format="fltp", layout=stream.layout, rate=sample_rate)
        collector = _Collector(sample_rate, target_rate, max_frames)
        decoded_any = False
        try:
            for frame in container.decode(stream):
                decoded_any = True
                for out in resampler.resample(frame):
                    collector.add(out.to_ndarray().T)
            for out in resampler.resample(None):
                collector.add(out.to_ndarray().T)
        except _TooLong:
            raise _too_long(field, max_seconds) from None
        except (av.FFmpegError, ValueError) as exc:
            if not decoded_any:
                raise _unsupported(field) from exc
            raise _corrupt(field, exc) from exc
    if not decoded_any:
        raise ProblemError(422, "corrupt-audio", f"{field} holds no decodable audio frames.",
                           field=field)
    return collector.result()


def decode_audio(data: bytes, field: str, *, max_seconds: float, target_rate: int,
                 min_seconds: float = MIN_AUDIO_SECONDS, reject_silent: bool = True) -> np.ndarray:
    """Decode an uploaded audio file to a mono float32 waveform in [-1, 1] at ``target_rate``.

    Raises :class:`ProblemError` for anything that is not a usable clip of ``min_seconds`` to
    ``max_seconds`` of audio at a supported sample rate, and (``reject_silent``) for a clip quieter
    than SILENCE_RMS_DBFS as a whole; a task that finds the speech itself turns that off.
    """
    if not data:
        raise ProblemError(422, "empty-file", f"{field} is empty.", field=field)
    waveform = _decode_soundfile(data, field, max_seconds, target_rate)
    if waveform is None:
        waveform = _decode_pyav(data, field, max_seconds, target_rate)
    if not np.all(np.isfinite(waveform)):
        raise ProblemError(422, "invalid-samples", f"{field} contains NaN or infinite samples.",
                           field=field)
    seconds = waveform.shape[0] / target_rate
    if seconds < min_seconds:
        raise ProblemError(422, "audio-too-short",
                           f"{field} is {seconds:.2f} s long; at least {min_seconds:g} s is needed.",
                           field=field, min_seconds=min_seconds)
    rms = float(np.sqrt(np.dot(waveform, waveform) / max(1, waveform.size)))
    if reject_silent and 20.0 * np.log10(max(rms, 1e-12)) < SILENCE_RMS_DBFS:
        raise ProblemError(422, "silent-audio",
                           f"no speech: the audio is silent ({field} is quieter than "
                           f"{SILENCE_RMS_DBFS:g} dBFS).", field=field)
    return waveform
