"""Training and evaluation inputs for the digits model, as people send them, through the serving
preprocessing.

Every function here returns raw grayscale images (float32 in [0, 1], any size, any polarity) or, via
:func:`prepared`, the 28x28 model input that ``app.tasks.digits.preprocess.normalize_gray`` makes of
them, the same function serving runs on each upload.

- :func:`augment_digit`: an MNIST digit redrawn as a pen, a marker or a scan would draw it (stroke
  width by dilation/erosion, binarised or anti-aliased ink, blur, elastic distortion, rotation,
  shear, tight boxes or wide margins, either polarity, paper level and noise);
- :func:`low_resolution_digit`: a digit counted into 4x4 blocks (an 8x8 grid with levels 0-16, as
  optical-form scanners store them) and enlarged again with nearest, bilinear or bicubic resampling;
- :func:`render_trajectory`: a pen trajectory (pendigits) drawn as a finger or mouse draws on a
  canvas, with round joints, varied widths, canvas sizes and anti-aliasing (and, with
  :func:`low_resolution_trajectory`, counted into an 8x8 grid);
- :func:`render_glyph` and :func:`texture`: non-digits (letters, textures) for outlier exposure in
  training and for measuring confident answers to non-digits in evaluation. Training and evaluation
  use disjoint fonts and disjoint letters (:data:`TRAIN_FONTS` / :data:`EVAL_FONTS`,
  :data:`TRAIN_LETTERS` / :data:`EVAL_LETTERS`); letters that are drawn like digits (O, l, S, Z, B,
  g, q...) are in neither.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from app.tasks.digits.preprocess import SIZE, BlankImageError, normalize_gray

FONT_DIR = Path("/usr/share/fonts/truetype")
TRAIN_FONTS = sorted(str(p) for p in (FONT_DIR / "dejavu").glob("DejaVu*.ttf") if "Math" not in p.name)
EVAL_FONTS = sorted(str(p) for p in (FONT_DIR / "liberation").glob("Liberation*.ttf"))
# Letters and symbols written like a digit (O/D/Θ/Φ/0, I/l/1, S/$/§/5, Z/2, B/8, G/b/6, g/q/9,
# T/J/Γ/7, A/4 in some hands...) are left out of both sets: a digit answer to them is not a mistake
# worth training away.
TRAIN_LETTERS = "CEFHKMNRVXacefhkmnrvx#&%@?+=*€©¶√±αγλμπψωΣΔΨΛΠ"
EVAL_LETTERS = "PUWYdpuwy"


def prepared(gray: np.ndarray) -> np.ndarray | None:
    """The serving preprocessing's 28x28 model input for a raw grayscale image; None when blank."""
    try:
        return normalize_gray(np.ascontiguousarray(gray, dtype=np.float32)).array
    except BlankImageError:
        return None


# ---- pen, marker and scan ---------------------------------------------------------------------
def _warp(image: np.ndarray, rng: np.random.Generator, rotation: float, shear: float,
          elastic: float) -> np.ndarray:
    """Rotation (degrees), shear and a smooth random displacement field (Simard et al. 2003), in
    one bilinear resampling; the canvas grows so nothing is cut off."""
    h, w = image.shape
    pad = h // 4
    image = np.pad(image, pad)
    h, w = image.shape
    angle = np.deg2rad(rotation)
    scale = rng.uniform(0.85, 1.15, size=2)
    matrix = (np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
              @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag(1.0 / scale))
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float32)
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    coords = np.tensordot(matrix, np.stack([rows - centre[0], cols - centre[1]]), axes=1)
    coords += centre[:, None, None]
    if elastic > 0:
        sigma = h / 7
        for axis in range(2):
            field = ndimage.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="constant")
            coords[axis] += field * elastic * h / (np.abs(field).max() + 1e-6) / 10
    return ndimage.map_coordinates(image, coords, order=1, mode="constant")


def _stroke(image: np.ndarray, rng: np.random.Generator, upscale: int) -> np.ndarray:
    """Thinner (erosion) or thicker (dilation) ink, binarised or anti-aliased, maybe blurred."""
    if rng.random() < 0.4:  # binarised ink: a threshold like a scanner or a 1-bit canvas
        image = (image > rng.uniform(0.25, 0.6)).astype(np.float32)
    change = int(rng.choice([-1, 0, 0, 1, 2, 3])) * upscale // 2
    if change > 0:
        image = ndimage.grey_dilation(image, footprint=_disk(change))
    elif change < 0 and image.sum() > 40 * upscale * upscale:
        eroded = ndimage.grey_erosion(image, footprint=_disk(-change))
        image = eroded if eroded.max() > 0.5 else image
    if rng.random() < 0.5:
        image = ndimage.gaussian_filter(image, rng.uniform(0.3, 1.2) * upscale)
    return image


def _disk(radius: int) -> np.ndarray:
    r = max(int(radius), 1)
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= r * r + r


def _frame(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A tight box (the digit touches the edges) or margins up to the digit's size, off-centre."""
    rows = np.flatnonzero(image.max(axis=1) > 0.1)
    cols = np.flatnonzero(image.max(axis=0) > 0.1)
    if len(rows) == 0 or len(cols) == 0:
        return image
    image = image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    if rng.random() < 0.3:
        return np.pad(image, 1)
    h, w = image.shape
    side = max(h, w)
    margins = (rng.uniform(0.05, 0.6, 4) * side).astype(int)
    return np.pad(image, ((margins[0], margins[1]), (margins[2], margins[3])))


def _paper(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Ink in [0, 1] on paper: light ink on dark or dark on light, any levels, maybe noisy."""
    background = rng.uniform(0.0, 0.25)
    ink_level = rng.uniform(0.7, 1.0)
    image = background + (ink_level - background) * ink
    if rng.random() < 0.3:
        image = image + rng.normal(0, rng.uniform(0.01, 0.06), image.shape)
    if rng.random() < 0.5:
        image = 1.0 - image
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def augment_digit(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 28x28 white-on-black digit in [0, 1] redrawn as people draw, scan or photograph it."""
    upscale = int(rng.choice([2, 3]))
    image = ndimage.zoom(digit.astype(np.float32), upscale, order=1)
    image = _warp(image, rng, rotation=rng.uniform(-12, 12), shear=rng.uniform(-0.25, 0.25),
                  elastic=rng.choice([0.0, rng.uniform(0.5, 1.5)]))
    image = _stroke(np.clip(image, 0, 1), rng, upscale)
    return _paper(_frame(image, rng), rng)


def low_resolution_digit(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A digit (light ink on black, any size) as an 8x8 grid of 4x4 block counts (0-16) of a 32x32
    bitmap, enlarged again."""
    rows = np.flatnonzero(digit.max(axis=1) > 0.1)
    cols = np.flatnonzero(digit.max(axis=0) > 0.1)
    crop = digit[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    height = int(rng.integers(24, 33))
    width = int(np.clip(round(crop.shape[1] * height / crop.shape[0] * rng.uniform(0.8, 1.5)), 4, 32))
    bitmap = np.asarray(Image.fromarray((crop * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR),
                        dtype=np.float32) / 255.0
    bitmap = ndimage.grey_dilation(bitmap, footprint=_disk(int(rng.choice([0, 1, 1, 2]))))
    field = np.zeros((32, 32), dtype=np.float32)
    top, left = int(rng.integers(0, 33 - height)), int(rng.integers(0, 33 - width))
    field[top:top + height, left:left + width] = bitmap > rng.uniform(0.3, 0.6)
    counts = field.reshape(8, 4, 8, 4).sum(axis=(1, 3)) / 16.0
    side = int(rng.choice([8, 16, 28, 32, 64]))
    resample = [Image.NEAREST, Image.BILINEAR, Image.BICUBIC][int(rng.integers(0, 3))]
    big = Image.fromarray((counts * 255).astype(np.uint8)).resize((side, side), resample)
    return _paper(np.asarray(big, dtype=np.float32) / 255.0, rng) if rng.random() < 0.5 \
        else np.asarray(big, dtype=np.float32) / 255.0


# ---- pen trajectories (pendigits) ---------------------------------------------------------------
def read_pendigits(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, 8, 2) points in 0-100 (y up, as recorded) and (N,) labels from a pendigits file."""
    rows = [line.strip().split(",") for line in Path(path).read_text().splitlines() if line.strip()]
    points = np.asarray([[float(v) for v in row[:16]] for row in rows], dtype=np.float32).reshape(-1, 8, 2)
    labels = np.asarray([row[16].index("1") if len(row[16]) == 10 else int(row[16]) for row in rows])
    return points, labels


def render_trajectory(points: np.ndarray, *, canvas: int = 112, width: int = 8, margin: int = 16,
                      supersample: int = 1, aspect: float = 1.0) -> np.ndarray:
    """A pen trajectory drawn as dark strokes with round joints on a white canvas (like the web
    client's canvas): points in 0-100 (y up) mapped into the canvas less its margins."""
    scale = supersample
    side = canvas * scale
    span = (canvas - 2 * margin) * scale
    xs = margin * scale + points[:, 0] / 100.0 * span * min(aspect, 1.0) + span * (1 - min(aspect, 1.0)) / 2
    ys = margin * scale + (100.0 - points[:, 1]) / 100.0 * span * min(1 / aspect, 1.0) \
        + span * (1 - min(1 / aspect, 1.0)) / 2
    image = Image.new("L", (side, side), 255)
    draw = ImageDraw.Draw(image)
    xy = list(zip(xs.tolist(), ys.tolist(), strict=True))
    draw.line(xy, fill=0, width=width * scale, joint="curve")
    r = width * scale / 2
    for x, y in (xy[0], xy[-1]):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=0)
    if scale > 1:
        image = image.resize((canvas, canvas), Image.LANCZOS)
    return np.asarray(image, dtype=np.float32) / 255.0


def random_trajectory_render(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    canvas = int(rng.choice([48, 64, 112, 160, 280]))
    width = max(1, int(round(canvas * rng.uniform(0.025, 0.13))))
    margin = int(canvas * rng.uniform(0.05, 0.25))
    jitter = points + rng.normal(0, 1.5, points.shape).astype(np.float32)
    image = render_trajectory(jitter, canvas=canvas, width=width, margin=margin,
                              supersample=int(rng.choice([1, 3])), aspect=float(rng.uniform(0.6, 1.2)))
    if rng.random() < 0.3:
        image = ndimage.gaussian_filter(image, rng.uniform(0.3, 1.5))
    return image


# ---- non-digits ---------------------------------------------------------------------------------
def low_resolution_trajectory(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A pen trajectory drawn with a thick pen, then counted into an 8x8 grid and enlarged again."""
    drawn = render_trajectory(points, canvas=64, width=int(rng.integers(4, 9)), margin=4,
                              aspect=float(rng.uniform(0.6, 1.2)))
    return low_resolution_digit(1.0 - drawn, rng)


def render_glyph(char: str, font_path: str, rng: np.random.Generator) -> np.ndarray:
    """A letter or symbol in a font, dark on white, at a random size, rotation and stroke."""
    size = int(rng.choice([24, 40, 64, 96]))
    font = ImageFont.truetype(font_path, size)
    image = Image.new("L", (size * 2, size * 2), 255)
    ImageDraw.Draw(image).text((size // 2, size // 4), char, fill=0, font=font,
                               stroke_width=int(rng.choice([0, 0, 1, 2])) * size // 40, stroke_fill=0)
    image = image.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR, fillcolor=255)
    return np.asarray(image, dtype=np.float32) / 255.0


def _smooth_noise(rng: np.random.Generator, side: int) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.normal(size=(side, side)), rng.uniform(1, side / 8))
    noise -= noise.min()
    return noise / (noise.max() + 1e-6)


def _cells(rng: np.random.Generator, side: int) -> np.ndarray:
    """Borders of random cells (a Voronoi diagram), like tissue, foam or cracked paint."""
    seeds = rng.uniform(0, side, (int(rng.integers(8, 60)), 2))
    rows, cols = np.mgrid[0:side, 0:side]
    distances = np.sort(np.hypot(rows[..., None] - seeds[:, 0], cols[..., None] - seeds[:, 1]), axis=-1)
    return (distances[..., 1] - distances[..., 0] < rng.uniform(1, 4)).astype(np.float32)


def _lines(rng: np.random.Generator, side: int) -> np.ndarray:
    """Many straight or wavy lines: grids, hatching, ruled paper, fabric."""
    image = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 30))):
        x0, y0, x1, y1 = rng.uniform(-side / 2, side * 1.5, 4)
        draw.line((x0, y0, x1, y1), fill=255, width=int(rng.integers(1, 5)))
    return np.asarray(image, dtype=np.float32) / 255.0


def _blobs(rng: np.random.Generator, side: int) -> np.ndarray:
    image = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(5, 40))):
        x, y = rng.uniform(0, side, 2)
        r = rng.uniform(2, side / 6)
        draw.ellipse((x - r, y - r, x + r * rng.uniform(0.5, 2), y + r), fill=int(rng.integers(80, 256)))
    return np.asarray(image, dtype=np.float32) / 255.0


def _scene(rng: np.random.Generator, side: int) -> np.ndarray:
    """A photo-like gradient with a few soft shapes and sensor noise."""
    rows, cols = np.mgrid[0:side, 0:side] / side
    a, b, c = rng.uniform(-1, 1, 3)
    image = a * rows + b * cols + c * rows * cols + 0.5 * _blobs(rng, side)
    image = ndimage.gaussian_filter(image, rng.uniform(0.5, 3)) + rng.normal(0, 0.03, image.shape)
    image -= image.min()
    return image / (image.max() + 1e-6)


TEXTURES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "smooth noise": _smooth_noise, "cells": _cells, "lines": _lines, "blobs": _blobs, "scene": _scene}


def texture(rng: np.random.Generator) -> np.ndarray:
    """A synthetic non-digit image (noise, cells, lines, blobs or a photo-like scene)."""
    side = int(rng.choice([32, 48, 64, 96]))
    kind = list(TEXTURES)[int(rng.integers(0, len(TEXTURES)))]
    image = TEXTURES[kind](rng, side)
    if rng.random() < 0.5:
        image = image > rng.uniform(0.3, 0.7)
    return _paper(np.asarray(image, dtype=np.float32), rng)


def non_digit(rng: np.random.Generator) -> np.ndarray:
    """A training non-digit: a training-set letter or symbol in a training font, or a texture."""
    if rng.random() < 0.5:
        char = TRAIN_LETTERS[int(rng.integers(0, len(TRAIN_LETTERS)))]
        glyph = render_glyph(char, TRAIN_FONTS[int(rng.integers(0, len(TRAIN_FONTS)))], rng)
        if rng.random() < 0.5:
            glyph = 1.0 - _stroke(1.0 - glyph, rng, 2)
        return glyph
    return texture(rng)
