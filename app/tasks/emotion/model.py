"""The served emotion model: a LiteRT model over per-window spectrograms, clip = mean of windows."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from app.core.registry import ServedModel
from app.core.runtime import TFLiteRunner
from app.tasks.emotion.preprocess import (
    FEATURES,
    LOG_MEL_DECADES,
    LOG_MEL_OFFSET,
    FeatureParams,
    clip_windows,
    prepare_waveform,
    rms_db,
    speech_frames,
)

# Windows this much quieter than the loudest window (pauses, trailing silence) are not scored:
# the model never saw silence-only windows, and averaging them in only adds noise.
QUIET_WINDOW_DB = 30.0
# Kept around the first and last speech frame: the onset and the release of the voice.
SPEECH_MARGIN_S = 0.15


def speech_span(waveform: np.ndarray, params: FeatureParams,
                speech: np.ndarray | None = None) -> tuple[int, int]:
    """``(start, end)`` samples from the first to the last speech frame (voice activity of
    ``preprocess.speech_frames``, or ``speech`` where the caller has it already) plus
    SPEECH_MARGIN_S each side; the whole clip if no frame carries speech. Leading and trailing
    pauses (a recording started early, stopped late) would otherwise be scored as part of the
    utterance. Training trims its clips with this too."""
    frames = np.flatnonzero(speech_frames(waveform, params) if speech is None else speech)
    if frames.size == 0:
        return 0, int(waveform.size)
    margin = int(SPEECH_MARGIN_S * params.sample_rate)
    start = max(0, int(frames[0]) * params.hop_length - margin)
    end = min(int(waveform.size), int(frames[-1]) * params.hop_length + margin)
    return start, max(end, start + 1)


@dataclass
class EmotionResult:
    emotion: str
    confidence: float
    probabilities: dict[str, float]
    duration_s: float
    segments: list[dict[str, float | str]]
    waveform: np.ndarray  # mono at the model rate, for summary_features


class EmotionModel(ServedModel):
    task = "emotion"

    def _load_artifacts(self) -> None:
        self.labels = [str(label) for label in self.metadata["labels"]]
        stored = self.metadata.get("params", {}).get("preprocessing", {})
        names = {f.name for f in fields(FeatureParams)}
        self.params = FeatureParams(**{k: v for k, v in stored.items() if k in names})
        # A model trained on speech spans is served speech spans; older versions, whole clips.
        self.speech_span = bool(self.metadata.get("params", {}).get("speech_span", False))
        # 8 windows (12 s of audio) per call bound the interpreter's arena; a minute is 39 windows.
        self.runner = TFLiteRunner(self.path / "model.tflite", max_batch=8, **self.runner_threads())
        expected = (self.params.n_frames, self.params.n_features)
        if tuple(self.runner.input_shape[1:]) != expected:
            raise ValueError(f"model input {self.runner.input_shape} does not match the "
                             f"preprocessing in metadata.json {expected}")
        if self.runner.output_shape[-1] != len(self.labels):
            raise ValueError(f"model has {self.runner.output_shape[-1]} outputs for "
                             f"{len(self.labels)} labels")

    def preprocessing(self) -> dict[str, Any]:
        params = self.params
        spectrum = {"mel": "mel power",
                    "logmel": f"log-mel (log10, floored {10 * LOG_MEL_DECADES:g} dB below the "
                              f"window's peak, then (x + {LOG_MEL_OFFSET:g}) / {LOG_MEL_OFFSET:g})"}
        window = (f"{params.n_mels}-band {spectrum[params.kind]} at {params.level_dbfs:g} dBFS RMS "
                  "(a short clip repeated to fill the window)" if params.kind in spectrum
                  else f"{params.n_mfcc} MFCCs, c0 minus its window mean")
        run = ("one run per window, each from the model's initial state (reset the interpreter's "
               "variable tensors first: the LSTM state)" if params.kind == "mel" else "one run per window")
        return {"code": "app/tasks/emotion/preprocess.py", "parameters": self.params.to_dict(),
                "steps": ["decode to mono at the sample rate",
                          "cut to the speech span (app/tasks/emotion/model.py speech_span)",
                          f"{self.params.window_s:g} s windows every {self.params.hop_s:g} s, each {window}",
                          run, "the clip's probabilities: the mean over its windows"]}

    def warm_up(self) -> None:
        rng = np.random.default_rng(0)
        self.classify(rng.normal(0, 0.1, self.params.window_samples + 8000).astype(np.float32),
                      self.params.sample_rate)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Window probabilities ``(windows, classes)`` for a batch of model inputs."""
        return self.runner.run(batch)

    def classify(self, waveform: np.ndarray, sample_rate: int,
                 speech: np.ndarray | None = None) -> EmotionResult:
        """A decoded clip (any rate, mono or ``(samples, channels)``) -> clip and window results,
        from its speech span (:func:`speech_span`) when the model was trained on spans; window
        times are in the uploaded clip. ``speech``: the clip's ``speech_frames`` where the caller
        has computed them (the router, to refuse a clip without speech), used when the clip is
        mono at the analysis rate, so the voice activity runs once per request."""
        wav = prepare_waveform(waveform, sample_rate, self.params)
        if speech is not None and (sample_rate != FEATURES.sample_rate or wav.shape != np.shape(waveform)
                                   or len(speech) != 1 + wav.size // FEATURES.hop_length):
            speech = None  # flags of another signal: analyse this one
        first, last = speech_span(wav, FEATURES, speech) if self.speech_span else (0, wav.size)
        voiced = wav[first:last]
        batch, spans = clip_windows(voiced, self.params)
        levels = np.array([rms_db(voiced[int(s * self.params.sample_rate):int(e * self.params.sample_rate)])
                           for s, e in spans])
        offset = first / self.params.sample_rate
        spans = [(start + offset, end + offset) for start, end in spans]
        keep = np.flatnonzero(levels >= levels.max() - QUIET_WINDOW_DB)
        window_probs = self.predict(batch[keep])
        clip_probs = window_probs.mean(axis=0)
        best = int(np.argmax(clip_probs))
        segments = []
        for i, probs in zip(keep, window_probs):
            start, end = spans[i]
            top = int(np.argmax(probs))
            segments.append({"start_s": round(start, 3), "end_s": round(end, 3),
                             "emotion": self.labels[top], "confidence": round(float(probs[top]), 4)})
        return EmotionResult(
            emotion=self.labels[best], confidence=round(float(clip_probs[best]), 4),
            probabilities={label: round(float(p), 4) for label, p in zip(self.labels, clip_probs)},
            duration_s=round(wav.size / self.params.sample_rate, 3), segments=segments, waveform=wav)


MODEL_CLASS = EmotionModel
