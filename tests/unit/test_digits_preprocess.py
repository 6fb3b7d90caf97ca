"""Digit preprocessing: real MNIST test digits, and the same digits rendered the way people send
them (dark ink on white paper, large, off-centre, thick strokes, transparent canvases)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from app.tasks.digits.preprocess import (
    FEATURE_NAMES,
    BlankImageError,
    InvalidPixelsError,
    image_to_gray,
    normalize_batch,
    prepare_image,
    prepare_pixels,
    summary_features,
)
from tests.support import SHARED_DATA, photo_like

MNIST = SHARED_DATA / "mnist" / "mnist.npz"


@pytest.fixture(scope="module")
def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    with np.load(MNIST) as data:
        return data["x_test"][:200], data["y_test"][:200]


def test_mnist_digits_pass_through_almost_unchanged(mnist_test):
    images, _ = mnist_test
    normalised = normalize_batch(images)
    original = images.astype(np.float32) / 255.0
    # Same ink, at most re-centred by a pixel: the centres of mass agree within a pixel.
    for a, b in zip(normalised[:50], original[:50], strict=True):
        assert np.allclose(ndimage.center_of_mass(a), ndimage.center_of_mass(b), atol=1.0)
        assert abs(a.sum() - b.sum()) / b.sum() < 0.05


def test_output_is_28x28_float32_in_unit_range_centred(mnist_test):
    digit = prepare_pixels(mnist_test[0][0].tolist()).array
    assert digit.shape == (28, 28) and digit.dtype == np.float32
    assert digit.min() == 0.0 and digit.max() == pytest.approx(1.0)
    assert np.allclose(ndimage.center_of_mass(digit), (14.0, 14.0), atol=0.5)


def test_dark_on_light_is_inverted_and_matches_light_on_dark(mnist_test):
    image = mnist_test[0][3]
    light_on_dark = prepare_image(Image.fromarray(image))
    dark_on_light = prepare_image(Image.fromarray(255 - image))
    assert not light_on_dark.inverted
    assert dark_on_light.inverted
    assert np.abs(light_on_dark.array - dark_on_light.array).max() < 1e-5


def test_large_off_centre_thick_photo_becomes_a_centred_20_pixel_digit(mnist_test):
    digit = prepare_image(photo_like(mnist_test[0][0]))
    assert digit.inverted and digit.width == 300 and digit.height == 300
    ink_rows = np.flatnonzero(digit.array.max(axis=1) > 0.2)
    assert 19 <= ink_rows[-1] - ink_rows[0] + 1 <= 20
    assert np.allclose(ndimage.center_of_mass(digit.array), (14.0, 14.0), atol=0.5)


def test_transparent_canvas_composites_on_white():
    canvas = Image.new("RGBA", (200, 200), (0, 0, 0, 0))  # transparent black: white once composited
    stroke = np.zeros((200, 200), dtype=np.uint8)
    stroke[40:160, 95:110] = 255  # a vertical bar, drawn opaque black
    canvas.putalpha(Image.fromarray(stroke))
    gray = image_to_gray(canvas)
    assert gray[0, 0] == 1.0 and gray[100, 100] == 0.0
    digit = prepare_image(canvas)
    assert digit.inverted
    assert digit.array[14, 14] == pytest.approx(1.0, abs=0.05)


def test_blank_images_are_refused():
    with pytest.raises(BlankImageError, match="blank"):
        prepare_image(Image.new("L", (64, 64), 255), "image[0]")
    with pytest.raises(BlankImageError):
        prepare_image(Image.new("RGB", (300, 300), (120, 120, 120)))
    faint = np.full((50, 50), 200, dtype=np.uint8)
    faint[20:30, 20:30] = 195  # 5/255 darker: paper texture, not ink
    with pytest.raises(BlankImageError):
        prepare_image(Image.fromarray(faint))
    with pytest.raises(BlankImageError):
        prepare_pixels([[0] * 28 for _ in range(28)], "instances[0].pixels")


def test_blank_error_names_the_field():
    with pytest.raises(BlankImageError) as info:
        prepare_image(Image.new("L", (28, 28), 0), "image[2]")
    assert info.value.field == "image[2]"


@pytest.mark.parametrize("pixels", [
    [[0] * 28 for _ in range(27)],  # 27 rows
    [[0] * 27 for _ in range(28)],  # 27 columns
    [[0] * 28 for _ in range(27)] + [[0] * 27],  # ragged
    [0] * 784,  # flat
    [[[0]] * 28 for _ in range(28)],  # 28x28x1
    [["0"] * 28 for _ in range(28)],  # strings
    [[None] * 28 for _ in range(28)],
    "not pixels",
])
def test_pixels_of_the_wrong_shape_or_type_are_refused(pixels):
    with pytest.raises(InvalidPixelsError) as info:
        prepare_pixels(pixels, "instances[3].pixels")
    assert info.value.field == "instances[3].pixels"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1, 256])
def test_pixels_must_be_finite_and_in_range(bad, mnist_test):
    pixels = mnist_test[0][0].astype(float).tolist()
    pixels[5][5] = bad
    with pytest.raises(InvalidPixelsError, match="instances\\[0\\].pixels"):
        prepare_pixels(pixels, "instances[0].pixels")


def test_pixels_as_0_255_ints_or_0_1_floats_and_png_agree(mnist_test):
    image = mnist_test[0][7]
    as_ints = prepare_pixels(image.tolist()).array
    as_floats = prepare_pixels((image / 255.0).tolist()).array
    as_png = prepare_image(Image.fromarray(image)).array
    assert np.abs(as_ints - as_floats).max() < 1e-5
    assert np.abs(as_ints - as_png).max() < 1e-5


def test_summary_features_flag_inverted_and_noisy_inputs(mnist_test):
    image = mnist_test[0][0]
    clean = summary_features(prepare_pixels(image.tolist()))
    inverted = summary_features(prepare_pixels((255 - image).tolist()))
    rng = np.random.default_rng(0)
    noisy_pixels = np.clip(image + rng.normal(0, 60, image.shape), 0, 255)
    noisy = summary_features(prepare_pixels(noisy_pixels.tolist()))
    assert set(clean) == set(FEATURE_NAMES)
    assert all(isinstance(v, float) for v in clean.values())
    assert clean["inverted"] == 0.0 and inverted["inverted"] == 1.0
    assert clean["raw_mean"] < 0.2 < 0.8 < inverted["raw_mean"]
    assert clean["background_std"] == 0.0 and noisy["background_std"] > 0.05
    assert noisy["raw_ink_fraction"] > clean["raw_ink_fraction"]


def test_a_4096_pixel_photo_is_shrunk_first_but_reports_its_own_size(mnist_test):
    page = photo_like(mnist_test[0][0], size=300).resize((3000, 3000), Image.BICUBIC)
    small = prepare_image(photo_like(mnist_test[0][0], size=300))
    large = prepare_image(page)
    assert (large.width, large.height) == (3000, 3000)
    assert np.abs(large.array - small.array).mean() < 0.05


def test_palette_and_16_bit_images_are_read(mnist_test):
    image = mnist_test[0][0]
    reference = prepare_pixels(image.tolist()).array
    palette = prepare_image(Image.fromarray(image).convert("P"))
    sixteen = prepare_image(Image.fromarray(image.astype(np.uint16) * 257))
    assert np.abs(palette.array - reference).max() < 1e-5
    assert np.abs(sixteen.array - reference).max() < 1e-5
