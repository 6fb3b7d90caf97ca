"""Every Pillow image mode a digit upload can decode to becomes the same grayscale: 16- and 32-bit
integers, floats, transparency (composited on white, like a canvas drawing on paper), and photos
larger than the working size, which are shrunk first without losing 16-bit precision or alpha; then
the edges of the normalisation (one-pixel strokes, Lanczos ringing, digits pushed against the field's
edge, specks, light ink on grey) and of the ``pixels`` input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from app.tasks.digits.preprocess import (
    WORKING_SIDE,
    BlankImageError,
    DigitInputError,
    InvalidPixelsError,
    image_to_gray,
    normalize_batch,
    normalize_gray,
    pixels_to_gray,
    prepare_image,
    prepare_pixels,
    summary_features,
)
from tests.support import LEVELS, sixteen_bit


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I;16N"])
def test_16_bit_images_are_scaled_by_65535(mode):
    gray = image_to_gray(sixteen_bit(mode, LEVELS.astype(np.uint16) * 257))
    assert gray.dtype == np.float32
    np.testing.assert_allclose(gray, LEVELS / 255.0, atol=1e-6)


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_images_that_use_only_8_bits_are_scaled_by_255(mode):
    np.testing.assert_allclose(image_to_gray(sixteen_bit(mode, LEVELS.astype(np.uint16))), LEVELS / 255.0, atol=1e-6)


def test_32_bit_integer_images_are_read_like_16_bit_ones():
    np.testing.assert_allclose(image_to_gray(Image.fromarray(LEVELS.astype(np.int32) * 257)), LEVELS / 255.0,
                               atol=1e-6)
    np.testing.assert_allclose(image_to_gray(Image.fromarray(LEVELS.astype(np.int32))), LEVELS / 255.0, atol=1e-6)


def test_float_images_in_0_1_are_kept_and_others_scaled_by_255_with_nan_as_0():
    unit = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)
    assert image_to_gray(Image.fromarray(unit, mode="F")).tolist() == unit.tolist()
    np.testing.assert_allclose(image_to_gray(Image.fromarray(unit * 255.0 + 0.0, mode="F")), unit, atol=1e-6)
    over = np.array([[np.nan, 2.0], [510.0, 255.0]], dtype=np.float32)
    np.testing.assert_allclose(image_to_gray(Image.fromarray(over, mode="F")), [[0.0, 2 / 255], [1.0, 1.0]],
                               atol=1e-6)


def test_8_bit_images_are_read_as_luma():
    rgb = Image.fromarray(np.stack([LEVELS] * 3, axis=-1), mode="RGB")
    assert image_to_gray(rgb).tolist() == (LEVELS / np.float32(255.0)).astype(np.float32).tolist()
    assert image_to_gray(Image.fromarray(LEVELS)).dtype == np.float32


def with_alpha(mode: str) -> Image.Image:
    """Black ink where alpha is 255, fully transparent black elsewhere, in ``mode``."""
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0, 3] = 255
    return Image.fromarray(rgba, mode="RGBA").convert(mode)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "RGBa"])  # Pillow cannot convert "La" at all
def test_transparent_pixels_composite_on_white_in_every_alpha_mode(mode):
    assert image_to_gray(with_alpha(mode)).tolist() == [[0.0, 1.0], [1.0, 1.0]]


def test_a_palette_image_with_a_transparent_index_composites_on_white():
    image = Image.fromarray(np.array([[0, 1], [1, 1]], dtype=np.uint8), mode="P")
    image.putpalette([0, 0, 0, 0, 0, 0])
    image.info["transparency"] = 1
    assert image_to_gray(image).tolist() == [[0.0, 1.0], [1.0, 1.0]]


# --- large photos ---------------------------------------------------------------------------


def big_digit(side: int = WORKING_SIDE + 40) -> np.ndarray:
    """A thick dark '1'-like stroke with a cross bar on light paper, ``side`` pixels square (0..1)."""
    page = np.full((side, side), 0.9)
    page[side // 5: 4 * side // 5, side // 2 - side // 20: side // 2 + side // 20] = 0.1
    page[side // 5: side // 5 + side // 20, side // 3: side // 2] = 0.1
    return page


def assert_same_digit(a, b) -> None:
    np.testing.assert_allclose(a.array, b.array, atol=0.02)
    assert (a.inverted, a.width, a.height) == (b.inverted, b.width, b.height)
    assert a.contrast == pytest.approx(b.contrast, abs=0.01)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I;16N"])
def test_a_large_16_bit_photo_keeps_its_precision_when_shrunk(mode):
    page = big_digit()
    eight_bit = prepare_image(Image.fromarray(np.round(page * 255).astype(np.uint8)))
    sixteen = prepare_image(sixteen_bit(mode, np.round(page * 65535).astype(np.uint16)))
    assert_same_digit(sixteen, eight_bit)
    assert (sixteen.width, sixteen.height) == (WORKING_SIDE + 40, WORKING_SIDE + 40)


def test_large_32_bit_and_float_photos_are_shrunk_like_8_bit_ones():
    page = big_digit()
    eight_bit = prepare_image(Image.fromarray(np.round(page * 255).astype(np.uint8)))
    assert_same_digit(prepare_image(Image.fromarray(np.round(page * 65535).astype(np.int32))), eight_bit)
    assert_same_digit(prepare_image(Image.fromarray(page.astype(np.float32), mode="F")), eight_bit)


def test_a_large_transparent_palette_drawing_composites_on_white_when_shrunk():
    side = WORKING_SIDE + 40
    ink = big_digit(side) < 0.5
    indices = np.where(ink, 1, 0).astype(np.uint8)
    drawing = Image.fromarray(indices, mode="P")
    drawing.putpalette([0, 0, 0, 0, 0, 0])  # both black: only the transparency tells paper from ink
    drawing.info["transparency"] = 0
    reference = prepare_image(Image.fromarray(np.where(ink, 0, 255).astype(np.uint8)))
    assert_same_digit(prepare_image(drawing), reference)
    assert_same_digit(prepare_image(drawing.convert("PA")), reference)


def test_a_large_1_bit_scan_is_shrunk_like_its_8_bit_copy():
    page = big_digit() > 0.5
    reference = prepare_image(Image.fromarray(np.where(page, 255, 0).astype(np.uint8)))
    assert_same_digit(prepare_image(Image.fromarray(page)), reference)


def test_a_photo_of_exactly_the_working_size_is_not_shrunk():
    page = big_digit(WORKING_SIDE)
    digit = prepare_image(Image.fromarray(np.round(page * 255).astype(np.uint8)))
    direct = normalize_gray(np.round(page * 255).astype(np.float32) / 255.0)
    np.testing.assert_array_equal(digit.array, direct.array)


def test_a_blank_photo_names_its_field():
    with pytest.raises(BlankImageError) as info:
        prepare_image(Image.new("L", (40, 40), 200), field="image[3]")
    assert info.value.field == "image[3]" and str(info.value).startswith("image[3] is blank")
    with pytest.raises(BlankImageError) as default:
        prepare_image(Image.new("L", (40, 40), 200))
    assert default.value.field == "image"


# --- pixels ---------------------------------------------------------------------------------


def test_pixels_errors_name_the_field_and_say_what_was_wrong():
    with pytest.raises(InvalidPixelsError) as shape:
        pixels_to_gray([[0] * 28] * 27, "instances[2].pixels")
    assert (shape.value.field, str(shape.value)) == (
        "instances[2].pixels", "instances[2].pixels must be 28 rows of 28 numbers; got shape 27x28.")
    with pytest.raises(InvalidPixelsError) as scalar:
        pixels_to_gray(5)
    assert str(scalar.value) == "pixels must be 28 rows of 28 numbers; got shape scalar."
    with pytest.raises(InvalidPixelsError) as ragged:
        pixels_to_gray([[0] * 28, [0]])
    assert str(ragged.value) == "pixels must be 28 rows of 28 numbers." and ragged.value.field == "pixels"
    with pytest.raises(InvalidPixelsError) as words:
        pixels_to_gray([["a"] * 28] * 28)
    assert str(words.value) == "pixels must be 28 rows of 28 numbers."
    bad = np.zeros((28, 28))
    bad[3, 4] = np.nan
    with pytest.raises(InvalidPixelsError, match="^pixels contains NaN or infinite values.$"):
        pixels_to_gray(bad.tolist())
    bad[3, 4] = 300
    with pytest.raises(InvalidPixelsError) as over:
        pixels_to_gray(bad.tolist())
    assert str(over.value) == "pixels values must be in 0..255 (or 0..1); got 0..300."
    bad[3, 4] = -0.5
    with pytest.raises(InvalidPixelsError, match=r"got -0\.5\.\.0\.$"):
        pixels_to_gray(bad.tolist())


def test_pixels_at_the_edges_of_each_scale():
    ones = np.zeros((28, 28))
    ones[10, 10] = 1.0
    assert pixels_to_gray(ones.tolist())[10, 10] == 1.0  # all within 0..1: read as 0..1
    ones[10, 10] = 255
    assert pixels_to_gray(ones.tolist())[10, 10] == 1.0
    ones[10, 10] = 2
    assert pixels_to_gray(ones.astype(int).tolist())[10, 10] == pytest.approx(2 / 255)
    assert pixels_to_gray(ones.tolist()).dtype == np.float32


def test_prepare_pixels_names_its_field():
    with pytest.raises(BlankImageError) as info:
        prepare_pixels([[0] * 28] * 28, "instances[1].pixels")
    assert info.value.field == "instances[1].pixels"
    with pytest.raises(InvalidPixelsError) as default:
        prepare_pixels([[0] * 27] * 28)
    assert default.value.field == "pixels"


def test_a_grayscale_that_is_not_2d_is_refused():
    for bad in (np.zeros((3, 3, 3)), np.zeros((0, 5))):
        with pytest.raises(DigitInputError) as info:
            normalize_gray(bad, "image[0]")
        assert (info.value.field, str(info.value)) == ("image[0]", "image[0] must be a non-empty 2-D grayscale image.")


def test_a_batch_of_0_255_images_is_scaled_and_blanks_stay_as_zeros():
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[6:22, 12:16] = 255
    batch = normalize_batch([digit, np.zeros((28, 28), dtype=np.uint8), digit / 255.0])
    assert batch.shape == (3, 28, 28) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[0], normalize_gray(digit / 255.0).array)
    np.testing.assert_array_equal(batch[2], batch[0])
    assert not batch[1].any()


def test_summary_features_of_a_known_digit():
    page = np.zeros((28, 28))
    page[4:24, 12:16] = 1.0  # a 4 x 20 bar: already box-sized
    digit = normalize_gray(page)
    features = summary_features(digit)
    assert features == {
        "raw_mean": round(80 / 784, 6), "inverted": 0.0, "background_std": 0.0, "contrast": 1.0,
        "raw_ink_fraction": round(80 / 784, 6), "ink_ratio": round(float((digit.array > 0.5).mean()), 6),
        "norm_mean": round(float(digit.array.mean()), 6), "box_aspect": 0.2, "width": 28.0, "height": 28.0}
    assert features["ink_ratio"] == round(80 / 784, 6)


# --- normalisation edges ----------------------------------------------------------------------


def on_paper(ink: np.ndarray, side: int = 60) -> np.ndarray:
    """``ink`` (1 = ink) as dark strokes on white paper."""
    page = np.ones((side, side), dtype=np.float32)
    page[ink.astype(bool)] = 0.0
    return page


def test_a_one_pixel_line_stays_one_pixel_thick_when_scaled_to_the_box():
    ink = np.zeros((60, 60))
    ink[30, 10:50] = 1  # 40 x 1: scaled by 1/2, the height rounds to 0 and is kept at 1
    digit = normalize_gray(on_paper(ink))
    rows = np.flatnonzero(digit.array.max(axis=1) > 0)
    assert rows.size == 1 and np.count_nonzero(digit.array[rows[0]] > 0.5) == 20
    digit = normalize_gray(on_paper(ink.T))
    cols = np.flatnonzero(digit.array.max(axis=0) > 0)
    assert cols.size == 1 and digit.box_aspect == 1 / 40


def test_the_box_is_scaled_with_lanczos_and_clipped_to_0_1():
    ink = np.zeros((60, 60))
    ink[5:55, 20:40] = 1
    ink[12:48, 25:35] = 0  # a sharp-edged "0": Lanczos rings past 0 inside and past 1 on the rim
    digit = normalize_gray(on_paper(ink))
    crop = ink[5:55, 20:40].astype(np.float32)
    want = np.asarray(Image.fromarray(crop, mode="F").resize((8, 20), Image.LANCZOS), dtype=np.float32)
    assert want.min() < 0.0 and want.max() > 1.0
    rows, cols = np.flatnonzero(digit.array.any(axis=1)), np.flatnonzero(digit.array.any(axis=0))
    patch = digit.array[rows[0]:rows[0] + 20, cols[0]:cols[0] + 8]
    np.testing.assert_allclose(patch, np.clip(want, 0.0, 1.0), atol=1e-6)
    assert digit.array.min() == 0.0 and digit.array.max() == 1.0


def test_a_digit_whose_mass_sits_at_one_end_is_pasted_inside_the_field():
    ink = np.zeros((60, 60))
    ink[10:50, 29:31] = 1
    ink[44:50, 10:50] = 1  # a heavy foot: the centre of mass is near the bottom
    bottom_heavy = normalize_gray(on_paper(ink)).array
    assert np.flatnonzero(bottom_heavy.any(axis=1))[0] == 0  # pushed up to the edge, not past it
    top_heavy = normalize_gray(on_paper(ink[::-1])).array
    assert np.flatnonzero(top_heavy.any(axis=1))[-1] == 27
    left_heavy = normalize_gray(on_paper(ink.T)).array
    assert np.flatnonzero(left_heavy.any(axis=0))[0] == 0
    right_heavy = normalize_gray(on_paper(ink.T[:, ::-1])).array
    assert np.flatnonzero(right_heavy.any(axis=0))[-1] == 27


def test_specks_of_at_least_2_percent_of_the_largest_stroke_count_as_ink():
    ink = np.zeros((60, 60))
    ink[20:30, 20:30] = 1  # 100 pixels
    ink[55, 40:42] = 1  # 2 pixels: 2 % of the stroke, kept
    assert normalize_gray(on_paper(ink)).box_aspect == pytest.approx(22 / 36)
    ink[55, 41] = 0  # 1 pixel: a speck, ignored
    assert normalize_gray(on_paper(ink)).box_aspect == 1.0


def test_integer_and_float_images_are_clipped_to_0_1_at_each_scale():
    assert image_to_gray(sixteen_bit("I;16", np.array([[0, 256]], dtype=np.uint16))).tolist() == [
        [0.0, pytest.approx(256 / 65535)]]
    wide = Image.fromarray(np.array([[-100, 70000]], dtype=np.int32))
    assert image_to_gray(wide).tolist() == [[0.0, 1.0]]
    floats = Image.fromarray(np.array([[-5.0, 1.5]], dtype=np.float32), mode="F")
    assert image_to_gray(floats).tolist() == [[0.0, pytest.approx(1.5 / 255)]]


def test_a_faint_0_255_image_is_blank_in_a_batch_as_it_is_alone():
    faint = np.zeros((28, 28), dtype=np.uint8)
    faint[6:22, 12:16] = 30  # contrast 30 / 255: under the blank threshold
    with pytest.raises(BlankImageError):
        normalize_gray(faint / 255.0)
    assert not normalize_batch([faint]).any()


def test_invalid_pixel_values_name_their_field():
    for bad in (np.full((28, 28), np.inf), np.full((28, 28), 256.0)):
        with pytest.raises(InvalidPixelsError) as info:
            pixels_to_gray(bad.tolist(), "instances[4].pixels")
        assert info.value.field == "instances[4].pixels"


def test_light_ink_on_grey_is_not_inverted_and_is_stretched_from_the_grey():
    page = np.full((40, 40), 0.2, dtype=np.float32)
    page[8:32, 18:22] = 1.0
    page[0, 0] = 0.1  # a pixel darker than the background: clipped to 0, never negative ink
    digit = normalize_gray(page)
    assert not digit.inverted and digit.background == pytest.approx(0.2)
    assert digit.contrast == pytest.approx(0.8)
    assert digit.array.max() == pytest.approx(1.0) and digit.array.min() == 0.0


def test_background_spread_is_measured_on_the_paper_the_same_way_for_either_polarity():
    rng = np.random.default_rng(3)
    page = np.clip(0.85 + rng.normal(0.0, 0.05, (40, 40)), 0.0, 1.0).astype(np.float32)
    page[8:32, 18:22] = 0.0
    dark_on_light, light_on_dark = normalize_gray(page), normalize_gray(1.0 - page)
    frame = np.concatenate([page[:2].ravel(), page[-2:].ravel(), page[:, :2].ravel(), page[:, -2:].ravel()])
    paper = 1.0 - frame  # polarity-corrected: the paper is dark
    want = float(paper[paper <= np.percentile(paper, 90.0)].std())
    assert dark_on_light.background_std == pytest.approx(want, rel=1e-5)
    assert light_on_dark.background_std == pytest.approx(want, rel=1e-5)
    features = summary_features(dark_on_light)
    assert all(value == round(value, 6) for value in features.values())
    assert features["background_std"] == round(want, 6) != round(want, 7)


def test_a_tiny_image_uses_a_one_pixel_border():
    page = np.ones((6, 6), dtype=np.float32)
    page[1:5, 2:4] = 0.0
    digit = normalize_gray(page)
    assert digit.inverted and digit.array.max() == 1.0 and (digit.width, digit.height) == (6, 6)


def test_blank_errors_name_the_default_field():
    with pytest.raises(BlankImageError) as info:
        normalize_gray(np.full((28, 28), 0.5))
    assert info.value.field == "image" and str(info.value).startswith("image is blank")
    assert DigitInputError("x").field == ""
    with pytest.raises(BlankImageError) as big:
        prepare_image(sixteen_bit("I;16", np.full((WORKING_SIDE + 40, WORKING_SIDE + 40), 30000, dtype=np.uint16)))
    assert big.value.field == "image"


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_a_large_transparent_drawing_composites_on_white_when_shrunk(mode):
    side = WORKING_SIDE + 40
    ink = big_digit(side) < 0.5
    rgba = np.zeros((side, side, 4), dtype=np.uint8)  # transparent black paper
    rgba[ink, 3] = 255  # opaque black ink
    drawing = Image.fromarray(rgba, mode="RGBA").convert(mode)
    reference = prepare_image(Image.fromarray(np.where(ink, 0, 255).astype(np.uint8)))
    assert_same_digit(prepare_image(drawing), reference)
