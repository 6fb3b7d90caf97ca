"""Segmentation preprocessing shared by training and serving: normalisation, overlap-tiling, masks.

The U-Net is fully convolutional but is exported for one fixed tile size, so an image of any size
is cut into overlapping tiles (the U-Net paper's "overlap-tile" strategy, with the tiles kept
inside the image):

* along each side, as few tiles as cover it are spread evenly from the first pixel to the last,
  with neighbours overlapping by at least ``2 * margin`` pixels;
* each output pixel is taken from one tile: where two tiles overlap, the seam lies in the middle
  of the overlap, so every pixel beside a seam has at least ``margin`` pixels of real context on
  that side; the image's own edges take no invented context;
* a side shorter than a tile is reflect-padded at its end (bottom or right) to the tile's size.

No seams, no averaging, and the mask has the input's width and height. A 512 x 512 slice is four
tiles of 320 px (or of 272 px with a margin of 16); the stride ``tile - 2 * margin`` is the largest
step between two tiles.

Everything here is pure NumPy/Pillow (no TensorFlow), so training evaluates with the same code the
server runs.
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass

import numpy as np
from PIL import Image

from app.core.spare import Helper, in_order

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


def _spans(length: int, tile: int, margin: int) -> list[tuple[int, int, int]]:
    """Along one side of ``length`` pixels: (tile start, first kept pixel, end of the kept span) of
    each tile, in output coordinates; the kept spans cover ``0 .. length`` exactly once."""
    if length <= tile:
        return [(0, 0, length)]
    gaps = 1 + (length - tile - 1) // (tile - 2 * margin)  # ceil((length - tile) / stride)
    starts = [(i * (length - tile) + gaps // 2) // gaps for i in range(gaps + 1)]
    cuts = [0, *((a + b + tile) // 2 for a, b in zip(starts, starts[1:])), length]
    return [(start, cuts[i], cuts[i + 1]) for i, start in enumerate(starts)]


@dataclass(frozen=True)
class Placement:
    """One tile: its top-left corner (``y``, ``x``) and the output rows ``top:bottom`` and columns
    ``left:right`` it fills, all in image coordinates."""

    y: int
    x: int
    top: int
    bottom: int
    left: int
    right: int

    def kept(self, prediction: np.ndarray) -> np.ndarray:
        """The part of this tile's (tile, tile) prediction that goes into the output."""
        return prediction[self.top - self.y:self.bottom - self.y, self.left - self.x:self.right - self.x]


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
        """The largest step between two neighbouring tiles."""
        return self.tile - 2 * self.margin

    @property
    def rows(self) -> int:
        return len(_spans(self.height, self.tile, self.margin))

    @property
    def cols(self) -> int:
        return len(_spans(self.width, self.tile, self.margin))

    def __len__(self) -> int:
        return self.rows * self.cols

    def placements(self) -> list[Placement]:
        """Every tile, row by row."""
        columns = _spans(self.width, self.tile, self.margin)
        return [Placement(y, x, top, bottom, left, right)
                for y, top, bottom in _spans(self.height, self.tile, self.margin)
                for x, left, right in columns]

    def origins(self) -> list[tuple[int, int]]:
        """Top-left corner of each tile in the padded image."""
        return [(p.y, p.x) for p in self.placements()]

    def pad(self, image: np.ndarray) -> np.ndarray:
        """Reflect-pad a (H, W) image at the bottom and right to at least one tile each way."""
        if image.shape != (self.height, self.width):
            raise ValueError(f"expected a {self.height}x{self.width} image, got {image.shape}")
        bottom, right = max(0, self.tile - self.height), max(0, self.tile - self.width)
        if not bottom and not right:
            return image
        return np.pad(image, ((0, bottom), (0, right)), mode="reflect")


def tile_image(image: np.ndarray, tile: int = TILE, margin: int = MARGIN) -> tuple[np.ndarray, TileLayout]:
    """Cut a (H, W) float image into overlapping tiles: (n_tiles, tile, tile) float32 + the layout."""
    layout = TileLayout(int(image.shape[0]), int(image.shape[1]), tile, margin)
    padded = layout.pad(np.asarray(image, dtype=np.float32))
    tiles = np.stack([padded[y:y + tile, x:x + tile] for y, x in layout.origins()])
    return tiles, layout


def stitch_tiles(tiles: np.ndarray, layout: TileLayout) -> np.ndarray:
    """Inverse of :func:`tile_image` for per-pixel predictions: each tile fills its kept span."""
    tiles = np.asarray(tiles)
    if tiles.ndim == 4:  # (n, tile, tile, 1) straight from the model
        tiles = tiles[..., 0]
    if tiles.shape != (len(layout), layout.tile, layout.tile):
        raise ValueError(f"expected {len(layout)} tiles of {layout.tile}px, got {tiles.shape}")
    out = np.empty((layout.height, layout.width), dtype=tiles.dtype)
    for place, prediction in zip(layout.placements(), tiles, strict=True):
        out[place.top:place.bottom, place.left:place.right] = place.kept(prediction)
    return out


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
    and each tile's kept span is written straight into the output, so memory stays bounded for a
    2048 x 2048 image (the model's activations for one batch dominate it).
    """
    layout = TileLayout(int(gray.shape[0]), int(gray.shape[1]), tile, margin)
    padded = layout.pad(np.asarray(gray, dtype=np.float32))
    places = layout.placements()
    out = np.empty((layout.height, layout.width), dtype=np.float32)
    for start in range(0, len(places), batch_size):
        chunk = places[start:start + batch_size]
        batch = np.stack([padded[p.y:p.y + tile, p.x:p.x + tile] for p in chunk])[..., None]
        prediction = np.asarray(run(batch), dtype=np.float32).reshape(len(chunk), tile, tile)
        for place, tile_prediction in zip(chunk, prediction, strict=True):
            out[place.top:place.bottom, place.left:place.right] = place.kept(tile_prediction)
    return out


@dataclass
class TiledSegmentation:
    """What the server needs of one image: the uint8 mask and the summary features."""

    mask: np.ndarray
    features: dict[str, float]
    probability: np.ndarray | None = None  # float32, only when asked for (16 MB at 2048 x 2048)


def segment_image(gray: np.ndarray, run, *, threshold: float, tile: int = TILE,
                  margin: int = MARGIN, keep_probability: bool = False,
                  helper=None, report: Helper | None = None) -> TiledSegmentation:
    """:func:`binary_mask` of :func:`predict_probability` plus :func:`summary_features`, in bounded
    memory: tile by tile, the mask is written and the statistics accumulated as each tile comes
    back, in the layout's order, so no full-size probability map (16 MB for 2048 x 2048) or
    temporary is ever made.

    ``gray`` is uint8 (scaled by 1/255 tile by tile, as :func:`to_grayscale` scales) or float32 in
    [0, 1]. ``run`` maps one tile batch (1, tile, tile, 1) to probabilities; it may raise to stop.
    ``helper`` (optional) makes a second such function for a helper thread, which runs tiles from
    the other end while another CPU is idle (:func:`app.core.spare.in_order`, ``report`` says which);
    its tiles' predictions wait for their turn (at most about half of them), and the answer is the
    same either way.
    """
    height, width = int(gray.shape[0]), int(gray.shape[1])
    layout = TileLayout(height, width, tile, margin)
    padded = layout.pad(np.asarray(gray))
    mask = np.empty((height, width), dtype=np.uint8)
    probability = np.empty((height, width), dtype=np.float32) if keep_probability else None
    n = float(height * width)
    foreground = probability_sum = certainty_sum = 0.0
    places = layout.placements()

    def tile_probability(place: Placement, model) -> np.ndarray:
        window = padded[place.y:place.y + tile, place.x:place.x + tile]
        if window.dtype == np.uint8:
            window = window.astype(np.float32) / 255.0
        return np.asarray(model(np.asarray(window, dtype=np.float32)[None, ..., None]),
                          dtype=np.float32).reshape(tile, tile)

    def helper_tiles():  # on the helper's thread: its own model
        model = helper()
        return lambda place: tile_probability(place, model)

    predictions = in_order(places, lambda place: tile_probability(place, run),
                           None if helper is None else helper_tiles, report)
    with closing(predictions):  # a tile that raised stops the helper too
        for place, prediction in zip(places, predictions, strict=True):
            kept = place.kept(prediction)
            above = kept >= threshold
            rows, cols = slice(place.top, place.bottom), slice(place.left, place.right)
            mask[rows, cols] = np.where(above, 255, 0)
            if probability is not None:
                probability[rows, cols] = kept
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
