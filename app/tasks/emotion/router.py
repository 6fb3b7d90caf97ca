"""``POST /v1/emotion/predict``: speech clips (multipart ``audio``, repeated, or one raw ``audio/*``
body) -> the emotion of each, with per-window segments."""

from __future__ import annotations

from fastapi import APIRouter

from app.core.codecs.audio import SUPPORTED_FORMATS, decode_audio
from app.core.errors import ProblemError
from app.core.execution import checkpoint
from app.core.limits import EMOTION_MAX_INSTANCES as MAX_INSTANCES
from app.core.schemas import class_list
from app.core.pipeline import Endpoint, Job, Outcome, register
from app.tasks.emotion.preprocess import enough_speech, speech_frames, summary_features
from app.tasks.emotion.schemas import EmotionPredictResponse

router = APIRouter()


def run(job: Job) -> Outcome:
    model = job.model
    rate = model.params.sample_rate
    predictions, rows = [], []
    for instance in job.instances:
        checkpoint()
        with job.timing.measure("decode"):
            waveform = decode_audio(instance.data, instance.field, max_seconds=job.settings.max_audio_seconds,
                                    target_rate=rate, reject_silent=False)
            speech = speech_frames(waveform)  # the service's own voice activity, whatever the model
            if not enough_speech(speech):
                raise ProblemError(422, "no-speech", f"{instance.field} holds no speech (silence, a steady "
                                   "tone or noise); send a recording of someone speaking.", field=instance.field)
        with job.timing.measure("inference"):
            result = model.classify(waveform, rate, speech)
        predictions.append({
            "label": result.emotion, "confidence": result.confidence,
            "probabilities": result.probabilities, "classes": class_list(result.probabilities),
            "duration_s": result.duration_s,
            "segments": [{"start_s": s["start_s"], "end_s": s["end_s"], "label": s["emotion"],
                          "confidence": s["confidence"]} for s in result.segments]})
        rows.append({"prediction": result.emotion, "confidence": result.confidence,
                     "features": summary_features(result.waveform)})
    return Outcome(predictions, rows, raw_inputs=[i.data for i in job.instances])


register(router, Endpoint(
    operation_id="emotion_predict", path="/v1/emotion/predict", tag="emotion", model="emotion",
    summary="Recognise the emotion in speech clips",
    description="One prediction per clip, in the order sent: the clip's emotion (the mean of its 3 s "
                "windows' probabilities) and each window's. Trained on German (EmoDB) and Polish (nEMO) "
                "acted speech through simulated phone and browser channels, over a voice encoder "
                "pretrained on English speakers; non-commercial use only (CC BY-NC-SA 4.0); see the "
                "model card (docs/models/emotion.md) for its limits.",
    run=run, response_schema=EmotionPredictResponse, gate="audio",
    file_field="audio", file_description="speech, 0.3 s to MAX_AUDIO_SECONDS (60 s by default), "
                                         "8-192 kHz: " + ", ".join(SUPPORTED_FORMATS),
    raw_media=("audio/",), max_instances=MAX_INSTANCES,
    response_example={"model": "emotion", "version": "1.5.0", "request_id": "019ab2c3d4e5f60718293a4b5c6d7e8f",
                      "predictions": [{"label": "anger", "confidence": 0.91,
                                       "probabilities": {"anger": 0.91, "boredom": 0.01, "disgust": 0.01,
                                                         "fear": 0.03, "happiness": 0.02, "sadness": 0.01,
                                                         "neutral": 0.01},
                                       "duration_s": 2.5, "segments": [{"start_s": 0.0, "end_s": 2.5,
                                                                        "label": "anger", "confidence": 0.91}]}]},
))
