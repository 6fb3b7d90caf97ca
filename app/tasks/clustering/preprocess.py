"""Clustering preprocessing, shared by ``training/clustering.py`` and serving (one source of truth).

- feature naming (``"Annual Income (k$)"`` -> ``annual_income``) and standard scaling;
- nearest-centroid assignment (what ``KMeans.predict`` does);
- the choice of k: K-means over ``k_min..k_max``, the elbow of the inertia curve and the silhouette
  per k; k is chosen by silhouette, the elbow is reported beside it;
- human-readable segment names from where each centroid sits in the feature distribution;
- sRGB <-> CIE Lab (D65) in numpy, for colour palettes;
- :func:`summary_features`, the per-instance values logged for drift monitoring.

NumPy and scikit-learn only (no TensorFlow, no matplotlib).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn import config_context
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import silhouette_score
from threadpoolctl import threadpool_limits

# Short nouns for segment names; other features use their name with spaces.
FEATURE_NOUNS = {"annual_income": "income", "spending_score": "spending"}
# A centroid more than half a standard deviation from the feature mean is "low" / "high".
LEVEL_THRESHOLD_STD = 0.5


def one_thread() -> threadpool_limits:
    """Run scikit-learn's OpenMP/BLAS code on one thread (a context manager).

    On a busy machine OpenMP threads spin-wait for each other: measured on the shared 2-core box,
    a 1 000 x 5 k-scan took 17 s with two threads and 0.3 s with one. Serving runs one request
    per worker thread anyway, so one thread per fit is also the fair share.
    """
    return threadpool_limits(limits=1)


# --- features and scaling ------------------------------------------------------------------------

def feature_key(column: str) -> str:
    """A snake_case API name for a data column: ``"Annual Income (k$)"`` -> ``"annual_income"``."""
    name = re.sub(r"\(.*?\)", " ", column).strip().lower()
    name = re.sub(r"[^a-z0-9]+", "_", name).strip("_")
    if not name:
        raise ValueError(f"cannot derive a feature name from column {column!r}")
    return name


@dataclass(frozen=True)
class Scaler:
    """Standard scaling with scikit-learn's ``StandardScaler`` conventions (population std; 1 for 0)."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Scaler:
        x = np.asarray(x, dtype=np.float64)
        std = x.std(axis=0)
        # StandardScaler leaves constant columns unscaled rather than dividing by ~0.
        scale = np.where(std < 10 * np.finfo(np.float64).eps * np.maximum(np.abs(x.mean(axis=0)), 1.0),
                         1.0, std)
        return cls(mean=x.mean(axis=0), scale=scale)

    @classmethod
    def identity(cls, n_features: int) -> Scaler:
        return cls(mean=np.zeros(n_features), scale=np.ones(n_features))

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) / self.scale

    def inverse_transform(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z, dtype=np.float64) * self.scale + self.mean


DISTANCE_BLOCK_VALUES = 1 << 20  # differences held at once (8 MiB): a block of rows at a time


def centroid_distances(z: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Euclidean distances (n, k) from each (scaled) row to each centroid, in the scaled space.

    The row-to-centroid differences are formed a block of rows at a time: all at once they take
    n x k x d values (80 MB for a 10 000 x 50 fit scanning k = 20, enough to take a 512 MiB dyno
    with two workers past its limit). Each distance is the same sum as in one piece."""
    z = np.asarray(z, dtype=np.float64)
    centroids = np.asarray(centroids, dtype=np.float64)
    out = np.empty((len(z), len(centroids)))
    rows = max(1, DISTANCE_BLOCK_VALUES // max(1, centroids.size))
    for start in range(0, len(z), rows):
        diff = z[start:start + rows, None, :] - centroids[None, :, :]
        out[start:start + rows] = np.sqrt(np.einsum("nkd,nkd->nk", diff, diff))
    return out


def nearest_centroid(z: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels (n,) and distances (n, k): what ``KMeans.predict`` returns, plus all distances."""
    distances = centroid_distances(z, centroids)
    return distances.argmin(axis=1), distances


# --- choosing k ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class KFit:
    """One K-means fit in a k scan (centres in the space the data was given in, i.e. scaled)."""

    k: int
    inertia: float
    silhouette: float | None
    labels: np.ndarray
    centers: np.ndarray
    n_iter: int


@dataclass(frozen=True)
class KSelection:
    fits: list[KFit]
    chosen: KFit
    method: str            # "requested" or "silhouette"
    elbow_k: int | None     # the knee of the inertia curve (None with fewer than 3 values of k)
    silhouette_sample_size: int


def fit_kmeans(z: np.ndarray, k: int, *, seed: int, n_init: int, max_iter: int = 300) -> KMeans:
    """K-means with k-means++ initialisation and a fixed seed (deterministic for the same data)."""
    with warnings.catch_warnings():
        # Fewer distinct points than k is rejected by the callers; this only silences the rare
        # "converged to fewer clusters" warning on near-duplicate data.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return KMeans(n_clusters=k, init="k-means++", n_init=n_init, max_iter=max_iter,
                      random_state=seed).fit(z)


SILHOUETTE_WORKING_MIB = 8


def silhouette(z: np.ndarray, labels: np.ndarray, *, sample_size: int | None, seed: int) -> float | None:
    """Mean silhouette, on a fixed-seed subsample of ``sample_size`` rows for big inputs.

    None when undefined (a single cluster, or as many clusters as rows).
    """
    n_labels = len(np.unique(labels))
    if n_labels < 2 or n_labels > len(z) - 1:
        return None
    size = sample_size if sample_size is not None and len(z) > sample_size else None
    # The pairwise distances in blocks of SILHOUETTE_WORKING_MIB (scikit-learn's default, 1 GiB,
    # makes the whole 2 000 x 2 000 matrix and its temporaries at once); each row's value is the same.
    with config_context(working_memory=SILHOUETTE_WORKING_MIB):
        return float(silhouette_score(z, labels, sample_size=size, random_state=seed))


def elbow_k(ks: Sequence[int], inertias: Sequence[float]) -> int | None:
    """The knee of the inertia curve: the point farthest below the chord from the first to the last.

    Both axes are normalised to [0, 1] first (the "Kneedle" idea), so the answer does not depend on
    the units of the inertia.
    """
    if len(ks) < 3:
        return None
    x = np.asarray(ks, dtype=np.float64)
    y = np.asarray(inertias, dtype=np.float64)
    x = (x - x[0]) / (x[-1] - x[0])
    span = y[0] - y[-1]
    if span <= 0:
        return None
    y = (y - y[-1]) / span            # 1 at the first k, 0 at the last
    gap = (1.0 - x) - y                # distance below the straight line from (0, 1) to (1, 0)
    return int(ks[int(np.argmax(gap))])


def select_k(z: np.ndarray, *, k: int | None = None, k_min: int = 2, k_max: int = 10, seed: int = 0,
             n_init: int = 10, max_iter: int = 300, sample_size: int | None = None,
             between_fits: Callable[[], None] | None = None) -> KSelection:
    """Fit K-means for the requested k, or for every k in ``k_min..k_max`` and pick the best silhouette.

    With more than ``sample_size`` rows (the API's large inputs) the scan over k is fitted on a
    fixed-seed subsample of that many rows, which keeps a 10 000 x 50 request within a few seconds;
    the elbow inertias are still measured on every row (each sample fit's centres applied to all
    rows), and the chosen k is then refitted on all rows. Silhouettes are computed on at most
    ``sample_size`` rows. Ties in silhouette go to the smaller k. Callers check that there are more
    distinct rows than the largest k (training asserts it, the API answers 422). ``between_fits`` is
    called before each fit (the server stops a request there once its deadline has passed).
    """
    with one_thread():
        return _select_k(np.asarray(z, dtype=np.float64), k=k, k_min=k_min, k_max=k_max, seed=seed,
                         n_init=n_init, max_iter=max_iter, sample_size=sample_size,
                         between_fits=between_fits or (lambda: None))


def _select_k(z: np.ndarray, *, k: int | None, k_min: int, k_max: int, seed: int, n_init: int,
              max_iter: int, sample_size: int | None, between_fits: Callable[[], None]) -> KSelection:
    subsample = sample_size is not None and len(z) > sample_size
    between_fits()
    if k is not None:
        fit = _fit_all_rows(z, k, seed=seed, n_init=n_init, max_iter=max_iter, sample_size=sample_size)
        return KSelection(fits=[fit], chosen=fit, method="requested", elbow_k=None,
                          silhouette_sample_size=min(len(z), sample_size or len(z)))
    scan_z = z
    if subsample:
        rng = np.random.default_rng(seed)
        scan_z = z[np.sort(rng.choice(len(z), size=sample_size, replace=False))]
    fits = []
    for kk in range(k_min, k_max + 1):
        between_fits()
        km = fit_kmeans(scan_z, kk, seed=seed, n_init=n_init, max_iter=max_iter)
        if subsample:
            labels, distances = nearest_centroid(z, km.cluster_centers_)
            inertia = float(np.sum(distances.min(axis=1) ** 2))
        else:
            labels, inertia = km.labels_.astype(np.int64), float(km.inertia_)
        fits.append(KFit(k=kk, inertia=inertia,
                         silhouette=silhouette(scan_z, km.labels_, sample_size=None, seed=seed),
                         labels=labels, centers=km.cluster_centers_, n_iter=int(km.n_iter_)))
    scored = [f for f in fits if f.silhouette is not None]
    chosen = max(scored, key=lambda f: (f.silhouette, -f.k)) if scored else fits[0]
    if subsample:
        between_fits()
        chosen = _fit_all_rows(z, chosen.k, seed=seed, n_init=n_init, max_iter=max_iter,
                               sample_size=sample_size)
    return KSelection(fits=fits, chosen=chosen, method="silhouette",
                      elbow_k=elbow_k([f.k for f in fits], [f.inertia for f in fits]),
                      silhouette_sample_size=len(scan_z))


def _fit_all_rows(z: np.ndarray, k: int, *, seed: int, n_init: int, max_iter: int,
                  sample_size: int | None) -> KFit:
    km = fit_kmeans(z, k, seed=seed, n_init=n_init, max_iter=max_iter)
    labels = km.labels_.astype(np.int64)
    return KFit(k=k, inertia=float(km.inertia_),
                silhouette=silhouette(z, labels, sample_size=sample_size, seed=seed),
                labels=labels, centers=km.cluster_centers_, n_iter=int(km.n_iter_))


def count_distinct_rows(x: np.ndarray) -> int:
    return int(len(np.unique(np.asarray(x), axis=0)))


# --- segment names -------------------------------------------------------------------------------

def segment_names(centroids: np.ndarray, feature_mean: Sequence[float], feature_std: Sequence[float],
                  features: Sequence[str]) -> list[str]:
    """Names such as ``"high income, low spending"`` from each centroid (original units).

    A feature is "low" / "high" when the centroid lies more than half a standard deviation below /
    above the feature's mean, else "average". Duplicate names get a ``#n`` suffix.
    """
    centroids = np.asarray(centroids, dtype=np.float64)
    z = (centroids - np.asarray(feature_mean)) / np.where(np.asarray(feature_std) > 0, feature_std, 1.0)
    names = []
    for row in z:
        parts = []
        for value, feature in zip(row, features, strict=True):
            level = "low" if value < -LEVEL_THRESHOLD_STD else "high" if value > LEVEL_THRESHOLD_STD \
                else "average"
            parts.append(f"{level} {FEATURE_NOUNS.get(feature, feature.replace('_', ' '))}")
        names.append(", ".join(parts))
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if names.count(name) == 1 else f"{name} #{seen[name]}")
    return unique


# --- drift summary -------------------------------------------------------------------------------

def summary_features(row: Mapping[str, float]) -> dict[str, float]:
    """The per-instance values logged for drift monitoring: the feature values themselves."""
    return {name: float(value) for name, value in row.items()}


# --- colour ----------------------------------------------------------------------------------------

# sRGB (D65) -> XYZ, IEC 61966-2-1; white point D65 normalised to Y = 1.
_RGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                        [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]])
_XYZ_TO_RGB = np.linalg.inv(_RGB_TO_XYZ)
_WHITE_D65 = _RGB_TO_XYZ @ np.ones(3)
_EPSILON = 216 / 24389   # CIE constants, exact rational forms
_KAPPA = 24389 / 27


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in 0..255 (any shape ending in 3) -> CIE L*a*b* (D65)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _RGB_TO_XYZ.T / _WHITE_D65
    f = np.where(xyz > _EPSILON, np.cbrt(xyz), (_KAPPA * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])],
                    axis=-1)


def lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (D65) -> sRGB in 0..255 as floats (clipped to the gamut; round for display)."""
    lab = np.asarray(lab, dtype=np.float64)
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], axis=-1)
    xyz = np.where(f ** 3 > _EPSILON, f ** 3, (116 * f - 16) / _KAPPA)
    linear = (xyz * _WHITE_D65) @ _XYZ_TO_RGB.T
    linear = np.clip(linear, 0.0, 1.0)
    c = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return np.clip(c * 255.0, 0.0, 255.0)


def rgb_hex(rgb: Sequence[int]) -> str:
    return "#" + "".join(f"{int(v):02x}" for v in rgb)


@dataclass(frozen=True)
class PaletteColour:
    rgb: tuple[int, int, int]
    fraction: float

    @property
    def hex(self) -> str:
        return rgb_hex(self.rgb)


def opaque_pixels(rgba: np.ndarray, *, alpha_threshold: int = 128) -> np.ndarray:
    """(n, 3) uint8 RGB of the pixels at least half opaque, from an (h, w, 4) RGBA array."""
    flat = np.asarray(rgba).reshape(-1, 4)
    return flat[flat[:, 3] >= alpha_threshold, :3]


def dominant_colours(pixels: np.ndarray, n_colours: int, *, sample_size: int = 50_000, seed: int = 0,
                     n_init: int = 3) -> list[PaletteColour]:
    """Dominant colours by K-means in CIE Lab on a fixed-seed subsample of ``pixels`` (n, 3 uint8).

    Deterministic for the same pixels. Asks for no more colours than there are distinct colours in
    the sample. Fractions are over the sample (all pixels when there are at most ``sample_size``).
    Sorted by fraction, largest first (ties by hex).
    """
    pixels = np.asarray(pixels, dtype=np.uint8).reshape(-1, 3)
    if len(pixels) == 0:
        raise ValueError("no pixels")
    if len(pixels) > sample_size:
        rng = np.random.default_rng(seed)
        pixels = pixels[np.sort(rng.choice(len(pixels), size=sample_size, replace=False))]
    distinct, counts = np.unique(pixels, axis=0, return_counts=True)
    k = min(n_colours, len(distinct))
    lab = srgb_to_lab(distinct)
    if k == len(distinct):
        centers, labels = lab, np.arange(len(distinct))
    else:
        # Weighting the distinct colours by their counts is the same K-means as on every pixel,
        # and far cheaper on images with large flat areas.
        with warnings.catch_warnings(), one_thread():
            warnings.simplefilter("ignore", ConvergenceWarning)
            km = KMeans(n_clusters=k, init="k-means++", n_init=n_init, random_state=seed)
            km.fit(lab, sample_weight=counts)
        centers, labels = km.cluster_centers_, km.labels_
    weights = np.bincount(labels, weights=counts, minlength=k)
    rgbs = np.rint(lab_to_srgb(centers)).astype(int)
    colours = [PaletteColour(rgb=(int(r), int(g), int(b)), fraction=float(w / counts.sum()))
               for (r, g, b), w in zip(rgbs, weights, strict=True) if w > 0]
    return sorted(colours, key=lambda c: (-c.fraction, c.hex))
