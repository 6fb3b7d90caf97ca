"""Clustering endpoints: customer segments, ad-hoc K-means with the choice of k, colour palettes.

- ``POST /v1/clustering/predict``: rows of the model's features -> nearest segment (the committed
  K-means model; identical to scikit-learn's ``KMeans.predict``).
- ``POST /v1/clustering/fit``: any numeric table -> K-means with k requested or chosen by
  silhouette, with the elbow curve. Does not need the committed model.
- ``POST /v1/clustering/palette``: an image -> its dominant colours (K-means in CIE Lab).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from PIL import Image

from app.core.codecs.image import load_image, open_image
from app.core.config import Settings, get_settings
from app.core.errors import ProblemError
from app.core.execution import checkpoint, execution_of
from app.core.limits import CLUSTERING_MAX_MAGNITUDE, PALETTE_WORKING_PIXELS
from app.core.registry import model_dependency
from app.core.uploads import read_upload
from app.monitoring.log import log_predictions
from app.tasks.clustering.model import ClusteringModel
from app.tasks.clustering.preprocess import (
    Scaler,
    count_distinct_rows,
    dominant_colours,
    opaque_pixels,
    select_k,
    summary_features,
)
from app.tasks.clustering.schemas import (
    DEFAULT_COLOURS,
    MAX_COLOURS,
    MIN_COLOURS,
    FitRequest,
    FitResponse,
    PaletteResponse,
    PredictRequest,
    PredictResponse,
)

router = APIRouter(prefix="/v1/clustering", tags=["clustering"])

# Ad-hoc fits must answer within a few seconds for 10 000 x 50: modest restarts and iterations, the
# k scan and silhouettes on a fixed-seed subsample (see preprocess.select_k).
FIT_SEED = 0
FIT_N_INIT = 3
FIT_MAX_ITER = 100
FIT_SAMPLE_SIZE = 2000
PALETTE_SAMPLE_SIZE = 50_000


@dataclass(frozen=True)
class _LogIdentity:
    """What ``log_predictions`` reads of a model. Ad-hoc fits are logged under their own name so
    their "prediction" (the chosen k) never mixes with the segment model's drift statistics."""

    task: str
    version: str


FIT_LOG = _LogIdentity(task="clustering-fit", version="adhoc")


def request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "")


def app_settings(request: Request) -> Settings:
    return getattr(request.app.state, "settings", None) or get_settings()


# --- predict ---------------------------------------------------------------------------------------

def instances_matrix(instances: list[dict[str, float]], features: list[str]) -> np.ndarray:
    """(n, d) float64 in ``features`` order; 422 naming the first instance with a missing/extra key.

    The values themselves are already checked finite numbers (schemas.FiniteNumber).
    """
    expected = set(features)
    for i, instance in enumerate(instances):
        if instance.keys() == expected:
            continue
        missing = [f for f in features if f not in instance]
        if missing:
            raise ProblemError(422, "missing-feature",
                               f"instances[{i}] has no {missing[0]!r}; each instance needs exactly "
                               f"{', '.join(features)}.", field=f"instances[{i}].{missing[0]}")
        extra = sorted(set(instance) - expected)[0]
        raise ProblemError(422, "unknown-feature",
                           f"instances[{i}].{extra} is not a feature of this model; each instance "
                           f"needs exactly {', '.join(features)}.", field=f"instances[{i}].{extra}")
    return np.array([[instance[f] for f in features] for instance in instances], dtype=np.float64)


@dataclass
class Segmentation:
    labels: np.ndarray
    distances: np.ndarray
    x: np.ndarray
    compute_ms: float


MAX_MAGNITUDE = CLUSTERING_MAX_MAGNITUDE


def out_of_range(field: str) -> ProblemError:
    return ProblemError(422, "value-out-of-range", f"{field} holds a value too large to compute with "
                        f"(|value| must be at most {MAX_MAGNITUDE:g}).", field=field,
                        max_magnitude=MAX_MAGNITUDE)


def assign(instances: list[dict[str, float]], model: ClusteringModel) -> Segmentation:
    x = instances_matrix(instances, model.features)
    too_large = np.flatnonzero(np.abs(x).max(axis=1) > MAX_MAGNITUDE)
    if too_large.size:
        raise out_of_range(f"instances[{int(too_large[0])}]")
    started = time.perf_counter()
    labels, distances = model.predict(x)
    return Segmentation(labels, distances, x, (time.perf_counter() - started) * 1000.0)


def margin(distances: np.ndarray) -> np.ndarray:
    """1 - nearest / second-nearest distance: 0 on a boundary between two segments, 1 on a centroid."""
    two = np.sort(distances, axis=1)[:, :2]
    return np.where(two[:, 1] > 0, 1.0 - two[:, 0] / np.where(two[:, 1] > 0, two[:, 1], 1.0), 0.0)


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses={422: {"description": "a missing, unknown, non-numeric or non-finite feature value, "
                                    "or no / too many instances"}},
    summary="Customer segment of each instance",
)
async def predict(
    request: Request,
    body: PredictRequest,
    model: Annotated[ClusteringModel, Depends(model_dependency("clustering"))],
) -> dict[str, Any]:
    """Assign each instance to the nearest centroid of the committed K-means model (scaled space).

    Each instance is an object with exactly the model's features (see ``GET /v1/models``), in the
    original units, e.g. ``{"annual_income": 15, "spending_score": 39}``.
    """
    result = await execution_of(request).run(request, "light", assign, body.instances, model)
    segments = model.segments
    labels = result.labels.tolist()
    distances = result.distances.tolist()
    confidences = margin(result.distances).tolist()
    log_predictions(request, model, [
        {"prediction": segments[label], "confidence": confidence,
         "features": summary_features(dict(zip(model.features, row, strict=True)))}
        for label, confidence, row in zip(labels, confidences, result.x.tolist(), strict=True)
    ], latency_ms=result.compute_ms)
    return {
        "model": model.task, "version": model.version, "request_id": request_id(request),
        "features": model.features, "segments": segments,
        "predictions": [{"cluster": label, "segment": segments[label], "distance": row[label],
                         "distances": row} for label, row in zip(labels, distances, strict=True)],
    }


# --- fit -------------------------------------------------------------------------------------------

def fit(body: FitRequest, rid: str) -> dict[str, Any]:
    """Validate the shape, scale, scan or fit k (blocking: run off the event loop)."""
    started = time.perf_counter()
    width = len(body.data[0])
    for i, row in enumerate(body.data):
        if len(row) != width:
            raise ProblemError(422, "ragged-rows", f"data[{i}] has {len(row)} value(s) but data[0] has "
                               f"{width}; every row needs the same number of columns.", field=f"data[{i}]")
    if body.k is None and body.k_min > body.k_max:
        raise ProblemError(422, "invalid-k-range", f"k_min ({body.k_min}) is larger than k_max "
                           f"({body.k_max}).", field="k_min")
    x = np.asarray(body.data, dtype=np.float64)
    if np.abs(x).max() > MAX_MAGNITUDE:
        raise out_of_range("data")
    largest_k = body.k if body.k is not None else body.k_max
    distinct = count_distinct_rows(x)
    if distinct < largest_k or len(x) <= largest_k:
        raise ProblemError(422, "too-few-rows",
                           f"data has {len(x)} rows ({distinct} distinct); k={largest_k} needs more than "
                           f"{largest_k} rows with at least {largest_k} distinct.", field="data")
    with np.errstate(over="ignore", invalid="ignore"):
        scaler = Scaler.fit(x) if body.scale else Scaler.identity(width)
        z = scaler.transform(x)
    if not np.isfinite(z).all():
        raise out_of_range("data")
    selection = select_k(z, k=body.k, k_min=body.k_min, k_max=body.k_max,
                         seed=FIT_SEED, n_init=FIT_N_INIT, max_iter=FIT_MAX_ITER,
                         sample_size=FIT_SAMPLE_SIZE, between_fits=checkpoint)
    chosen = selection.chosen
    return {
        "k": chosen.k, "selection": selection.method, "elbow_k": selection.elbow_k,
        "scaled": body.scale, "n_rows": len(x), "n_columns": width,
        "centroids": scaler.inverse_transform(chosen.centers).tolist(),
        "labels": chosen.labels.tolist(),
        "cluster_sizes": np.bincount(chosen.labels, minlength=chosen.k).tolist(),
        "inertia": chosen.inertia, "silhouette": chosen.silhouette,
        "elbow": [{"k": f.k, "inertia": f.inertia} for f in selection.fits],
        "silhouettes": [{"k": f.k, "silhouette": f.silhouette} for f in selection.fits],
        "silhouette_sample_size": selection.silhouette_sample_size,
        "duration_ms": round((time.perf_counter() - started) * 1000.0, 3),
        "request_id": rid,
    }


@router.post(
    "/fit",
    response_model=FitResponse,
    responses={422: {"description": "non-numeric, non-finite or ragged data, too many rows or "
                                    "columns, k out of range, fewer rows than k"}},
    summary="K-means on your own data, with the choice of k",
)
async def fit_endpoint(request: Request, body: FitRequest) -> dict[str, Any]:
    """K-means (k-means++, fixed seed) on ``data``: with ``k`` as given, or the k in
    ``k_min..k_max`` with the best mean silhouette (the elbow of the inertia curve is reported too).

    Inputs of more than 2 000 rows scan k on a fixed-seed 2 000-row subsample and refit the chosen
    k on every row, so up to 10 000 x 50 answers within a few seconds.
    """
    request.state.model_name = "clustering"
    result = await execution_of(request).run(request, "heavy", fit, body, request_id(request))
    log_predictions(request, FIT_LOG, [  # type: ignore[arg-type]
        {"prediction": str(result["k"]), "confidence": result["silhouette"],
         "features": {"rows": float(result["n_rows"]), "columns": float(result["n_columns"])}}
    ], latency_ms=result["duration_ms"])
    return result


# --- palette ---------------------------------------------------------------------------------------

def working_image(image: Image.Image) -> Image.Image:
    """At most PALETTE_WORKING_PIXELS pixels (nearest neighbour: only colours the image has), so a
    4096 x 4096 upload costs ~50 MB, not ~350; 50 000 pixels are sampled from it anyway."""
    factor = int(np.ceil(np.sqrt(image.width * image.height / PALETTE_WORKING_PIXELS)))
    if factor <= 1:
        return image
    if image.mode not in ("RGB", "RGBA", "L", "LA", "P", "PA"):
        image = image.convert("RGBA")
    return image.resize((max(1, image.width // factor), max(1, image.height // factor)),
                        Image.NEAREST)


def palette(data: bytes, n_colours: int, max_pixels: int, rid: str) -> dict[str, Any]:
    image = open_image(data, "image", max_pixels=max_pixels)
    width, height = image.size
    if image.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale when the image is that large
        side = int(np.sqrt(PALETTE_WORKING_PIXELS))
        image.draft("RGB", (side, side))
    loaded = load_image(image, "image")
    if width != height and (loaded.width > loaded.height) != (width > height):
        width, height = height, width  # EXIF orientation turned it
    image = working_image(loaded)
    del loaded
    checkpoint()
    pixels = opaque_pixels(np.asarray(image.convert("RGBA")))
    if len(pixels) == 0:
        raise ProblemError(422, "transparent-image", "image has no opaque pixels.", field="image")
    colours = dominant_colours(pixels, n_colours, sample_size=PALETTE_SAMPLE_SIZE, seed=0)
    return {
        "colors": [{"hex": c.hex, "rgb": list(c.rgb), "fraction": c.fraction} for c in colours],
        "requested": n_colours, "pixels_sampled": min(len(pixels), PALETTE_SAMPLE_SIZE),
        "width": width, "height": height, "request_id": rid,
    }


@router.post(
    "/palette",
    response_model=PaletteResponse,
    responses={413: {"description": "file or image too large"},
               415: {"description": "not an image in a supported format"},
               422: {"description": "empty, corrupt or fully transparent image; colors out of range"}},
    summary="Dominant colours of an image",
)
async def palette_endpoint(
    request: Request,
    image: Annotated[UploadFile, File(description="PNG, JPEG, WebP, BMP, GIF or TIFF")],
    colors: Annotated[int, Form(ge=MIN_COLOURS, le=MAX_COLOURS,
                                description="how many colours")] = DEFAULT_COLOURS,
) -> dict[str, Any]:
    """K-means in CIE Lab on a fixed-seed sample of up to 50 000 opaque pixels (pixels less than
    half opaque are ignored). Deterministic for the same image; fewer colours come back when the
    image has fewer distinct ones. Sorted by fraction, largest first."""
    request.state.model_name = "clustering"
    settings = app_settings(request)
    data = await read_upload(image, "image", settings.max_upload_bytes)
    return await execution_of(request).run(request, "heavy", palette, data, colors,
                                           settings.max_image_pixels, request_id(request))
