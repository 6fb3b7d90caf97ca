"""Request and response schemas of the clustering endpoints.

Numbers are strict: JSON booleans and numeric strings are rejected, and so are ``NaN`` and
``Infinity`` (Python's JSON parser accepts those literals, so the schema must refuse them).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.core.limits import CLUSTERING_MAX_ROWS as MAX_ROWS
from app.core.limits import FIT_MAX_COLUMNS as MAX_COLUMNS
from app.core.limits import FIT_MAX_K as MAX_K
from app.core.limits import FIT_MAX_ROWS, PALETTE_COLOURS
from app.core.schemas import Envelope

MIN_COLOURS, MAX_COLOURS = PALETTE_COLOURS
DEFAULT_COLOURS = 5

FiniteNumber = Annotated[float, Field(strict=True, allow_inf_nan=False)]
StrictInt = Annotated[int, Field(strict=True)]


class ClusteringInstance(BaseModel):
    """One customer: the model's features (GET /v1/models/clustering), in their original units."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"annual_income": 15,
                                                                              "spending_score": 39}]})

    annual_income: FiniteNumber = Field(description="annual income, k$")
    spending_score: FiniteNumber = Field(description="spending score, 1-100")


class ClusteringPredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"instances": [{"annual_income": 15, "spending_score": 39},
                                    {"annual_income": 120, "spending_score": 10}]}]})

    instances: list[ClusteringInstance] = Field(min_length=1, max_length=MAX_ROWS,
                                                description="one object per customer")


class Assignment(BaseModel):
    cluster: int = Field(description="index of the nearest centroid")
    segment: str = Field(description="human-readable name of that cluster")
    distance: float = Field(description="Euclidean distance to the nearest centroid (scaled space)")
    distances: list[float] = Field(description="distance to every centroid, by cluster index")


class ClusteringPredictResponse(Envelope):
    predictions: list[Assignment]


class ClusteringFitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"data": [[15, 39], [15, 81], [16, 6], [16, 77], [17, 40], [17, 76]],
                      "k": None, "k_min": 2, "k_max": 4, "scale": True}]})

    data: list[Annotated[list[FiniteNumber], Field(min_length=1, max_length=MAX_COLUMNS)]] = Field(
        min_length=1, max_length=FIT_MAX_ROWS,
        description=f"rows of numbers, all the same length (at most {FIT_MAX_ROWS} x {MAX_COLUMNS})")
    k: StrictInt | None = Field(None, ge=2, le=MAX_K, description="fixed k; null: choose by silhouette")
    k_min: StrictInt = Field(2, ge=2, le=MAX_K)
    k_max: StrictInt = Field(10, ge=2, le=MAX_K)
    scale: Annotated[bool, Field(strict=True)] = Field(
        True, description="standard-scale the columns first (centroids are returned unscaled)")


class KInertia(BaseModel):
    k: int
    inertia: float


class KSilhouette(BaseModel):
    k: int
    silhouette: float | None


class FitResult(BaseModel):
    k: int
    selection: Literal["requested", "silhouette"] = Field(description="how k was chosen")
    elbow_k: int | None = Field(description="knee of the inertia curve (null unless k was scanned)")
    scaled: bool
    n_rows: int
    n_columns: int
    centroids: list[list[float]] = Field(description="cluster centres in the data's original units")
    labels: list[int] = Field(description="cluster index of every row, in order")
    cluster_sizes: list[int]
    inertia: float = Field(description="within-cluster sum of squares (in the scaled space if scaled)")
    silhouette: float | None
    elbow: list[KInertia] = Field(description="inertia per k (the elbow curve)")
    silhouettes: list[KSilhouette] = Field(description="mean silhouette per k")
    silhouette_sample_size: int = Field(description="rows the silhouettes were computed on")
    duration_ms: float


class ClusteringFitResponse(Envelope):
    predictions: list[FitResult] = Field(description="one result: the fit of the data sent")


class PaletteEntry(BaseModel):
    hex: str = Field(examples=["#1f77b4"])
    rgb: tuple[int, int, int]
    fraction: float = Field(description="share of the (opaque, sampled) pixels nearest this colour")


class PaletteResult(BaseModel):
    colors: list[PaletteEntry] = Field(description="dominant colours, largest fraction first")
    requested: int
    pixels_sampled: int
    width: int
    height: int


class PaletteParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    colors: int = Field(DEFAULT_COLOURS, ge=MIN_COLOURS, le=MAX_COLOURS, description="how many colours")


class ClusteringPaletteResponse(Envelope):
    predictions: list[PaletteResult] = Field(description="one palette per image, in the order sent")

