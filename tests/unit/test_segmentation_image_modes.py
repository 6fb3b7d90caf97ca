"""Segmentation inputs of every image mode, the probability map the serving path keeps on request,
every metric of a known confusion, and the overlay's exact colours."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from app.tasks.segmentation.preprocess import (
    TileLayout,
    overlay,
    predict_probability,
    segment_image,
    segmentation_metrics,
    stitch_tiles,
    tile_image,
    to_gray_u8,
    to_grayscale,
)
from tests.support import LEVELS, sixteen_bit


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I;16N"])
def test_16_bit_images_are_scaled_by_65535_and_have_no_8_bit_shortcut(mode):
    image = sixteen_bit(mode, LEVELS.astype(np.uint16) * 257)
    gray = to_grayscale(image)
    assert gray.dtype == np.float32
    np.testing.assert_allclose(gray, LEVELS / 255.0, atol=1e-6)
    small = to_grayscale(sixteen_bit(mode, LEVELS.astype(np.uint16)))  # 16-bit is 16-bit, even if dark
    np.testing.assert_allclose(small, LEVELS / 65535.0, atol=1e-7)
    assert to_gray_u8(image) is None


def test_32_bit_integer_images_scale_by_255_up_to_255_and_by_their_maximum_above():
    np.testing.assert_allclose(to_grayscale(Image.fromarray(LEVELS.astype(np.int32))), LEVELS / 255.0, atol=1e-6)
    np.testing.assert_allclose(to_grayscale(Image.fromarray(LEVELS.astype(np.int32) * 4)), LEVELS.astype(np.float64) * 4 / 1020.0,
                               atol=1e-6)
    assert to_grayscale(Image.fromarray(np.zeros((2, 2), dtype=np.int32))).tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert to_gray_u8(Image.fromarray(LEVELS.astype(np.int32))) is None


def test_float_images_scale_like_32_bit_integers_and_negatives_clip_to_0():
    values = np.array([[-5.0, 0.0], [127.5, 255.0]], dtype=np.float32)
    assert to_grayscale(Image.fromarray(values, mode="F")).tolist() == [[0.0, 0.0], [0.5, 1.0]]
    over = np.array([[0.0, 250.0], [500.0, 1000.0]], dtype=np.float32)
    assert to_grayscale(Image.fromarray(over, mode="F")).tolist() == [[0.0, 0.25], [0.5, 1.0]]
    assert to_grayscale(Image.fromarray(np.full((2, 2), -1.0, dtype=np.float32), mode="F")).tolist() == \
        [[0.0, 0.0], [0.0, 0.0]]
    assert to_gray_u8(Image.fromarray(values, mode="F")) is None


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA"])
def test_8_bit_images_are_luma_as_uint8_and_as_floats(mode):
    image = Image.fromarray(LEVELS).convert(mode)
    u8 = to_gray_u8(image)
    assert u8.dtype == np.uint8 and u8.tolist() == LEVELS.tolist()
    gray = to_grayscale(image)
    assert gray.dtype == np.float32
    assert gray.tolist() == (LEVELS.astype(np.float32) / 255.0).tolist()


# --- tiles and the kept probability ------------------------------------------------------------


def test_stitching_takes_model_shaped_tiles_and_refuses_the_wrong_count():
    image = (np.arange(50 * 70, dtype=np.float32).reshape(50, 70) % 97) / 96
    tiles, layout = tile_image(image, tile=32, margin=8)
    np.testing.assert_array_equal(stitch_tiles(tiles[..., None], layout), image)
    with pytest.raises(ValueError, match=r"^expected 12 tiles of 32px, got \(11, 32, 32\)$"):
        stitch_tiles(tiles[:11], layout)
    assert len(layout) == 12 and (layout.rows, layout.cols) == (3, 4)


def test_the_layout_refuses_a_negative_margin_and_names_both_sizes():
    with pytest.raises(ValueError, match="^image must have pixels, got 0x5$"):
        TileLayout(0, 5)
    with pytest.raises(ValueError, match="^tile 32 must exceed twice the margin 16$"):
        TileLayout(5, 5, tile=32, margin=16)
    with pytest.raises(ValueError, match="^tile 32 must exceed twice the margin -1$"):
        TileLayout(5, 5, tile=32, margin=-1)
    with pytest.raises(ValueError, match=r"^expected a 5x5 image, got \(5, 6\)$"):
        TileLayout(5, 5, tile=32, margin=8).pad(np.zeros((5, 6)))


def sigmoid_model(batch: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(batch - 0.5) * 6.0))


def test_the_serving_path_keeps_the_probability_map_only_when_asked():
    rng = np.random.default_rng(3)
    u8 = rng.integers(0, 256, (70, 90), dtype=np.uint8)
    gray = u8.astype(np.float32) / 255.0
    want = predict_probability(gray, sigmoid_model, tile=48, margin=8, batch_size=3)
    kept = segment_image(u8, sigmoid_model, threshold=0.5, tile=48, margin=8, keep_probability=True)
    assert kept.probability.dtype == np.float32 and kept.probability.shape == (70, 90)
    np.testing.assert_allclose(kept.probability, want, rtol=1e-6)
    assert segment_image(u8, sigmoid_model, threshold=0.5, tile=48, margin=8).probability is None
    assert kept.mask.dtype == np.uint8 and set(np.unique(kept.mask)) <= {0, 255}
    np.testing.assert_array_equal(kept.mask, np.where(want >= 0.5, 255, 0))


def test_the_probability_through_tiles_in_any_batch_size_is_the_same():
    gray = (np.arange(60 * 61, dtype=np.float32).reshape(60, 61) % 13) / 12
    one = predict_probability(gray, sigmoid_model, tile=32, margin=8, batch_size=1)
    many = predict_probability(gray, sigmoid_model, tile=32, margin=8, batch_size=5)
    np.testing.assert_array_equal(one, many)
    np.testing.assert_allclose(one, sigmoid_model(gray), rtol=1e-6)
    assert one.dtype == np.float32


def test_serving_features_of_a_constant_image():
    gray = np.full((40, 50), 0.25, dtype=np.float32)
    got = segment_image(gray, lambda batch: np.full(batch.shape, 0.75, dtype=np.float32), threshold=0.75,
                        tile=32, margin=8)
    assert got.features == {"image_mean": 0.25, "image_std": 0.0, "width": 50.0, "height": 40.0,
                            "foreground_fraction": 1.0, "mean_probability": 0.75, "mean_certainty": 0.5}


# --- metrics and overlay ----------------------------------------------------------------------


def test_every_metric_of_a_known_confusion():
    truth = np.array([[1, 1, 1, 0, 0, 0, 0, 0]], dtype=bool)
    pred = np.array([[1, 1, 0, 1, 0, 0, 0, 0]], dtype=bool)  # tp 2, fn 1, fp 1, tn 4
    assert segmentation_metrics(pred, truth) == pytest.approx({
        "pixel_accuracy": 6 / 8, "pixel_error": 2 / 8, "iou_membrane": 2 / 4, "iou_interior": 4 / 6,
        "mean_iou": (2 / 4 + 4 / 6) / 2, "dice_membrane": 4 / 6, "dice_interior": 8 / 10})


def test_metrics_of_a_class_neither_mask_has_are_perfect():
    nothing = np.zeros((2, 2), dtype=bool)
    assert segmentation_metrics(nothing, nothing) == {
        "pixel_accuracy": 1.0, "pixel_error": 0.0, "iou_membrane": 1.0, "iou_interior": 1.0,
        "mean_iou": 1.0, "dice_membrane": 1.0, "dice_interior": 1.0}


def test_the_overlay_blends_each_channel_and_clips_the_image():
    gray = np.array([[0.2, 1.5], [-1.0, 0.2]], dtype=np.float32)
    mask = np.array([[255, 128], [127, 0]], dtype=np.uint8)
    picture = overlay(gray, mask)
    assert picture.mode == "RGB"
    pixels = np.asarray(picture)
    np.testing.assert_array_equal(pixels[0, 0], np.rint([0.5 * 51 + 0.5 * 255, 0.5 * 51 + 20, 0.5 * 51 + 20]))
    np.testing.assert_array_equal(pixels[0, 1], [255, 148, 148])  # 1.5 clipped to white, then tinted
    np.testing.assert_array_equal(pixels[1, 0], [0, 0, 0])  # 127 is not foreground
    np.testing.assert_array_equal(pixels[1, 1], [51, 51, 51])
    custom = np.asarray(overlay(gray, mask, color=(0, 0, 255), alpha=0.25))
    np.testing.assert_array_equal(custom[0, 0], np.rint([0.75 * 51, 0.75 * 51, 0.75 * 51 + 0.25 * 255]))


def test_label_128_and_above_is_cell_interior():
    from app.tasks.segmentation.preprocess import mask_from_label

    assert mask_from_label(np.array([0, 127, 128, 255], dtype=np.uint8)).tolist() == [1.0, 1.0, 0.0, 0.0]


def test_tiles_go_to_the_model_four_at_a_time_by_default():
    sizes = []

    def model(batch):
        sizes.append(len(batch))
        return batch

    predict_probability(np.zeros((101, 120), dtype=np.float32), model, tile=32, margin=8)  # 6 x 7 tiles
    assert sizes == [4] * 10 + [2]


def test_the_features_of_a_tall_image_cover_every_row():
    gray = np.zeros((600, 40), dtype=np.uint8)
    gray[300:] = 255  # the lower half is white: mean 0.5 only if every block of rows is counted
    got = segment_image(gray, sigmoid_model, threshold=0.5, tile=64, margin=8)
    assert got.features["image_mean"] == pytest.approx(0.5) and got.features["image_std"] == pytest.approx(0.5)


def test_a_float_image_already_in_0_1_keeps_its_contrast():
    from PIL import Image

    from app.tasks.segmentation.preprocess import to_grayscale

    arr = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    out = to_grayscale(Image.fromarray(arr, mode="F"))
    assert np.allclose(out, arr)  # not divided by 255 (nearly black)
