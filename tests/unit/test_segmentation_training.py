"""The segmentation trainer's distillation and tile options (the light U-Net, 1.1.0), its int8
quantisation (1.2.0), its re-tiling (1.3.0) and the wider tile spacing of the served 1.4.0."""

from __future__ import annotations

import json
import shutil

import numpy as np
from PIL import Image

from app.core.runtime import TFLiteRunner
from app.tasks.segmentation.preprocess import (
    TileLayout,
    mask_from_label,
    predict_probability,
    to_grayscale,
)
from tests.support import REPO_ROOT, SHARED_DATA
from training.common import load_version as load
from training.common import sha256_file
from training.segmentation import distilled_targets, elastic, pin_batch_one

MODELS = REPO_ROOT / "models" / "segmentation"
MEMBRANE = SHARED_DATA / "membrane" / "train"


def test_elastic_keeps_hard_targets_hard_and_soft_targets_soft():
    rng = np.random.default_rng(0)
    image = rng.random((96, 96)).astype(np.float32)
    hard = (rng.random((96, 96)) > 0.7).astype(np.float32)
    _, warped_hard = elastic(image, hard, np.random.default_rng(1))
    assert set(np.unique(warped_hard)) <= {0.0, 1.0}
    soft = (0.5 * hard + 0.25).astype(np.float32)  # values 0.25 and 0.75: not a hard target
    _, warped_soft = elastic(image, soft, np.random.default_rng(1))
    assert len(np.unique(warped_soft)) > 2 and warped_soft.min() >= 0.25 - 1e-6
    assert warped_soft.max() <= 0.75 + 1e-6


def test_distilled_targets_blend_the_labels_with_the_teachers_tiled_probability():
    """The teacher runs the way the server runs it (its own tile and margin, from its metadata)."""
    image = to_grayscale(Image.open(MEMBRANE / "image" / "0.png"))[:256, :256]
    label = mask_from_label(np.asarray(Image.open(MEMBRANE / "label" / "0.png")))[:256, :256]
    params = json.loads((MODELS / "1.0.0" / "metadata.json").read_text())["params"]
    runner = TFLiteRunner(MODELS / "1.0.0" / "model.tflite", 1)
    soft = predict_probability(image, runner.run, tile=params["tile"], margin=params["margin"])
    teacher = load("segmentation", "1.0.0", REPO_ROOT / "models")
    for weight in (0.0, 0.3, 1.0):
        blended = distilled_targets(label[None], image[None], teacher, weight)[0]
        np.testing.assert_allclose(blended, (1 - weight) * label + weight * soft, atol=1e-6)
    # The teacher agrees with the labels on most pixels (it is 92 % accurate on held-out slices).
    assert np.mean((soft >= 0.5) == (label > 0.5)) > 0.85


def test_the_committed_light_unet_is_lighter_and_tiles_as_its_metadata_says():
    """1.1.0: 8 base filters (1.0.0: 16), distilled from 1.0.0, and its exported input is the
    tile its metadata declares (the server refuses a model whose input is not)."""
    light = json.loads((MODELS / "1.1.0" / "metadata.json").read_text())
    tile = light["params"]["tile"]
    assert light["params"]["base_filters"] == 8 and light["params"]["teacher"] == "1.0.0"
    assert TFLiteRunner(MODELS / "1.1.0" / "model.tflite", 1).input_shape[1:] == (tile, tile, 1)
    assert (MODELS / "1.1.0" / "model.tflite").stat().st_size < (MODELS / "1.0.0" / "model.tflite").stat().st_size / 3
    assert light["metrics"]["held_out_pixel_accuracy"] >= 0.92


def _graph(path):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    dtypes = {t["index"]: np.dtype(t["dtype"]) for t in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()  # noqa: SLF001 (the public API has no graph walk)
    return interpreter, dtypes, ops


def test_the_served_unet_is_1_0_0_quantised_to_full_integer_with_float_edges():
    """1.2.0 is 1.0.0 in int8 (weights per channel and activations, so XNNPACK runs it as QS8):
    every convolution takes int8 weights and int8 inputs, while the model's own input and output
    stay float32, so the serving code and the tiling are unchanged. Its probabilities stay close to
    1.0.0's on a validation slice."""
    meta = json.loads((MODELS / "1.2.0" / "metadata.json").read_text())
    parent = json.loads((MODELS / "1.0.0" / "metadata.json").read_text())
    assert meta["params"]["quantized_from"] == "1.0.0" and meta["artifact"]["format"] == "tflite-int8"
    assert (meta["params"]["tile"], meta["params"]["margin"]) == (parent["params"]["tile"], parent["params"]["margin"])
    interpreter, dtypes, ops = _graph(MODELS / "1.2.0" / "model.tflite")
    assert interpreter.get_input_details()[0]["dtype"] == np.float32
    assert interpreter.get_output_details()[0]["dtype"] == np.float32
    convs = [op for op in ops if op["op_name"] == "CONV_2D"]
    assert len(convs) == 19  # the U-Net's 18 3x3 convolutions and the 1x1 head, as in 1.0.0
    assert all(dtypes[op["inputs"][0]] == np.int8 and dtypes[op["inputs"][1]] == np.int8 for op in convs)
    assert (MODELS / "1.2.0" / "model.tflite").stat().st_size < (MODELS / "1.0.0" / "model.tflite").stat().st_size / 3

    gray = to_grayscale(Image.open(MEMBRANE / "image" / "22.png"))  # a validation slice
    int8, fp32 = load("segmentation", "1.2.0", REPO_ROOT / "models"), load("segmentation", "1.0.0", REPO_ROOT / "models")
    quantised, reference = int8.probability(gray), fp32.probability(gray)
    assert float(np.mean(np.abs(quantised - reference))) < 0.01
    assert np.mean((quantised >= 0.45) == (reference >= 0.45)) > 0.99


def test_a_model_pinned_to_one_tile_runs_a_batch_tile_by_tile():
    """1.2.0's graph takes exactly one tile (``pin_batch_one``); the runner slices any batch
    (training's evaluation sends 4 tiles a call) and gives what tile-by-tile calls give."""
    runner = TFLiteRunner(MODELS / "1.2.0" / "model.tflite", 1)
    assert runner.input_shape[0] == 1 and runner.max_batch == 1
    rng = np.random.default_rng(0)
    tiles = rng.random((3, *runner.input_shape[1:])).astype(np.float32)
    together = runner.run(tiles)
    assert together.shape == (3, *runner.output_shape[1:])
    for tile, out in zip(tiles, together, strict=True):
        np.testing.assert_array_equal(runner.run(tile[None])[0], out)
    assert TFLiteRunner(MODELS / "1.0.0" / "model.tflite", 1).max_batch > 1  # any batch: one call


def test_pinning_the_batch_keeps_the_model_and_frees_the_transposed_convolutions(tmp_path):
    """``pin_batch_one`` on a copy of 1.0.0: the batch becomes exactly 1, the run-time shape
    arithmetic (SHAPE -> STRIDED_SLICE -> PACK) that fed the TRANSPOSE_CONVs is gone, and the
    model computes what it computed."""
    import shutil

    pinned = tmp_path / "model.tflite"
    shutil.copy(MODELS / "1.0.0" / "model.tflite", pinned)
    _, _, before = _graph(MODELS / "1.0.0" / "model.tflite")
    dropped = pin_batch_one(pinned)
    interpreter, _, after = _graph(pinned)
    assert [int(d) for d in interpreter.get_input_details()[0]["shape_signature"]] == [1, 320, 320, 1]
    assert "SHAPE" in {op["op_name"] for op in before} and "SHAPE" not in {op["op_name"] for op in after}
    assert dropped > 0 and {op["op_name"] for op in after} <= {op["op_name"] for op in before}
    tile = np.random.default_rng(1).random((1, 320, 320, 1)).astype(np.float32)
    original = TFLiteRunner(MODELS / "1.0.0" / "model.tflite", 1).run(tile)
    np.testing.assert_allclose(TFLiteRunner(pinned, 1).run(tile), original, atol=1e-5)


def test_the_served_unet_is_1_2_0_pinned_to_smaller_tiles_and_rebuilds_to_the_byte(tmp_path):
    """1.3.0 is 1.2.0's graph and weights with every activation scaled from 320 px tiles to 272 px
    ones (``pin_batch_one(tile=272)``): rebuilding it from 1.2.0 gives the committed file, its input
    is the tile its metadata declares, and its masks of a validation slice are 1.2.0's but for a
    few pixels near the seams, which moved."""
    meta = json.loads((MODELS / "1.3.0" / "metadata.json").read_text())
    assert meta["params"]["retiled_from"] == "1.2.0"
    assert (meta["params"]["tile"], meta["params"]["margin"]) == (272, 16)
    rebuilt = tmp_path / "model.tflite"
    shutil.copyfile(MODELS / "1.2.0" / "model.tflite", rebuilt)
    pin_batch_one(rebuilt, tile=272)
    assert sha256_file(rebuilt) == sha256_file(MODELS / "1.3.0" / "model.tflite") == meta["artifact"]["sha256"]
    runner = TFLiteRunner(MODELS / "1.3.0" / "model.tflite", 1)
    assert runner.input_shape == runner.output_shape == (1, 272, 272, 1)
    _, _, ops = _graph(MODELS / "1.3.0" / "model.tflite")
    _, _, parent_ops = _graph(MODELS / "1.2.0" / "model.tflite")
    assert [op["op_name"] for op in ops] == [op["op_name"] for op in parent_ops]

    gray = to_grayscale(Image.open(MEMBRANE / "image" / "22.png"))
    small, large = load("segmentation", "1.3.0", REPO_ROOT / "models"), load("segmentation", "1.2.0", REPO_ROOT / "models")
    agree = np.mean((small.probability(gray) >= 0.45) == (large.probability(gray) >= 0.45))
    assert 0.99 < agree < 1.0


def test_the_served_unet_is_1_3_0_with_a_margin_of_8_the_same_on_slices_and_fewer_tiles_when_large():
    """1.4.0 is 1.3.0's model file with its tiles laid out at most 256 px apart (margin 8) instead
    of 240: a 512 x 512 slice is cut into the same four tiles, so its mask is 1.3.0's; a larger
    image needs fewer tiles, and the masks part only along the moved seams."""
    meta = json.loads((MODELS / "1.4.0" / "metadata.json").read_text())
    assert meta["params"]["retiled_from"] == "1.3.0"
    assert (meta["params"]["tile"], meta["params"]["margin"]) == (272, 8)
    assert sha256_file(MODELS / "1.4.0" / "model.tflite") == sha256_file(MODELS / "1.3.0" / "model.tflite") \
        == meta["artifact"]["sha256"]
    assert TileLayout(512, 512, 272, 8).placements() == TileLayout(512, 512, 272, 16).placements()
    assert (len(TileLayout(2048, 2048, 272, 8)), len(TileLayout(2048, 2048, 272, 16))) == (64, 81)

    wide, narrow = load("segmentation", "1.4.0", REPO_ROOT / "models"), load("segmentation", "1.3.0", REPO_ROOT / "models")
    assert (wide.tile, wide.margin, narrow.margin) == (272, 8, 16)
    gray = to_grayscale(Image.open(MEMBRANE / "image" / "22.png"))
    np.testing.assert_array_equal(wide.probability(gray), narrow.probability(gray))
    large = to_grayscale(Image.open(MEMBRANE / "image" / "22.png").resize((1000, 1000), Image.BILINEAR))
    assert (len(TileLayout(1000, 1000, 272, 8)), len(TileLayout(1000, 1000, 272, 16))) == (16, 25)
    agree = np.mean((wide.probability(large) >= 0.45) == (narrow.probability(large) >= 0.45))
    assert 0.97 < agree < 1.0
