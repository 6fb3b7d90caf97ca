"""Segmentation preprocessing: normalisation, overlap-tiling, masks, metrics, summary features."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from app.core.spare import Helper
from app.tasks.segmentation.preprocess import (
    MARGIN,
    TILE,
    TileLayout,
    binary_mask,
    mask_from_label,
    overlay,
    predict_probability,
    segment_image,
    segmentation_metrics,
    stitch_tiles,
    summary_features,
    tile_image,
    to_grayscale,
)

ODD_SIZES = [(517, 300), (1, 1), (37, 1000), (512, 512), (TILE, TILE), (3, 257), (1000, 1)]


def ramp(height: int, width: int) -> np.ndarray:
    return (np.arange(height * width, dtype=np.float32).reshape(height, width) % 251) / 250.0


@pytest.mark.parametrize(("height", "width"), ODD_SIZES)
def test_tiling_then_stitching_gives_back_the_image_exactly(height, width):
    image = ramp(height, width)
    tiles, layout = tile_image(image)
    assert tiles.shape == (len(layout), TILE, TILE)
    restored = stitch_tiles(tiles, layout)
    assert restored.shape == (height, width)
    np.testing.assert_array_equal(restored, image)


@pytest.mark.parametrize(("height", "width"), ODD_SIZES)
def test_tiled_prediction_with_an_identity_model_has_the_input_size_and_values(height, width):
    image = ramp(height, width)
    out = predict_probability(image, lambda batch: batch, batch_size=3)
    assert out.shape == (height, width)
    np.testing.assert_array_equal(out, image)


def test_a_512_slice_takes_four_tiles_and_each_pixel_comes_from_one_tile_centre():
    layout = TileLayout(512, 512)
    assert layout.stride == TILE - 2 * MARGIN == 256
    assert (layout.rows, layout.cols, len(layout)) == (2, 2, 4)
    # a fake model that paints each tile with its index shows which tile each output pixel came from
    calls = []

    def paint(batch):
        start = sum(len(b) for b in calls)
        calls.append(batch)
        index = np.arange(start, start + len(batch), dtype=np.float32)
        return index[:, None, None, None] * np.ones_like(batch)

    out = predict_probability(np.zeros((512, 512), np.float32), paint, batch_size=16)
    assert len(calls) == 1 and calls[0].shape == (4, TILE, TILE, 1)
    np.testing.assert_array_equal(out[:256, :256], 0)
    np.testing.assert_array_equal(out[:256, 256:], 1)
    np.testing.assert_array_equal(out[256:, :256], 2)
    np.testing.assert_array_equal(out[256:, 256:], 3)


def test_tiles_are_sent_in_batches_of_at_most_batch_size():
    sizes = []
    predict_probability(np.zeros((1100, 1100), np.float32),
                        lambda batch: sizes.append(len(batch)) or batch, batch_size=4)
    assert sizes == [4, 4, 4, 4, 4, 4, 1]  # 5 x 5 = 25 tiles of stride 256


def test_a_side_shorter_than_a_tile_is_reflected_at_its_end_and_the_image_starts_the_tile():
    image = ramp(40, 50)
    tiles, layout = tile_image(image)
    first = tiles[0]
    np.testing.assert_array_equal(first[:40, :50], image)
    # the row below the image's last row mirrors the image's row 38 (reflect, edge excluded)
    np.testing.assert_array_equal(first[40, :50], image[38])
    np.testing.assert_array_equal(first[:40, 50], image[:, 48])


@pytest.mark.parametrize("length", [TILE, TILE + 1, 512, 700, 1100, 2048, 4093])
@pytest.mark.parametrize(("tile", "margin"), [(TILE, MARGIN), (272, 16), (32, 0), (33, 16)])
def test_tiles_lie_inside_the_image_and_every_seam_has_margin_context_on_both_sides(length, tile, margin):
    layout = TileLayout(length, 7, tile, margin)
    places = layout.placements()
    assert len(layout) == layout.rows == len(places)
    # as few tiles as cover the side with steps of at most the stride
    assert layout.rows == (1 if length <= tile else 1 + -(-(length - tile) // layout.stride))
    covered = np.zeros(length, dtype=int)
    for place in places:
        assert 0 <= place.y <= max(0, length - tile)  # no tile starts outside the image
        assert place.y <= place.top < place.bottom <= place.y + tile
        covered[place.top:place.bottom] += 1
        if place.top > 0:  # a seam above: at least `margin` rows of real context above it
            assert place.top - place.y >= margin
        if place.bottom < length:  # a seam below
            assert place.y + tile - place.bottom >= margin
    np.testing.assert_array_equal(covered, 1)


def test_tiles_are_spread_evenly_each_start_the_nearest_pixel():
    # 1101 px in 320 px tiles at most 256 apart: 5 tiles, 781 / 4 = 195.25 px apart, rounded half up
    layout = TileLayout(1101, 5, 320, 32)
    assert [p.y for p in layout.placements()] == [0, 195, 391, 586, 781]
    assert [(p.top, p.bottom) for p in layout.placements()] == [(0, 257), (257, 453), (453, 648),
                                                                (648, 843), (843, 1101)]


def test_the_seam_lies_in_the_middle_of_the_overlap():
    layout = TileLayout(512, 512, 272, 16)  # two tiles each way, starting at 0 and 240
    assert [(p.y, p.top, p.bottom) for p in layout.placements()[::2]] == [(0, 0, 256), (240, 256, 512)]
    assert layout.pad(np.zeros((512, 512))).shape == (512, 512)  # no padding when a tile fits


def test_tile_layout_rejects_empty_images_and_a_margin_that_eats_the_tile():
    with pytest.raises(ValueError):
        TileLayout(0, 10)
    with pytest.raises(ValueError):
        TileLayout(10, 10, tile=64, margin=32)


def test_threshold_maps_probabilities_to_0_or_255():
    probability = np.array([[0.0, 0.49, 0.5], [0.51, 0.9, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(binary_mask(probability), [[0, 0, 255], [255, 255, 255]])
    np.testing.assert_array_equal(binary_mask(probability, 0.95), [[0, 0, 0], [0, 0, 255]])
    assert binary_mask(probability).dtype == np.uint8


def test_dataset_label_0_is_membrane_and_becomes_foreground():
    label = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(mask_from_label(label), [[1.0, 0.0], [0.0, 1.0]])


def test_grayscale_normalisation_of_each_image_mode():
    gray = Image.fromarray(np.array([[0, 255]], dtype=np.uint8), mode="L")
    np.testing.assert_allclose(to_grayscale(gray), [[0.0, 1.0]])
    red = Image.new("RGB", (2, 1), (255, 0, 0))
    np.testing.assert_allclose(to_grayscale(red), [[76 / 255, 76 / 255]])  # ITU-R 601 luma of red
    rgba = Image.new("RGBA", (1, 1), (255, 255, 255, 0))
    np.testing.assert_allclose(to_grayscale(rgba), [[1.0]])
    deep = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    assert deep.mode == "I;16"
    np.testing.assert_allclose(to_grayscale(deep), [[0.0, 1.0]])
    assert to_grayscale(gray).dtype == np.float32


def test_metrics_on_a_known_confusion():
    truth = np.array([[1, 1, 0, 0]], dtype=bool)  # 1 = membrane
    pred = np.array([[1, 0, 0, 1]], dtype=bool)   # tp 1, fn 1, tn 1, fp 1
    metrics = segmentation_metrics(pred, truth)
    assert metrics["pixel_accuracy"] == pytest.approx(0.5)
    assert metrics["pixel_error"] == pytest.approx(0.5)
    assert metrics["iou_membrane"] == pytest.approx(1 / 3)
    assert metrics["iou_interior"] == pytest.approx(1 / 3)
    assert metrics["dice_membrane"] == pytest.approx(0.5)
    assert segmentation_metrics(truth, truth)["pixel_accuracy"] == 1.0


def test_summary_features_describe_image_and_prediction():
    gray = np.array([[0.0, 1.0], [0.0, 1.0], [0.5, 0.5]], dtype=np.float32)
    probability = np.array([[1.0, 0.0], [0.75, 0.25], [0.5, 0.5]], dtype=np.float32)
    features = summary_features(gray, probability)
    assert features["width"] == 2.0 and features["height"] == 3.0
    assert features["image_mean"] == pytest.approx(0.5)
    assert features["image_std"] == pytest.approx(np.std(gray))
    assert features["foreground_fraction"] == pytest.approx(4 / 6)  # 1.0, 0.75, 0.5 and 0.5
    assert features["mean_certainty"] == pytest.approx((1 + 1 + 0.5 + 0.5 + 0 + 0) / 6)
    assert all(isinstance(v, float) for v in features.values())


def test_overlay_tints_only_the_foreground():
    gray = np.full((2, 2), 0.5, dtype=np.float32)
    mask = np.array([[255, 0], [0, 0]], dtype=np.uint8)
    picture = np.asarray(overlay(gray, mask, color=(255, 0, 0), alpha=0.5))
    assert picture.shape == (2, 2, 3)
    np.testing.assert_array_equal(picture[0, 1], [128, 128, 128])
    np.testing.assert_array_equal(picture[0, 0], [191, 64, 64])


def test_the_serving_path_gives_the_mask_and_features_of_the_whole_image_path():
    """segment_image (tile by tile, uint8 in) = binary_mask + summary_features of predict_probability."""
    rng = np.random.default_rng(5)
    u8 = rng.integers(0, 256, (300, 517), dtype=np.uint8)

    def run(batch):  # a deterministic stand-in for the U-Net: a smooth function of the tile
        return 1.0 / (1.0 + np.exp(-(batch - 0.5) * 6.0))

    gray = to_grayscale(Image.fromarray(u8))
    probability = predict_probability(gray, run, tile=96, margin=16, batch_size=1)
    expected_mask = binary_mask(probability, 0.45)
    expected = summary_features(gray, probability, 0.45)
    got = segment_image(u8, run, threshold=0.45, tile=96, margin=16)
    np.testing.assert_array_equal(got.mask, expected_mask)
    assert got.features.keys() == expected.keys()
    for name, value in expected.items():
        assert got.features[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    floats = segment_image(gray, run, threshold=0.45, tile=96, margin=16)
    np.testing.assert_array_equal(floats.mask, expected_mask)


def test_tiles_shared_with_a_helper_give_the_same_mask_and_features():
    """segment_image with a helper (app.core.spare: a second model on another thread, tiles from
    the other end) answers exactly as without one, and the helper's model did run tiles."""
    u8 = np.random.default_rng(6).integers(0, 256, (400, 517), dtype=np.uint8)

    def run(batch):
        time.sleep(0.002)  # a model call: the GIL is free meanwhile
        return 1.0 / (1.0 + np.exp(-(batch - 0.5) * 6.0))

    helper_calls = []

    def helper():  # made on the helper's thread: a model of its own
        def helper_run(batch):
            helper_calls.append(batch.shape)
            return run(batch)
        return helper_run

    nobody = Helper()
    alone = segment_image(u8, run, threshold=0.45, tile=64, margin=8, keep_probability=True, report=nobody)
    assert nobody.stopped is None and not nobody.steps  # without a helper, no helper thread
    report = Helper()
    helped = segment_image(u8, run, threshold=0.45, tile=64, margin=8, keep_probability=True,
                           helper=helper, report=report)
    assert report.stopped in ("done", "contended") and report.steps
    assert len(helper_calls) == len(report.steps) and helper_calls[0] == (1, 64, 64, 1)
    assert report.steps[0] == len(TileLayout(400, 517, 64, 8)) - 1  # from the last tile
    np.testing.assert_array_equal(helped.mask, alone.mask)
    np.testing.assert_array_equal(helped.probability, alone.probability)
    assert helped.features == alone.features
