"""``POST /v1/fault/predict``: readings (temperature, vibration) to the probability of a fault."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from app.core.pipeline import Endpoint, Instance, Job, Outcome, register

MAX_READINGS = 100
router = APIRouter()


class Reading(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(ge=-50, le=200, description="degrees C")
    vibration: float = Field(ge=0, le=100, description="mm/s")


class FaultRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instances: list[Reading] = Field(min_length=1, max_length=MAX_READINGS)


class FaultPrediction(BaseModel):
    label: str
    confidence: float
    probability: float = Field(description="probability of a fault")


class FaultResponse(BaseModel):
    model: str
    version: str
    request_id: str
    predictions: list[FaultPrediction]


def run(job: Job) -> Outcome:
    readings = [i.value for i in job.instances]
    x = np.array([[r["temperature"], r["vibration"]] for r in readings])
    with job.timing.measure("inference"):
        probability = job.model.predict(x)
    predictions, rows = [], []
    for reading, p in zip(readings, probability.tolist(), strict=True):
        label = "fault" if p >= 0.5 else "ok"
        confidence = p if label == "fault" else 1.0 - p
        predictions.append({"label": label, "confidence": confidence, "probability": p})
        rows.append({"prediction": label, "confidence": confidence, "features": dict(reading)})
    return Outcome(predictions, rows)


register(router, Endpoint(
    operation_id="fault_predict", path="/v1/fault/predict", tag="fault", model="fault",
    summary="Whether each reading shows a fault", description="Readings to the probability of a fault.",
    run=run, response_schema=FaultResponse, gate="light", json_schema=FaultRequest,
    json_instances=lambda body: [Instance(f"instances[{i}]", value=r.model_dump())
                                 for i, r in enumerate(body.instances)],
    max_instances=MAX_READINGS, json_values_per_instance=4,
))
