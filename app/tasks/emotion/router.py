"""``POST /v1/emotion/predict``: one audio clip (multipart field ``audio``) -> its emotion."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, File, Request, UploadFile

from app.core.codecs.audio import SUPPORTED_FORMATS, decode_audio
from app.core.execution import execution_of
from app.core.registry import model_dependency
from app.core.uploads import read_upload
from app.monitoring.log import log_predictions
from app.tasks.emotion.model import EmotionModel, EmotionResult
from app.tasks.emotion.preprocess import summary_features
from app.tasks.emotion.schemas import EmotionPrediction, EmotionSegment

router = APIRouter(prefix="/v1/emotion", tags=["emotion"])

_PROBLEMS = {status: {"description": text, "content": {"application/problem+json": {}}}
             for status, text in {
                 413: "file or audio too long (see max_audio_seconds)",
                 415: "not audio in a supported format",
                 422: "empty, corrupt, shorter than 0.3 s, silent, or missing the audio field",
                 503: "model not loaded"}.items()}


def _decode_and_classify(model: EmotionModel, data: bytes) -> tuple[EmotionResult, dict[str, float]]:
    rate = model.params.sample_rate
    waveform = decode_audio(data, "audio", max_seconds=model.settings.max_audio_seconds,
                            target_rate=rate)
    result = model.classify(waveform, rate)
    return result, summary_features(result.waveform, model.params)


@router.post("/predict", response_model=EmotionPrediction, responses=_PROBLEMS,
             summary="Recognise the emotion in a speech clip")
async def predict(request: Request,
                  audio: UploadFile = File(description="speech, 0.3 s to max_audio_seconds (60 s by "
                                                       "default): " + ", ".join(SUPPORTED_FORMATS)),
                  model: EmotionModel = Depends(model_dependency("emotion"))) -> EmotionPrediction:
    data = await read_upload(audio, "audio", model.settings.max_upload_bytes)
    started = time.perf_counter()
    result, features = await execution_of(request).run(request, "audio", _decode_and_classify,
                                                       model, data)
    latency_ms = (time.perf_counter() - started) * 1000.0
    log_predictions(request, model, [{"prediction": result.emotion, "confidence": result.confidence,
                                      "features": features}],
                    latency_ms=latency_ms, raw_inputs=[data])
    return EmotionPrediction(
        emotion=result.emotion, confidence=result.confidence, probabilities=result.probabilities,
        duration_s=result.duration_s, segments=[EmotionSegment(**s) for s in result.segments],
        model=model.metadata.get("name", model.task), version=model.version,
        request_id=str(getattr(request.state, "request_id", "")))
