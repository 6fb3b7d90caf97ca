"""Segmentation preprocessing shared by training and serving: normalisation, overlap-tiling, masks.

The U-Net is fully convolutional but is exported for one fixed tile size, so an image of any size
is cut into overlapping tiles (the U-Net paper's "overlap-tile" strategy):

* the image is reflect-padded by ``margin`` pixels on every side (and a little more at the bottom
  and right so the tiles fit exactly), which gives the border pixels real-looking context;
* tiles of ``tile`` x ``tile`` pixels are taken every ``stride = tile - 2 * margin`` pixels;
* of each tile's prediction only the centre ``stride`` x ``stride`` square is kept, where every
  pixel has at least ``margin`` pixels of context on each side, and the centres tile the output
  exactly once: no seams, no averaging, and the mask has the input's width and height.

Everything here is pure NumPy/Pillow (no TensorFlow), so training evaluates with the same code the
server runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

TILE = 320
MARGIN = 32
THRESHOLD = 0.5


def to_gray_u8(image: Image.Image) -> np.ndarray | None:
    """The image as uint8 luma (H, W) when it is 8-bit (L, RGB, palette...), else ``None``: the
    serving path keeps 8-bit images at a quarter of the memory and scales each tile as
    :func:`to_grayscale` would (``/ 255.0`` in float32: the same values)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return None
    return np.asarray(image if image.mode == "L" else image.convert("L"), dtype=np.uint8)


def to_grayscale(image: Image.Image) -> np.ndarray:
    """A Pillow image of any mode -> float32 array (H, W) in [0, 1].

    RGB(A) and palette images are converted with Pillow's ITU-R 601-2 luma; 16-bit images
    (``I;16``) are scaled by 65535; 32-bit integer and float images are read as [0, 1] when their
    maximum is at most 1, as 8-bit values when it is at most 255, else by their own maximum.
    """
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return (np.asarray(image, dtype=np.float32) / 65535.0).clip(0.0, 1.0)
    if image.mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float32)
        top = float(arr.max()) if arr.size else 0.0
        scale = 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else top
        return (arr / scale).clip(0.0, 1.0) if top > 0 else np.zeros_like(arr)
    if image.mode != "L":
        image = image.convert("L")
    return np.asarray(image, dtype=np.float32) / 255.0


@dataclass(frozen=True)
class TileLayout:
    """Where the tiles of one ``height`` x ``width`` image lie (see the module docstring)."""

    height: int
    width: int
    tile: int = TILE
    margin: int = MARGIN

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"image must have pixels, got {self.height}x{self.width}")
        if self.tile <= 2 * self.margin or self.margin < 0:
            raise ValueError(f"tile {self.tile} must exceed twice the margin {self.margin}")

    @property
    def stride(self) -> int:
        return self.tile - 2 * self.margin

    @property
    def rows(self) -> int:
        return math.ceil(self.height / self.stride)

    @property
    def cols(self) -> int:
        return math.ceil(self.width / self.stride)

    def __len__(self) -> int:
        return self.rows * self.cols

    def origins(self) -> list[tuple[int, int]]:
        """Top-left corner of each tile in the padded image (= of its kept centre in the output)."""
        return [(r * self.stride, c * self.stride) for r in range(self.rows) for c in range(self.cols)]

    def pad(self, image: np.ndarray) -> np.ndarray:
        """Reflect-pad a (H, W) image so every tile lies inside it."""
        if image.shape != (self.height, self.width):
            raise ValueError(f"expected a {self.height}x{self.width} image, got {image.shape}")
        bottom = self.margin + self.rows * self.stride - self.height
        right = self.margin + self.cols * self.stride - self.width
        return np.pad(image, ((self.margin, bottom), (self.margin, right)), mode="reflect")


def tile_image(image: np.ndarray, tile: int = TILE, margin: int = MARGIN) -> tuple[np.ndarray, TileLayout]:
    """Cut a (H, W) float image into overlapping tiles: (n_tiles, tile, tile) float32 + the layout."""
    layout = TileLayout(int(image.shape[0]), int(image.shape[1]), tile, margin)
    padded = layout.pad(np.asarray(image, dtype=np.float32))
    tiles = np.stack([padded[y:y + tile, x:x + tile] for y, x in layout.origins()])
    return tiles, layout


def stitch_tiles(tiles: np.ndarray, layout: TileLayout) -> np.ndarray:
    """Inverse of :func:`tile_image` for per-pixel predictions: keep each tile's centre, crop to H x W."""
    tiles = np.asarray(tiles)
    if tiles.ndim == 4:  # (n, tile, tile, 1) straight from the model
        tiles = tiles[..., 0]
    if tiles.shape != (len(layout), layout.tile, layout.tile):
        raise ValueError(f"expected {len(layout)} tiles of {layout.tile}px, got {tiles.shape}")
    m, s = layout.margin, layout.stride
    out = np.empty((layout.rows * s, layout.cols * s), dtype=tiles.dtype)
    for (y, x), prediction in zip(layout.origins(), tiles, strict=True):
        out[y:y + s, x:x + s] = prediction[m:m + s, m:m + s]
    return out[:layout.height, :layout.width]


def binary_mask(probability: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """Foreground probability (H, W) -> uint8 mask, 255 where probability >= threshold, else 0."""
    return np.where(np.asarray(probability) >= threshold, 255, 0).astype(np.uint8)


def mask_from_label(label: np.ndarray) -> np.ndarray:
    """An ISBI label (255 = cell interior, 0 = membrane) -> float32 target, 1 = membrane."""
    return (np.asarray(label) < 128).astype(np.float32)


def overlay(gray: np.ndarray, mask: np.ndarray, *, color: tuple[int, int, int] = (255, 40, 40),
            alpha: float = 0.5) -> Image.Image:
    """RGB picture of the image with the foreground of ``mask`` (uint8, 255 = foreground) tinted.

    Built one channel at a time, so a 2048 x 2048 overlay needs ~60 MB of temporaries, not the
    ~150 MB of a three-channel float array."""
    base = np.clip(np.asarray(gray, dtype=np.float32), 0.0, 1.0) * np.float32(255.0)
    fg = np.asarray(mask) > 127
    picture = np.empty(base.shape + (3,), dtype=np.uint8)
    for channel, value in enumerate(color):
        blended = np.where(fg, np.float32(1.0 - alpha) * base + np.float32(alpha * value), base)
        picture[..., channel] = np.rint(blended)
    return Image.fromarray(picture, mode="RGB")


def segmentation_metrics(mask: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Pixel accuracy, IoU of each class, mean IoU and Dice of the foreground (membrane).

    Both arguments are boolean-like (H, W) arrays where true/nonzero means membrane (foreground).
    """
    pred = np.asarray(mask).astype(bool)
    true = np.asarray(truth).astype(bool)
    tp = float(np.sum(pred & true))
    tn = float(np.sum(~pred & ~true))
    fp = float(np.sum(pred & ~true))
    fn = float(np.sum(~pred & true))
    total = tp + tn + fp + fn

    def ratio(a: float, b: float) -> float:
        return a / b if b else 1.0

    iou_membrane = ratio(tp, tp + fp + fn)
    iou_interior = ratio(tn, tn + fp + fn)
    return {
        "pixel_accuracy": ratio(tp + tn, total),
        "pixel_error": ratio(fp + fn, total),
        "iou_membrane": iou_membrane,
        "iou_interior": iou_interior,
        "mean_iou": (iou_membrane + iou_interior) / 2.0,
        "dice_membrane": ratio(2 * tp, 2 * tp + fp + fn),
        "dice_interior": ratio(2 * tn, 2 * tn + fp + fn),
    }


def summary_features(gray: np.ndarray, probability: np.ndarray,
                     threshold: float = THRESHOLD) -> dict[str, float]:
    """Privacy-safe per-image summary for the prediction log and drift reference.

    ``gray`` is the normalised input (H, W) in [0, 1]; ``probability`` the foreground probability.
    """
    gray = np.asarray(gray, dtype=np.float32)
    prob = np.asarray(probability, dtype=np.float32)
    certainty = np.abs(prob - 0.5) * 2.0
    return {
        "image_mean": float(gray.mean()),
        "image_std": float(gray.std()),
        "width": float(gray.shape[1]),
        "height": float(gray.shape[0]),
        "foreground_fraction": float(np.mean(prob >= threshold)),
        "mean_probability": float(prob.mean()),
        "mean_certainty": float(certainty.mean()),
    }


def predict_probability(gray: np.ndarray, run, *, tile: int = TILE, margin: int = MARGIN,
                        batch_size: int = 4) -> np.ndarray:
    """Foreground probability (H, W) of a normalised image through overlap-tiling.

    ``run`` maps a float32 batch (n, tile, tile, 1) to probabilities (n, tile, tile, 1): the LiteRT
    runner at serving time, the Keras model during training. Tiles go in batches of ``batch_size``
    and each batch's centres are written straight into the output, so memory stays bounded for a
    2048 x 2048 image (the model's activations for one batch dominate it).
    """
    layout = TileLayout(int(gray.shape[0]), int(gray.shape[1]), tile, margin)
    padded = layout.pad(np.asarray(gray, dtype=np.float32))
    origins = layout.origins()
    s = layout.stride
    out = np.empty((layout.rows * s, layout.cols * s), dtype=np.float32)
    for start in range(0, len(origins), batch_size):
        chunk = origins[start:start + batch_size]
        batch = np.stack([padded[y:y + tile, x:x + tile] for y, x in chunk])[..., None]
        prediction = np.asarray(run(batch), dtype=np.float32).reshape(len(chunk), tile, tile)
        for (y, x), tile_prediction in zip(chunk, prediction, strict=True):
            out[y:y + s, x:x + s] = tile_prediction[margin:margin + s, margin:margin + s]
    return out[:layout.height, :layout.width]


@dataclass
class TiledSegmentation:
    """What the server needs of one image: the uint8 mask and the summary features."""

    mask: np.ndarray
    features: dict[str, float]
    probability: np.ndarray | None = None  # float32, only when asked for (16 MB at 2048 x 2048)


def segment_image(gray: np.ndarray, run, *, threshold: float, tile: int = TILE,
                  margin: int = MARGIN, keep_probability: bool = False) -> TiledSegmentation:
    """:func:`binary_mask` of :func:`predict_probability` plus :func:`summary_features`, in bounded
    memory: tile by tile, the mask is written and the statistics accumulated as each tile comes
    back, so no full-size probability map (16 MB for 2048 x 2048) or temporary is ever made.

    ``gray`` is uint8 (scaled by 1/255 tile by tile, as :func:`to_grayscale` scales) or float32 in
    [0, 1]. ``run`` maps one tile batch (1, tile, tile, 1) to probabilities; it may raise to stop.
    """
    height, width = int(gray.shape[0]), int(gray.shape[1])
    layout = TileLayout(height, width, tile, margin)
    padded = layout.pad(np.asarray(gray))
    s = layout.stride
    mask = np.empty((height, width), dtype=np.uint8)
    probability = np.empty((height, width), dtype=np.float32) if keep_probability else None
    n = float(height * width)
    foreground = probability_sum = certainty_sum = 0.0
    for y, x in layout.origins():
        window = padded[y:y + tile, x:x + tile]
        if window.dtype == np.uint8:
            window = window.astype(np.float32) / 255.0
        prediction = np.asarray(run(np.asarray(window, dtype=np.float32)[None, ..., None]),
                                dtype=np.float32).reshape(tile, tile)
        rows, cols = min(s, height - y), min(s, width - x)
        kept = prediction[margin:margin + rows, margin:margin + cols]
        above = kept >= threshold
        mask[y:y + rows, x:x + cols] = np.where(above, 255, 0)
        if probability is not None:
            probability[y:y + rows, x:x + cols] = kept
        foreground += float(np.count_nonzero(above))
        probability_sum += float(kept.sum(dtype=np.float64))
        certainty_sum += float((np.abs(kept - 0.5) * 2.0).sum(dtype=np.float64))
    mean, std = _mean_std(gray)
    features = {
        "image_mean": mean, "image_std": std, "width": float(width), "height": float(height),
        "foreground_fraction": foreground / n, "mean_probability": probability_sum / n,
        "mean_certainty": certainty_sum / n,
    }
    return TiledSegmentation(mask, features, probability)


def _mean_std(gray: np.ndarray, rows: int = 256) -> tuple[float, float]:
    """Mean and standard deviation of the image in [0, 1], a block of rows at a time."""
    scale = 255.0 if gray.dtype == np.uint8 else 1.0
    total = squares = 0.0
    for start in range(0, gray.shape[0], rows):
        block = gray[start:start + rows].astype(np.float64) / scale
        total += float(block.sum())
        squares += float(np.square(block).sum())
    n = gray.size
    mean = total / n
    return mean, float(np.sqrt(max(0.0, squares / n - mean * mean)))
