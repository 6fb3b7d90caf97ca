"""Response bodies of ``POST /v1/emotion/predict``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EmotionSegment(BaseModel):
    start_s: float = Field(description="window start in the uploaded clip, seconds")
    end_s: float = Field(description="window end (the clip's end for the last, padded window)")
    emotion: str
    confidence: float = Field(ge=0.0, le=1.0)


class EmotionPrediction(BaseModel):
    model_config = ConfigDict(protected_namespaces=(), json_schema_extra={"example": {
        "emotion": "anger", "confidence": 0.91,
        "probabilities": {"anger": 0.91, "boredom": 0.01, "disgust": 0.01, "fear": 0.03,
                          "happiness": 0.02, "sadness": 0.01, "neutral": 0.01},
        "duration_s": 2.5,
        "segments": [{"start_s": 0.0, "end_s": 2.5, "emotion": "anger", "confidence": 0.91}],
        "model": "emotion", "version": "1.3.0", "request_id": "6f1c2e0e9b2a4d7c"}})

    emotion: str = Field(description="the most probable emotion for the whole clip")
    confidence: float = Field(ge=0.0, le=1.0, description="its probability")
    probabilities: dict[str, float] = Field(description="clip probabilities: the mean over the "
                                                        "scored windows")
    duration_s: float = Field(description="duration of the decoded audio")
    segments: list[EmotionSegment] = Field(description="the scored windows (window_s long, "
                                                       "overlapping by hop_s), in time order")
    model: str
    version: str
    request_id: str
