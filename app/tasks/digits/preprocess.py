"""Digit preprocessing shared by training and serving: any image -> a 28x28 MNIST-style digit.

MNIST was built by fitting each digit's bounding box into 20x20 pixels (keeping the aspect ratio,
anti-aliased) and translating it so its centre of mass sits at the centre of a 28x28 field, white
ink on black. Real inputs (phone photos, canvas drawings, scans) are dark ink on light paper, of any
size, off-centre and with a grey background, so every input, MNIST training images included, goes
through the same steps:

1. to grayscale in [0, 1] (transparent pixels composite on white, like a canvas drawing on paper);
2. detect the polarity from the background level (the median of the border) and invert dark-on-light
   inputs to light-on-dark;
3. stretch so the background is 0 and the ink 1 (robust percentiles, not min/max, so specks of
   noise do not set the scale);
4. crop to the ink bounding box, ignoring specks much smaller than the largest ink stroke;
5. scale the crop to fit 20x20 keeping the aspect ratio;
6. paste it into 28x28 so its centre of mass is at (14, 14) (the mean centre of mass of MNIST).

MNIST digits pass through almost unchanged (their ink box is already 20 pixels on the long side and
their centre of mass already at (14, 14)), so a model trained on the re-normalised training set sees
the same distribution at serving time. Only numpy, Pillow and scipy: this module runs in training and
serving alike.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

SIZE = 28  # model input: SIZE x SIZE, one channel
BOX = 20  # the ink's bounding box is scaled to fit BOX x BOX, as in MNIST
CENTRE = 14.0  # target centre of mass (row and column), measured on the MNIST training set
BORDER = 2  # width in pixels of the frame whose median is taken as the background level
INK_PERCENTILE = 99.5  # the ink level: robust to a few bright specks of noise
MIN_CONTRAST = 0.15  # ink minus background below this (about 38/255) is a blank image
INK_THRESHOLD = 0.2  # a stretched pixel above this is ink, for the bounding box
MIN_COMPONENT_FRACTION = 0.02  # ink blobs smaller than this fraction of the largest are specks
WORKING_SIDE = 1024  # larger inputs are first shrunk to this (the digit ends up 20 pixels anyway)

PREPROCESSING_PARAMS: dict[str, Any] = {
    "size": SIZE, "box": BOX, "centre_of_mass": CENTRE, "border": BORDER,
    "ink_percentile": INK_PERCENTILE, "min_contrast": MIN_CONTRAST, "ink_threshold": INK_THRESHOLD,
    "min_component_fraction": MIN_COMPONENT_FRACTION, "working_side": WORKING_SIDE,
    "resample": "lanczos",
    "polarity": "border median vs ink percentiles; dark-on-light inputs are inverted",
    "output": "float32 28x28 in [0, 1], white digit on black",
}


class DigitInputError(ValueError):
    """An input that cannot be turned into a digit; ``field`` names it for the client."""

    code = "invalid-digit-input"

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class BlankImageError(DigitInputError):
    """The image has no ink: (nearly) constant, so any prediction would be a guess."""

    code = "blank-image"


class InvalidPixelsError(DigitInputError):
    """A ``pixels`` array of the wrong shape, type or range."""

    code = "invalid-pixels"


@dataclass(frozen=True)
class PreparedDigit:
    """A normalised digit ready for the model plus the facts about the raw input we keep."""

    array: np.ndarray  # (28, 28) float32 in [0, 1], white on black
    raw_mean: float  # mean intensity of the grayscale input before any inversion
    inverted: bool  # the input was dark-on-light and was inverted
    background: float  # background level of the (polarity-corrected) input
    background_std: float  # spread of the border's paper pixels: 0 for clean inputs, high for noisy ones
    contrast: float  # ink level minus background level
    raw_ink_fraction: float  # fraction of input pixels that are ink (before speck removal)
    width: int
    height: int
    box_aspect: float  # width / height of the ink bounding box


# ---------------------------------------------------------------------------------------------
# Decoding to grayscale


def image_to_gray(image: Image.Image) -> np.ndarray:
    """A Pillow image (any mode) as float32 grayscale in [0, 1]; transparency composites on white."""
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(canvas, rgba).convert("L"), dtype=np.float32) / 255.0
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(image, dtype=np.float32)
        return np.clip(arr / (65535.0 if arr.max(initial=0) > 255 else 255.0), 0.0, 1.0)
    if image.mode == "F":
        arr = np.asarray(image, dtype=np.float32)
        peak = float(np.nanmax(arr)) if arr.size else 1.0
        return np.clip(np.nan_to_num(arr / (255.0 if peak > 1.0 else 1.0)), 0.0, 1.0)
    gray = image if image.mode == "L" else image.convert("L")
    # The 256 levels divided once: the same float32 quotients as dividing the pixels, in one lookup
    # (and Pillow's bytes, not its slower array interface).
    levels = np.frombuffer(gray.tobytes(), dtype=np.uint8)
    return _LEVELS.take(levels).reshape(gray.height, gray.width)


_LEVELS = np.arange(256, dtype=np.float32) / 255.0  # an 8-bit level as float32 in [0, 1]


def pixels_to_gray(pixels: Any, field: str = "pixels") -> np.ndarray:
    """A 28x28 nested list (0-255 integers or 0-1 floats, white on black) as float32 in [0, 1].

    Values all within [0, 1] are read as 0-1 floats, anything else as 0-255. Non-numbers, NaN or
    infinity, negatives, values over 255 and other shapes raise :class:`InvalidPixelsError`.
    """
    try:
        arr = np.asarray(pixels)
    except (TypeError, ValueError) as exc:  # ragged nesting
        raise InvalidPixelsError(f"{field} must be {SIZE} rows of {SIZE} numbers.", field) from exc
    if arr.dtype.kind not in "iuf" and arr.size:  # strings, booleans, nulls, objects
        raise InvalidPixelsError(f"{field} must be {SIZE} rows of {SIZE} numbers.", field)
    arr = arr.astype(np.float64)
    if arr.shape != (SIZE, SIZE):
        raise InvalidPixelsError(f"{field} must be {SIZE} rows of {SIZE} numbers; got shape "
                                 f"{'x'.join(str(n) for n in arr.shape) or 'scalar'}.", field)
    if not np.all(np.isfinite(arr)):
        raise InvalidPixelsError(f"{field} contains NaN or infinite values.", field)
    low, high = float(arr.min()), float(arr.max())
    if low < 0.0 or high > 255.0:
        raise InvalidPixelsError(f"{field} values must be in 0..255 (or 0..1); got {low:g}..{high:g}.",
                                 field)
    scale = 1.0 if high <= 1.0 else 255.0
    return (arr / scale).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Order statistics and moments, as numpy computes them, without its generic machinery: these run on
# every request, and np.percentile / np.median / ndimage.center_of_mass spend ~60 us each on a 28x28
# digit setting up what one sort or one dot product does (mean and std ~10 us each). A full sort
# puts the same values at every rank as np.partition and, for a digit's few hundred pixels, costs
# half as much as partitioning around several ranks. The
# results are the same to the bit (tests/unit/test_digits_preprocess_fast.py compares them over
# random arrays and 600 MNIST digits; a one-off run over all 140 000 MNIST images, both polarities,
# gave the same arrays and features).

_CROSS = ndimage.generate_binary_structure(2, 1)  # ndimage.label's default connectivity


def _percentiles(values: np.ndarray, qs: Sequence[float]) -> list[np.float64]:
    """``np.percentile(values, qs)`` (method "linear"), one sort for all of ``qs``."""
    return _percentiles_of_sorted(np.sort(values, axis=None), qs)


def _percentiles_of_sorted(ordered: np.ndarray, qs: Sequence[float]) -> list[np.float64]:
    """:func:`_percentiles` of values already in ascending order (1-D)."""
    last = ordered.size - 1
    out = []
    for q in qs:
        virtual = q / 100.0 * last
        i = math.floor(virtual)
        a, b = ordered[i], ordered[min(i + 1, last)]
        t = virtual - i
        step = float(b - a)  # in the array's dtype, as numpy's _lerp; the rest in float64
        out.append(np.float64(float(a) + step * t if t < 0.5 else float(b) - step * (1 - t)))
    return out


def _median(values: np.ndarray) -> float:
    """``np.median(values)``: the mean of the middle one or two values."""
    return _median_of_sorted(np.sort(values, axis=None))


def _median_of_sorted(ordered: np.ndarray) -> float:
    """:func:`_median` of values already in ascending order (1-D)."""
    half = ordered.size // 2
    if ordered.size % 2:
        return float(ordered[half])
    return float((ordered[half - 1] + ordered[half]) / 2)  # in the array's dtype, as np.mean


def _mean(values: np.ndarray) -> float:
    """``float(values.mean())`` of a float32 or float64 array (all this module passes): numpy's
    own (pairwise) sum, divided as its ``_mean`` divides, without the ~10 us of its Python wrapper.
    Not for integers, which numpy sums in float64."""
    total = np.add.reduce(values, axis=None)
    # numpy divides the float32 sum by the count in float64, as Python does, then casts back
    return float(total.dtype.type(float(total) / values.size))


def _std(values: np.ndarray) -> float:
    """``float(values.std())`` of a float32 or float64 array: numpy's ``_var`` steps (sum, mean,
    squared deviations, sum, divide, square root) in the array's dtype, without its wrappers. The
    scalar steps in Python floats: a float32 quotient or square root worked out in float64 and
    rounded to float32 is the correctly rounded float32 one, as numpy's."""
    count = values.size
    mean = np.add.reduce(values, axis=None, keepdims=True)
    np.true_divide(mean, count, out=mean, casting="unsafe", subok=False)
    deviations = np.subtract(values, mean)
    np.square(deviations, out=deviations)
    total = np.add.reduce(deviations, axis=None)
    as_dtype = total.dtype.type
    return float(as_dtype(math.sqrt(as_dtype(float(total) / count))))


def _center_of_mass(patch: np.ndarray) -> tuple[float, float]:
    """``ndimage.center_of_mass(patch)`` for a 2-D array: the same sums in the same order."""
    total = np.add.reduce(patch, axis=None)  # patch.sum(), without its Python wrapper
    h, w = patch.shape
    rows = _INDICES[:h, None] if h <= SIZE else np.arange(h, dtype=float)[:, None]
    cols = _INDICES[None, :w] if w <= SIZE else np.arange(w, dtype=float)[None, :]
    return (float(np.add.reduce(patch * rows, axis=None) / total),
            float(np.add.reduce(patch * cols, axis=None) / total))


_INDICES = np.arange(SIZE, dtype=float)  # row and column indices of a patch, as float64


# ---------------------------------------------------------------------------------------------
# Normalisation


def _ink_box(ink: np.ndarray) -> tuple[slice, slice, float]:
    """Bounding box of the ink, ignoring specks; also the raw ink fraction."""
    mask = ink > INK_THRESHOLD
    raw_fraction = np.count_nonzero(mask) / mask.size
    labels, n = ndimage.label(mask, structure=_CROSS)
    if n == 0:
        raise BlankImageError("no ink found")
    if n == 1:  # one stroke (most digits): its box, in one call
        rows, cols = ndimage.find_objects(labels, max_label=1)[0]
        return slice(rows.start, rows.stop), slice(cols.start, cols.stop), raw_fraction
    areas = np.bincount(labels.ravel())[1:]
    kept = np.empty(n + 1, dtype=bool)  # by label: is this component ink (0 is the background)
    kept[0] = False
    np.greater_equal(areas, MIN_COMPONENT_FRACTION * areas.max(), out=kept[1:])
    if n <= _FEW_COMPONENTS:  # the union of the kept components' boxes
        boxes = [box for box, keep in zip(ndimage.find_objects(labels, max_label=n), kept[1:].tolist(),
                                          strict=True) if keep]
        return (slice(min(r.start for r, _ in boxes), max(r.stop for r, _ in boxes)),
                slice(min(c.start for _, c in boxes), max(c.stop for _, c in boxes)), raw_fraction)
    mask = kept.take(labels)  # a noisy photo's thousands of specks: one pass over the pixels
    rows = mask.any(axis=1).nonzero()[0]
    cols = mask.any(axis=0).nonzero()[0]
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1), raw_fraction


_FEW_COMPONENTS = 64  # up to this many ink components, their boxes are joined one by one


def _fit_box(crop: np.ndarray) -> np.ndarray:
    """Scale ``crop`` so its longer side is BOX pixels (anti-aliased), keeping the aspect ratio."""
    h, w = crop.shape
    scale = BOX / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    if (new_h, new_w) == (h, w):
        return crop.astype(np.float32, copy=True)
    resized = Image.fromarray(crop.astype(np.float32), mode="F").resize((new_w, new_h), Image.LANCZOS)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def _centre(patch: np.ndarray) -> np.ndarray:
    """Paste ``patch`` into SIZE x SIZE with its centre of mass at (CENTRE, CENTRE)."""
    cy, cx = _center_of_mass(patch)
    h, w = patch.shape
    top = min(max(round(CENTRE - cy), 0), SIZE - h)
    left = min(max(round(CENTRE - cx), 0), SIZE - w)
    out = np.zeros((SIZE, SIZE), dtype=np.float32)
    out[top:top + h, left:left + w] = patch
    return out


@functools.lru_cache(maxsize=256)
def _frame_indices(height: int, width: int, b: int) -> np.ndarray:
    """Flat indices of the border frame of a ``height`` x ``width`` image, ``b`` pixels wide: the
    top rows, the bottom rows, the left and the right columns (corners twice), in that order."""
    grid = np.arange(height * width).reshape(height, width)
    return np.concatenate([grid[:b].ravel(), grid[-b:].ravel(),
                           grid[:, :b].ravel(), grid[:, -b:].ravel()])


def _background_std(frame: np.ndarray, ordered: np.ndarray) -> float:
    """Spread of the (polarity-corrected) border, leaving out its brightest 10 %: strokes that touch
    the border are ink, not noise. ``ordered`` is ``frame`` sorted."""
    if ordered[-1] == 0.0:  # a border all 0 (a clean scan, a canvas drawing): no spread, exactly
        return 0.0
    paper = frame[frame <= _percentiles_of_sorted(ordered, (90.0,))[0]]
    return _std(paper) if paper.size else 0.0


def normalize_gray(gray: np.ndarray, field: str = "image",
                   source_size: tuple[int, int] | None = None) -> PreparedDigit:
    """Grayscale in [0, 1] (any size, either polarity) -> a centred 28x28 MNIST-style digit.

    ``source_size`` (width, height) is the size reported in the features when ``gray`` was shrunk.

    Raises :class:`BlankImageError` when there is no ink to speak of.
    """
    gray = np.asarray(gray, dtype=np.float32)
    if gray.ndim != 2 or gray.size == 0:
        raise DigitInputError(f"{field} must be a non-empty 2-D grayscale image.", field)
    height, width = gray.shape
    raw_mean = _mean(gray)
    b = min(BORDER, max(1, min(height, width) // 4))
    if source_size is not None:
        width, height = source_size
    frame = gray.take(_frame_indices(*gray.shape, b))
    ordered = np.sort(frame)  # for the background level, and the paper's spread below
    background = _median_of_sorted(ordered)
    dark, light = _percentiles(gray, (100.0 - INK_PERCENTILE, INK_PERCENTILE))
    # Ink is whatever departs furthest from the background: darker on paper, lighter on a screen.
    inverted = (background - dark) > (light - background)
    if inverted:
        gray, frame = 1.0 - gray, 1.0 - frame
        # 1 - x rounds monotonically, so the frame's values reversed are its inverse in order.
        ordered = np.subtract(1.0, ordered[::-1])
        background, ink_level = 1.0 - background, 1.0 - float(dark)
    else:
        ink_level = float(light)
    contrast = ink_level - background
    if contrast < MIN_CONTRAST:
        raise BlankImageError(f"{field} is blank: no ink found (contrast {contrast:.2f}).", field)
    ink = np.subtract(gray, background)
    ink /= contrast
    np.maximum(ink, 0.0, out=ink)  # np.clip(ink, 0, 1), without its three Python layers
    np.minimum(ink, 1.0, out=ink)
    try:
        rows, cols, raw_fraction = _ink_box(ink)
    except BlankImageError:
        raise BlankImageError(f"{field} is blank: no ink found.", field) from None
    crop = ink[rows, cols]
    array = _centre(_fit_box(crop))
    if float(np.maximum.reduce(array, axis=None, initial=0.0)) <= 0.0:
        raise BlankImageError(f"{field} is blank: no ink found.", field)
    return PreparedDigit(
        array=array, raw_mean=raw_mean, inverted=bool(inverted), background=background,
        background_std=_background_std(frame, ordered), contrast=contrast, raw_ink_fraction=raw_fraction,
        width=width, height=height, box_aspect=crop.shape[1] / crop.shape[0],
    )


def prepare_image(image: Image.Image, field: str = "image") -> PreparedDigit:
    """A decoded upload (any size, mode and polarity) -> a normalised digit."""
    source_size = image.size
    factor = -(-max(image.size) // WORKING_SIDE)
    if factor > 1:  # a 4096x4096 photo would cost ~1 s for nothing: the digit ends up 20 pixels
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # keep 16-bit precision
            gray = Image.fromarray(image_to_gray(image), mode="F").reduce(factor)
            return normalize_gray(np.asarray(gray, dtype=np.float32), field, source_size)
        if image.mode not in ("L", "LA", "RGB", "RGBA"):  # palette, 1-bit, CMYK...
            transparent = image.mode == "PA" or "transparency" in image.info
            image = image.convert("RGBA" if transparent else "L")
        image = image.reduce(factor)
    return normalize_gray(image_to_gray(image), field, source_size)


def prepare_pixels(pixels: Any, field: str = "pixels") -> PreparedDigit:
    """A 28x28 ``pixels`` array -> a normalised digit (same pipeline as images, so a PNG of an
    MNIST digit and its pixel values give the same model input)."""
    return normalize_gray(pixels_to_gray(pixels, field), field)


def normalize_batch(images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Many uint8 / [0, 1] white-on-black images (e.g. MNIST) -> (N, 28, 28) float32, for training.

    Blank images (none in MNIST) are kept as all-zero inputs so indices stay aligned.
    """
    out = np.zeros((len(images), SIZE, SIZE), dtype=np.float32)
    for i, image in enumerate(images):
        gray = np.asarray(image, dtype=np.float32)
        if gray.max(initial=0.0) > 1.0:
            gray = gray / 255.0
        try:
            out[i] = normalize_gray(gray).array
        except BlankImageError:
            pass
    return out


# ---------------------------------------------------------------------------------------------
# Monitoring


FEATURE_NAMES = ("raw_mean", "inverted", "background_std", "contrast", "raw_ink_fraction",
                 "ink_ratio", "norm_mean", "box_aspect", "width", "height")


def summary_features(digit: PreparedDigit) -> dict[str, float]:
    """Privacy-safe per-instance summary for the prediction log and the drift reference.

    ``raw_mean``/``inverted`` flag polarity changes (MNIST is ~0.13 and never inverted),
    ``background_std``/``raw_ink_fraction``/``contrast`` flag noisy or faint inputs, ``ink_ratio``/
    ``norm_mean`` describe the normalised digit (stroke thickness), ``width``/``height`` the source.
    """
    array = digit.array
    return {
        "raw_mean": round(digit.raw_mean, 6),
        "inverted": float(digit.inverted),
        "background_std": round(digit.background_std, 6),
        "contrast": round(digit.contrast, 6),
        # numpy floats (a count over a size) are rounded as numpy rounds, kept as Python floats
        "raw_ink_fraction": float(round(digit.raw_ink_fraction, 6)),
        "ink_ratio": float(round(np.count_nonzero(array > 0.5) / array.size, 6)),
        "norm_mean": round(_mean(array), 6),
        "box_aspect": round(digit.box_aspect, 6),
        "width": float(digit.width),
        "height": float(digit.height),
    }
