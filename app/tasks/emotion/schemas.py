"""Response shapes of ``POST /v1/emotion/predict``."""

from __future__ import annotations

from pydantic import BaseModel, Field

from app.core.schemas import ClassProbability, Envelope


class EmotionSegment(BaseModel):
    start_s: float = Field(description="window start in the uploaded clip, seconds")
    end_s: float = Field(description="window end (the clip's end for the last, padded window)")
    label: str
    confidence: float = Field(ge=0.0, le=1.0)


class EmotionPrediction(BaseModel):
    label: str = Field(description="the most probable emotion for the whole clip")
    confidence: float = Field(ge=0.0, le=1.0, description="its probability")
    probabilities: dict[str, float] = Field(description="clip probabilities: the mean over the "
                                                        "scored windows")
    classes: list[ClassProbability] = Field(description="the same probabilities as a list, in the model's "
                                                        "label order: typed fields for generated clients")
    duration_s: float = Field(description="duration of the decoded audio")
    segments: list[EmotionSegment] = Field(description="the scored windows (window_s long, "
                                                       "overlapping by hop_s), in time order")


class EmotionPredictResponse(Envelope):
    predictions: list[EmotionPrediction]
