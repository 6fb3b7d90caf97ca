"""Clustering endpoints: customer segments, ad-hoc K-means with the choice of k, colour palettes.

- ``POST /v1/clustering/predict``: rows of the model's features -> nearest segment (the committed
  K-means model; identical to scikit-learn's ``KMeans.predict``).
- ``POST /v1/clustering/fit``: any numeric table -> K-means with k requested or chosen by
  silhouette, with the elbow curve. Needs no trained model: the envelope's ``model`` is
  ``clustering-fit`` and its ``version`` the algorithm's.
- ``POST /v1/clustering/palette``: images -> their dominant colours (K-means in CIE Lab); the
  envelope's ``model`` is ``clustering-palette``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter
from PIL import Image

from app.core.codecs.image import load_image, open_image
from app.core.errors import ProblemError
from app.core.execution import checkpoint
from app.core.limits import (
    CLUSTERING_MAX_MAGNITUDE,
    CLUSTERING_MAX_ROWS,
    FIT_MAX_COLUMNS,
    FIT_MAX_ROWS,
    PALETTE_MAX_INSTANCES,
    PALETTE_WORKING_PIXELS,
)
from app.core.pipeline import Endpoint, Instance, Job, Outcome, register
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
    ClusteringFitRequest,
    ClusteringFitResponse,
    ClusteringPaletteResponse,
    ClusteringPredictRequest,
    ClusteringPredictResponse,
    PaletteParams,
)

router = APIRouter()

# Ad-hoc fits must answer within a few seconds for 10 000 x 50: modest restarts and iterations, the
# k scan and silhouettes on a fixed-seed subsample (see preprocess.select_k).
FIT_SEED = 0
FIT_N_INIT = 3
FIT_MAX_ITER = 100
FIT_SAMPLE_SIZE = 2000
PALETTE_SAMPLE_SIZE = 50_000
ALGORITHM_VERSION = "1.0.0"  # of fit and palette: bump when their results change for the same input
MAX_MAGNITUDE = CLUSTERING_MAX_MAGNITUDE


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


def predict_run(job: Job) -> Outcome:
    model: ClusteringModel = job.model
    with job.timing.measure("inference"):
        result = assign([i.value for i in job.instances], model)
    segments = model.segments
    confidences = margin(result.distances).tolist()
    predictions, rows = [], []
    for label, row, confidence, x in zip(result.labels.tolist(), result.distances.tolist(), confidences,
                                         result.x.tolist(), strict=True):
        predictions.append({"cluster": label, "segment": segments[label], "distance": row[label],
                            "distances": row})
        rows.append({"prediction": segments[label], "confidence": confidence,
                     "features": summary_features(dict(zip(model.features, x, strict=True)))})
    raw = [json.dumps(i.value, separators=(",", ":")).encode() for i in job.instances] if job.store_inputs else None
    return Outcome(predictions, rows, raw_inputs=raw)


register(router, Endpoint(
    operation_id="clustering_predict", path="/v1/clustering/predict", tag="clustering", model="clustering",
    summary="Customer segment of each instance",
    description="Assigns each instance to the nearest centroid of the committed K-means model (scaled "
                "space). Each instance is an object with exactly the model's features (see GET "
                "/v1/models), in the original units, e.g. {\"annual_income\": 15, \"spending_score\": 39}.",
    run=predict_run, response_schema=ClusteringPredictResponse, gate="light",
    json_schema=ClusteringPredictRequest,
    json_instances=lambda body: [Instance(f"instances[{i}]", value=v.model_dump())
                                 for i, v in enumerate(body.instances)],
    max_instances=CLUSTERING_MAX_ROWS, json_values_per_instance=4,  # an object of the model's features
    json_error_codes={"missing": "missing-feature", "extra_forbidden": "unknown-feature"},
    response_example={"model": "clustering", "version": "1.0.0",
                      "request_id": "019ab2c3d4e5f60718293a4b5c6d7e8f",
                      "predictions": [{"cluster": 2, "segment": "low income, low spending", "distance": 0.31,
                                       "distances": [1.9, 2.4, 0.31, 2.2, 1.5]}]},
))


# --- fit -------------------------------------------------------------------------------------------

def fit(body: ClusteringFitRequest) -> dict[str, Any]:
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
    # As Python objects the rows take several times the array: let them go before the fit's own
    # working memory is taken, so a big fit's peak is the array's, not both.
    body.data = []
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
    }


def fit_run(job: Job) -> Outcome:
    with job.timing.measure("inference"):
        result = fit(job.instances[0].value)
    row = {"prediction": str(result["k"]), "confidence": result["silhouette"],
           "features": {"rows": float(result["n_rows"]), "columns": float(result["n_columns"])}}
    return Outcome([result], [row])


register(router, Endpoint(
    operation_id="clustering_fit", path="/v1/clustering/fit", tag="clustering", name="clustering-fit",
    version=ALGORITHM_VERSION, summary="K-means on your own data, with the choice of k",
    description="K-means (k-means++, fixed seed) on `data`: with `k` as given, or the k in k_min..k_max "
                "with the best mean silhouette (the elbow of the inertia curve is reported too). Inputs "
                "of more than 2 000 rows scan k on a fixed-seed 2 000-row subsample and refit the chosen "
                "k on every row, so up to 10 000 x 50 answers within a few seconds.",
    run=fit_run, response_schema=ClusteringFitResponse, gate="heavy",
    json_schema=ClusteringFitRequest, json_instances=lambda body: [Instance("data", value=body)],
    json_values_per_instance=FIT_MAX_ROWS * (FIT_MAX_COLUMNS + 1),
    response_example={"model": "clustering-fit", "version": ALGORITHM_VERSION,
                      "request_id": "019ab2c3d4e5f60718293a4b5c6d7e8f",
                      "predictions": [{"k": 2, "selection": "silhouette", "elbow_k": None, "scaled": True,
                                       "n_rows": 6, "n_columns": 2,
                                       "centroids": [[15.3, 78.0], [16.0, 28.3]], "labels": [1, 0, 1, 0, 1, 0],
                                       "cluster_sizes": [3, 3], "inertia": 0.41, "silhouette": 0.81,
                                       "elbow": [{"k": 2, "inertia": 0.41}, {"k": 3, "inertia": 0.2}],
                                       "silhouettes": [{"k": 2, "silhouette": 0.81}, {"k": 3, "silhouette": 0.5}],
                                       "silhouette_sample_size": 6, "duration_ms": 21.5}]},
))


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


def palette(data: bytes, field: str, n_colours: int, max_pixels: int) -> dict[str, Any]:
    image = open_image(data, field, max_pixels=max_pixels)
    width, height = image.size
    if image.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale when the image is that large
        side = int(np.sqrt(PALETTE_WORKING_PIXELS))
        image.draft("RGB", (side, side))
    loaded = load_image(image, field)
    if width != height and (loaded.width > loaded.height) != (width > height):
        width, height = height, width  # EXIF orientation turned it
    image = working_image(loaded)
    del loaded
    checkpoint()
    pixels = opaque_pixels(np.asarray(image.convert("RGBA")))
    if len(pixels) == 0:
        raise ProblemError(422, "transparent-image", f"{field} has no opaque pixels.", field=field)
    colours = dominant_colours(pixels, n_colours, sample_size=PALETTE_SAMPLE_SIZE, seed=0)
    return {
        "colors": [{"hex": c.hex, "rgb": list(c.rgb), "fraction": c.fraction} for c in colours],
        "requested": n_colours, "pixels_sampled": min(len(pixels), PALETTE_SAMPLE_SIZE),
        "width": width, "height": height,
    }


def palette_run(job: Job) -> Outcome:
    params: PaletteParams = job.params
    predictions = []
    for instance in job.instances:
        checkpoint()
        with job.timing.measure("inference"):
            predictions.append(palette(instance.data, instance.field, params.colors,
                                       job.settings.max_image_pixels))
    return Outcome(predictions, [])


register(router, Endpoint(
    operation_id="clustering_palette", path="/v1/clustering/palette", tag="clustering",
    name="clustering-palette", version=ALGORITHM_VERSION, summary="Dominant colours of images",
    description="K-means in CIE Lab on a fixed-seed sample of up to 50 000 opaque pixels of each image "
                "(pixels less than half opaque are ignored). Deterministic for the same image; fewer "
                "colours come back when an image has fewer distinct ones. Sorted by fraction, largest "
                "first.",
    run=palette_run, response_schema=ClusteringPaletteResponse, gate="heavy",
    file_field="image", file_description="PNG, JPEG, WebP, BMP, GIF or TIFF", raw_media=("image/",),
    params_schema=PaletteParams, max_instances=PALETTE_MAX_INSTANCES,
    response_example={"model": "clustering-palette", "version": ALGORITHM_VERSION,
                      "request_id": "019ab2c3d4e5f60718293a4b5c6d7e8f",
                      "predictions": [{"colors": [{"hex": "#1f3c78", "rgb": [31, 60, 120], "fraction": 0.41},
                                                  {"hex": "#f0a050", "rgb": [240, 160, 80], "fraction": 0.33}],
                                       "requested": 2, "pixels_sampled": 64000, "width": 320,
                                       "height": 200}]},
))
