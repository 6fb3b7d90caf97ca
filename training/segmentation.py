"""Train the membrane-segmentation U-Net (ISBI 2012 EM slices) and export it for LiteRT serving.

Reads top to bottom: arguments, data, model, fit, evaluate, export.

Data: ``membrane/train/{image,label}/N.png``, 30 labelled 512x512 slices. Slices 25-29 are the
held-out test set and are only ever used for the final evaluation; slices 22-24 are the validation
set (best checkpoint and decision threshold); 0-21 are trained on. Labels are 255 = cell interior,
0 = membrane; the model predicts P(membrane), so the served mask's 255 means membrane.

The U-Net (Ronneberger et al. 2015) is scaled down for CPU training: ``--base-filters`` (16 for
1.0.0, 8 for 1.1.0), 4 poolings, BatchNorm. It trains on random 128 px crops with flips, 90-degree
rotations, elastic deformation and intensity jitter, and is exported as an fp32 ``.tflite`` for the
fixed tile size the server then uses (``--tile``, 320: four overlapping tiles per 512 x 512 image;
a 576 px tile, one per 512 x 512 image, needs 2.9x the interpreter memory for 20 % fewer MACs).
``--retile-from`` trains nothing either: it pins a committed int8 version to another ``--tile`` and
``--margin`` (272 and 16: four tiles per 512 x 512 image, 0.72 of the pixels of 320 px tiles).
``--teacher`` distils from a committed version: the targets blend the labels with its
probabilities. ``--quantize-from`` trains nothing: it quantises a committed version to full integer
(int8 weights per channel and int8 activations, float32 input and output) with Google's
``ai-edge-quantizer``, calibrated on the server's own tiles of the training slices, which XNNPACK
runs as QS8 (dynamic-range int8 would keep the activations in float, which runs slower). Evaluation
runs the exported ``.tflite`` through the same overlap-tiling code as the server, and chooses the
threshold on the validation slices, whichever way the model was made.

    cd /work/main && .venv-train/bin/python -m training.segmentation  # ~35 min on 2 shared cores
    # 1.1.0, the light one: 8 filters, distilled from 1.0.0 (~31 min on one core)
    .venv-train/bin/python -m training.segmentation --base-filters 8 --epochs 45 --max-minutes 31 \
        --threads 1 --teacher 1.0.0 --teacher-weight 0.5 --dice-weight 0.5 --seed 7 --version 1.1.0
    # 1.2.0: 1.0.0 quantised to int8 (under a minute)
    .venv-train/bin/python -m training.segmentation --quantize-from 1.0.0 --threads 1 --version 1.2.0
    # 1.3.0: 1.2.0 pinned to 272 px tiles with a 16 px margin (seconds)
    .venv-train/bin/python -m training.segmentation --retile-from 1.2.0 --tile 272 --margin 16 \
        --threads 1 --version 1.3.0
    # 1.4.0, the served one: 1.3.0's file, its tiles laid out with an 8 px margin (seconds)
    .venv-train/bin/python -m training.segmentation --retile-from 1.3.0 --tile 272 --margin 8 \
        --threads 1 --version 1.4.0
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from PIL import Image
from scipy import ndimage

from app.tasks.segmentation.preprocess import (
    MARGIN,
    THRESHOLD,
    TILE,
    binary_mask,
    mask_from_label,
    overlay,
    predict_probability,
    segmentation_metrics,
    summary_features,
    to_grayscale,
)
from training.common import (
    MODELS_DIR,
    SHARED_DATA,
    Comparison,
    HeldOut,
    Stopwatch,
    export_tflite,
    model_dir,
    output_version,
    seed_everything,
    sha256_file,
    sha256_files,
    write_json,
    write_metadata,
)
from training.production import read_export

TRAIN_SLICES = list(range(0, 22))
VAL_SLICES = [22, 23, 24]
TEST_SLICES = [25, 26, 27, 28, 29]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=SHARED_DATA / "membrane")
    p.add_argument("--version", default=None, help="default: the next free version; an existing one is refused")
    p.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    p.add_argument("--production-data", type=Path, default=None,
                   help="refused for segmentation: /v1/feedback labels are strings, a U-Net needs masks")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--steps-per-epoch", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=128, help="training crop size (multiple of 16)")
    p.add_argument("--base-filters", type=int, default=16)
    p.add_argument("--depth", type=int, default=4, help="number of 2x poolings")
    p.add_argument("--tile", type=int, default=TILE,
                   help="the exported model's fixed input side; the server tiles with it (multiple of 16)")
    p.add_argument("--margin", type=int, default=MARGIN,
                   help="context kept around each tile's centre; tile - 2 * margin is the stride")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--teacher", default=None,
                   help="a committed segmentation version to distil from: the targets become "
                        "(1 - w) * label + w * the teacher's tiled probability on the training slices")
    p.add_argument("--teacher-weight", type=float, default=0.5, help="w above")
    p.add_argument("--quantize-from", default=None, metavar="VERSION",
                   help="train nothing: quantise this committed fp32 version ('latest': the newest) to "
                        "full-integer int8, calibrated on the server's tiles of the training slices, and "
                        "evaluate it as a new version; its tile and margin are the parent's")
    p.add_argument("--retile-from", default=None, metavar="VERSION",
                   help="train nothing: this committed int8 version's model, unchanged but for its input, "
                        "pinned to --tile px tiles and served with --margin; evaluated as a new version")
    p.add_argument("--dice-weight", type=float, default=0.25)
    p.add_argument("--max-minutes", type=float, default=34.0,
                   help="stop fitting after this long (a cap for a shared CPU; the epoch count is recorded)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    if args.quantize_from and (args.teacher or (args.tile, args.margin) != (TILE, MARGIN)):
        p.error("--quantize-from takes the parent's tile and margin and trains nothing: "
                "--tile, --margin and --teacher do not apply")
    if args.retile_from and (args.teacher or args.quantize_from):
        p.error("--retile-from trains and quantises nothing: --teacher and --quantize-from do not apply")
    return args


# --------------------------------------------------------------------------------------------- data
def load_slices(data: Path, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 [0, 1] and targets as float32 (1 = membrane), both (n, 512, 512)."""
    images = [to_grayscale(Image.open(data / "train" / "image" / f"{i}.png")) for i in ids]
    labels = [mask_from_label(np.asarray(Image.open(data / "train" / "label" / f"{i}.png"))) for i in ids]
    return np.stack(images), np.stack(labels)


def elastic(image: np.ndarray, target: np.ndarray, rng: np.random.Generator,
            alpha: float = 8.0, grid: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random displacement (coarse grid of offsets, bicubic upsampled), as in the U-Net paper.

    A hard (0/1) target stays hard; a soft one (distillation) is interpolated."""
    h, w = image.shape
    dy = ndimage.zoom(rng.normal(0, alpha, (grid, grid)), (h / grid, w / grid), order=3)[:h, :w]
    dx = ndimage.zoom(rng.normal(0, alpha, (grid, grid)), (h / grid, w / grid), order=3)[:h, :w]
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    coords = np.stack([yy + dy, xx + dx])
    warped = ndimage.map_coordinates(image, coords, order=1, mode="reflect")
    warped_target = ndimage.map_coordinates(target, coords, order=1, mode="reflect")
    if np.isin(target, (0.0, 1.0)).all():
        warped_target = warped_target >= 0.5
    return warped.astype(np.float32), warped_target.astype(np.float32)


def augment_crop(images: np.ndarray, targets: np.ndarray, crop: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One random crop of a random slice with flips, rot90, elastic warp and intensity jitter."""
    pad = 16  # warp a slightly larger window so the crop has no invented border
    k = int(rng.integers(len(images)))
    size = crop + 2 * pad
    y = int(rng.integers(0, images.shape[1] - size + 1))
    x = int(rng.integers(0, images.shape[2] - size + 1))
    img, tgt = images[k, y:y + size, x:x + size], targets[k, y:y + size, x:x + size]
    if rng.random() < 0.5:
        img, tgt = elastic(img, tgt, rng)
    img, tgt = img[pad:-pad, pad:-pad], tgt[pad:-pad, pad:-pad]
    turns = int(rng.integers(4))
    img, tgt = np.rot90(img, turns), np.rot90(tgt, turns)
    if rng.random() < 0.5:
        img, tgt = img[:, ::-1], tgt[:, ::-1]
    # intensity jitter: gamma, contrast, brightness, a little noise
    img = np.clip(img, 0.0, 1.0) ** rng.uniform(0.75, 1.35)
    img = (img - img.mean()) * rng.uniform(0.8, 1.2) + img.mean() + rng.uniform(-0.08, 0.08)
    if rng.random() < 0.3:
        img = img + rng.normal(0.0, 0.02, img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32), np.ascontiguousarray(tgt, dtype=np.float32)


def training_batches(images: np.ndarray, targets: np.ndarray, n: int, crop: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    pairs = [augment_crop(images, targets, crop, rng) for _ in range(n)]
    return (np.stack([p[0] for p in pairs])[..., None], np.stack([p[1] for p in pairs])[..., None])


# -------------------------------------------------------------------------------------------- model
def build_unet(input_shape: tuple[int | None, int | None, int], base: int, depth: int):
    import keras
    from keras import layers

    def conv_block(x, filters: int):
        for _ in range(2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization()(x)
            x = layers.Activation("relu")(x)
        return x

    inputs = keras.Input(shape=input_shape, name="image")
    x, skips = inputs, []
    for level in range(depth):
        x = conv_block(x, base * 2 ** level)
        skips.append(x)
        x = layers.MaxPooling2D(2)(x)
    x = conv_block(x, base * 2 ** depth)
    x = layers.Dropout(0.2)(x)
    for level in reversed(range(depth)):
        x = layers.Conv2DTranspose(base * 2 ** level, 2, strides=2, padding="same")(x)
        x = layers.Concatenate()([x, skips[level]])
        x = conv_block(x, base * 2 ** level)
    outputs = layers.Conv2D(1, 1, activation="sigmoid", name="membrane_probability")(x)
    return keras.Model(inputs, outputs, name="unet")


def distilled_targets(labels: np.ndarray, images: np.ndarray, teacher, weight: float) -> np.ndarray:
    """Blend the hard labels with a committed model's probabilities (``teacher``: the served model,
    ``training.common.load_version``, so it tiles as the server does) so a smaller student also learns
    where the teacher is unsure."""
    soft = np.stack([teacher.probability(img) for img in images])
    return ((1.0 - weight) * labels + weight * soft).astype(np.float32)


def bce_dice_loss(dice_weight: float):
    import keras
    from keras import ops

    bce = keras.losses.BinaryCrossentropy()

    def loss(y_true, y_pred):
        inter = ops.sum(y_true * y_pred, axis=(1, 2, 3))
        denom = ops.sum(y_true + y_pred, axis=(1, 2, 3))
        dice = 1.0 - (2.0 * inter + 1.0) / (denom + 1.0)
        return bce(y_true, y_pred) + dice_weight * ops.mean(dice)

    return loss


def keras_runner(model):
    return lambda batch: np.asarray(model(batch, training=False))


def evaluate(run, images: np.ndarray, targets: np.ndarray, threshold: float, *, tile: int = TILE,
             margin: int = MARGIN) -> tuple[dict, list[np.ndarray]]:
    """Tiled inference over whole slices (as the server does) and metrics over all their pixels."""
    probs = [predict_probability(img, run, tile=tile, margin=margin) for img in images]
    pred = np.stack([binary_mask(p, threshold) > 0 for p in probs])
    metrics = segmentation_metrics(pred, targets > 0.5)
    eps = 1e-6
    stacked = np.clip(np.stack(probs), eps, 1 - eps)
    metrics["bce"] = float(-np.mean(targets * np.log(stacked) + (1 - targets) * np.log(1 - stacked)))
    return metrics, probs


def best_threshold(probs: list[np.ndarray], targets: np.ndarray) -> float:
    """The threshold (0.30..0.70) with the best validation pixel accuracy."""
    candidates = np.round(np.arange(0.30, 0.701, 0.05), 2)
    stacked = np.stack(probs)
    accs = [float(np.mean((stacked >= t) == (targets > 0.5))) for t in candidates]
    return float(candidates[int(np.argmax(accs))])


# ------------------------------------------------------------------------------------------- report
def plot_history(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train loss (BCE + dice, crops)")
    ax1.plot(epochs, [h["val_bce"] for h in history], label="validation BCE (slices 22-24, tiled)")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("loss"), ax1.legend(), ax1.grid(alpha=0.3)
    ax2.plot(epochs, [h["val_pixel_accuracy"] for h in history], label="validation pixel accuracy")
    ax2.plot(epochs, [h["val_iou_membrane"] for h in history], label="validation IoU membrane")
    ax2.set_xlabel("epoch"), ax2.legend(), ax2.grid(alpha=0.3)
    fig.suptitle("U-Net membrane segmentation: training curves")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_overlays(images: np.ndarray, targets: np.ndarray, probs: list[np.ndarray], ids: list[int],
                  threshold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(3, len(images))
    fig, axes = plt.subplots(n, 3, figsize=(12, 4 * n))
    for row in range(n):
        mask = binary_mask(probs[row], threshold)
        errors = (mask > 0) != (targets[row] > 0.5)
        panels = [(images[row], "gray", f"slice {ids[row]} (held out)"),
                  (np.asarray(overlay(images[row], mask)), None, "predicted membrane (red)"),
                  (errors, "magma", f"errors: {errors.mean():.3f} of pixels")]
        for ax, (img, cmap, title) in zip(axes[row], panels, strict=True):
            ax.imshow(img, cmap=cmap), ax.set_title(title), ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=55)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- main
def main() -> None:
    args = parse_args()
    if args.production_data is not None:
        examples = read_export(args.production_data, "segmentation", labelled_only=False)
        raise SystemExit(
            f"--production-data: the export has {len(examples)} segmentation input(s), but a U-Net trains "
            "on per-pixel masks and /v1/feedback records one string label per instance, so there is "
            "nothing to train on. Annotate the exported images (e.g. in CVAT) and add them to the "
            "membrane data instead.")
    if "latest" in (args.quantize_from, args.retile_from):
        from training.common import existing_versions

        latest = existing_versions("segmentation", args.models_dir)[-1]
        args.quantize_from = latest if args.quantize_from == "latest" else args.quantize_from
        args.retile_from = latest if args.retile_from == "latest" else args.retile_from
    args.version = output_version("segmentation", args.version, args.models_dir)
    if args.quantize_from:
        quantized(args)
        return
    if args.retile_from:
        retiled(args)
        return
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(args.threads)
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    import keras
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    seed_everything(args.seed)
    rng = np.random.default_rng(args.seed)
    clock = Stopwatch()

    train_x, train_y = load_slices(args.data, TRAIN_SLICES)
    val_x, val_y = load_slices(args.data, VAL_SLICES)
    if args.teacher:
        from training.common import load_version

        teacher = load_version("segmentation", args.teacher, args.models_dir)
        train_y = distilled_targets(train_y, train_x, teacher, args.teacher_weight)
        print(f"distilling from {teacher.path} (weight {args.teacher_weight})", flush=True)
    print(f"train slices {TRAIN_SLICES[0]}-{TRAIN_SLICES[-1]}, validation {VAL_SLICES}, "
          f"held-out test {TEST_SLICES} (not loaded until the end); membrane fraction "
          f"{train_y.mean():.3f}", flush=True)

    model = build_unet((None, None, 1), args.base_filters, args.depth)
    print(f"U-Net: {model.count_params():,} parameters", flush=True)
    total_steps = args.epochs * args.steps_per_epoch
    schedule = keras.optimizers.schedules.CosineDecay(args.lr, decay_steps=total_steps, alpha=0.05)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=bce_dice_loss(args.dice_weight))

    tiling = {"tile": args.tile, "margin": args.margin}
    history: list[dict] = []
    best = {"val_bce": np.inf, "epoch": 0, "weights": None}
    fit_clock = Stopwatch()
    for epoch in range(1, args.epochs + 1):
        started = time.perf_counter()
        x, y = training_batches(train_x, train_y, args.steps_per_epoch * args.batch_size, args.crop, rng)
        fit = model.fit(x, y, batch_size=args.batch_size, epochs=1, verbose=0, shuffle=False)
        val, _ = evaluate(keras_runner(model), val_x, val_y, THRESHOLD, **tiling)
        history.append({"epoch": epoch, "train_loss": float(fit.history["loss"][-1]),
                        "val_bce": val["bce"], "val_pixel_accuracy": val["pixel_accuracy"],
                        "val_iou_membrane": val["iou_membrane"],
                        "seconds": round(time.perf_counter() - started, 1)})
        improved = val["bce"] < best["val_bce"]
        if improved:
            best = {"val_bce": val["bce"], "epoch": epoch, "weights": model.get_weights()}
        print(f"epoch {epoch:3d}/{args.epochs} loss {history[-1]['train_loss']:.4f} "
              f"val bce {val['bce']:.4f} acc {val['pixel_accuracy']:.4f} "
              f"IoU(membrane) {val['iou_membrane']:.3f} [{history[-1]['seconds']:.0f}s, "
              f"{fit_clock.seconds / 60:.1f} min]{' *' if improved else ''}", flush=True)
        if fit_clock.seconds / 60 > args.max_minutes:
            print(f"stopping: past the {args.max_minutes} min budget", flush=True)
            break
    fit_seconds = fit_clock.seconds
    model.set_weights(best["weights"])
    print(f"best validation BCE {best['val_bce']:.4f} at epoch {best['epoch']}", flush=True)

    # Export for the fixed tile size the server uses (the weights do not depend on the input size).
    out = model_dir("segmentation", args.version, args.models_dir)
    tiled = build_unet((args.tile, args.tile, 1), args.base_filters, args.depth)
    tiled.set_weights(model.get_weights())
    sample = np.pad(val_x[:2], ((0, 0), (0, max(0, args.tile - val_x.shape[1])),
                                (0, max(0, args.tile - val_x.shape[2]))), mode="reflect")
    export = export_tflite(tiled, out / "model.tflite", sample[:, :args.tile, :args.tile, None])

    finish(args, out, clock, tiling=tiling,
           description=f"U-Net ({args.base_filters} base filters, {args.depth} poolings, BatchNorm) for "
                       "membrane segmentation of ISBI 2012 serial-section TEM slices; overlap-tiled "
                       f"inference ({args.tile} px tiles) for any image size"
                       + (f", distilled from {args.teacher}." if args.teacher else "."),
           artifact={"file": "model.tflite", "format": "tflite-fp32", **export},
           params={"tile": args.tile, "margin": args.margin, "stride": args.tile - 2 * args.margin,
                   "teacher": args.teacher,
                   "teacher_weight": args.teacher_weight if args.teacher else None,
                   "tiling": "reflect-pad, overlapping tiles, keep each tile's centre (overlap-tile)",
                   "base_filters": args.base_filters, "depth": args.depth, "crop": args.crop,
                   "batch_size": args.batch_size, "steps_per_epoch": args.steps_per_epoch, "lr": args.lr,
                   "loss": f"BCE + {args.dice_weight} * soft Dice", "augmentation":
                   "random crops, rot90, flips, elastic (p=0.5), gamma/contrast/brightness, noise (p=0.3)"},
           training={"seed": args.seed, "epochs": len(history), "epochs_planned": args.epochs,
                     "best_epoch": best["epoch"], "fit_duration_s": fit_seconds},
           history=history, best_epoch=best["epoch"])


def committed_parent(args: argparse.Namespace, flag: str, version: str, fmt: str,
                     refusal: str) -> tuple[Path, dict[str, Any]]:
    """The directory and metadata of the committed version ``flag`` names; refused (``refusal``
    after the model's format) unless its model is ``fmt``."""
    parent_dir = Path(args.models_dir) / "segmentation" / version
    parent = json.loads((parent_dir / "metadata.json").read_text())
    if parent["artifact"]["format"] != fmt:
        raise SystemExit(f"{flag} {version}: its model is {parent['artifact']['format']}{refusal}")
    return parent_dir, parent


def quantized(args: argparse.Namespace) -> None:
    """``--quantize-from``: a committed version as full-integer int8, then :func:`finish` as for a
    trained one. Calibration sees only the training slices, cut into the tiles the server cuts."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import qtyping, quantizer, recipe
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    from app.tasks.segmentation.preprocess import tile_image

    clock = Stopwatch()
    parent_dir, parent = committed_parent(args, "--quantize-from", args.quantize_from, "tflite-fp32",
                                          ", not fp32; quantise the fp32 version it was made from")
    tiling = {"tile": int(parent["params"]["tile"]), "margin": int(parent["params"]["margin"])}
    train_x, _ = load_slices(args.data, TRAIN_SLICES)
    calibration = np.concatenate([tile_image(image, **tiling)[0] for image in train_x])[..., None]
    signatures = Interpreter(model_path=str(parent_dir / "model.tflite")).get_signature_list()
    (signature, spec), = signatures.items()
    (input_name,) = spec["inputs"]
    print(f"quantising {parent_dir} to int8: {len(calibration)} calibration tiles of {tiling['tile']} px "
          f"from training slices {TRAIN_SLICES[0]}-{TRAIN_SLICES[-1]}", flush=True)

    engine = quantizer.Quantizer(str(parent_dir / "model.tflite"))
    engine.load_quantization_recipe(recipe.static_wi8_ai8())
    for edge in (qtyping.TFLOperationName.INPUT, qtyping.TFLOperationName.OUTPUT):  # float32 in and out
        engine.update_quantization_recipe(regex=".*", operation_name=edge, algorithm_key=AlgorithmName.NO_QUANTIZE)
    ranges = engine.calibrate({signature: [{input_name: tile[None]} for tile in calibration]},
                              num_threads=args.threads)
    out = model_dir("segmentation", args.version, args.models_dir)
    engine.quantize(ranges).export_model(str(out / "model.tflite"))
    dropped = pin_batch_one(out / "model.tflite")

    from app.core.runtime import TFLiteRunner

    val_x, _ = load_slices(args.data, VAL_SLICES)  # how far int8 strays from its parent
    int8, fp32 = (TFLiteRunner(path, num_threads=args.threads)
                  for path in (out / "model.tflite", parent_dir / "model.tflite"))
    drift = max(float(np.max(np.abs(predict_probability(x, int8.run, **tiling)
                                    - predict_probability(x, fp32.run, **tiling)))) for x in val_x)
    path = out / "model.tflite"
    print(f"exported {path} ({path.stat().st_size / 1e6:.2f} MB, batch pinned to one tile: {dropped} shape "
          f"operators dropped); int8 vs {args.quantize_from} max |diff| {drift:.3f} on the validation slices",
          flush=True)
    finish(args, out, clock, tiling=tiling,
           description=f"{parent['description'].rstrip('.')}; {args.quantize_from} quantised to full "
                       "integer (int8 weights and activations, float32 input and output).",
           artifact={"file": "model.tflite", "format": "tflite-int8", "bytes": path.stat().st_size,
                     "sha256": sha256_file(path), "max_abs_diff_from_parent_validation": drift},
           params={**{k: v for k, v in parent["params"].items() if k != "threshold"},
                   "quantized_from": args.quantize_from,
                   "quantization": {"tool": f"ai-edge-quantizer {importlib.metadata.version('ai-edge-quantizer')}",
                                    "recipe": "static_wi8_ai8",
                                    "weights": "int8 per channel", "activations": "int8",
                                    "input_output": "float32 (QUANTIZE / DEQUANTIZE at the edges)",
                                    "batch": "1 tile per call (pin_batch_one: constant TRANSPOSE_CONV "
                                             "output shapes, so XNNPACK runs every operator)",
                                    "calibration": f"{len(calibration)} tiles: training slices "
                                                   f"{TRAIN_SLICES[0]}-{TRAIN_SLICES[-1]}, the server's tiling",
                                    "algorithm": "min-max"}},
           training={"quantized_from": args.quantize_from, "seed": args.seed,
                     "parent_training": parent.get("training", {})})


def retiled(args: argparse.Namespace) -> None:
    """``--retile-from``: a committed int8 version, its weights and quantisation unchanged, pinned to
    another tile size (``pin_batch_one``), then :func:`finish` as for a trained one. A 512 x 512
    slice is four tiles either way; 272 px tiles with a margin of 16 are 0.72 of the pixels of
    320 px tiles with a margin of 32, and the interpreter's memory shrinks with the tile."""
    import shutil

    clock = Stopwatch()
    parent_dir, parent = committed_parent(args, "--retile-from", args.retile_from, "tflite-int8",
                                          "; only a full-integer version has its batch and tile pinned")
    out = model_dir("segmentation", args.version, args.models_dir)
    path = out / "model.tflite"
    shutil.copyfile(parent_dir / "model.tflite", path)
    pin_batch_one(path, tile=args.tile)
    tiling = {"tile": args.tile, "margin": args.margin}
    print(f"{parent_dir} pinned to {args.tile} px tiles, margin {args.margin}", flush=True)
    change = (f"pinned to {args.tile} px tiles with a margin of {args.margin} (the same weights)"
              if args.tile != int(parent["params"]["tile"]) else
              f"with a margin of {args.margin} (the same model file): fewer tiles for some image sizes")
    finish(args, out, clock, tiling=tiling,
           description=f"{parent['description'].rstrip('.')}; {args.retile_from} {change}.",
           artifact={"file": "model.tflite", "format": "tflite-int8", "bytes": path.stat().st_size,
                     "sha256": sha256_file(path)},
           params={**{k: v for k, v in parent["params"].items() if k != "threshold"}, **tiling,
                   "stride": args.tile - 2 * args.margin, "retiled_from": args.retile_from,
                   "tiling": "overlapping tiles inside the image, seams in the middle of each overlap "
                             "(overlap-tile)"},
           training={"retiled_from": args.retile_from, "parent_training": parent.get("training", {})})


def pin_batch_one(path: Path, tile: int | None = None) -> int:
    """Rewrite ``path`` for batches of one tile, the way the server calls it: the input's batch
    becomes 1 and each transposed convolution gets a constant output shape instead of one computed
    at run time (SHAPE -> STRIDED_SLICE -> PACK from the input's batch of -1). XNNPACK only takes a
    TRANSPOSE_CONV whose output shape is constant; otherwise the graph splits around all four and
    they run on LiteRT's reference kernels (1.0.0 in int8: 41 -> 29 ms per 320 px tile). With
    ``tile``, every activation's height and width is scaled from the input's side to ``tile`` first
    (the network is fully convolutional; the side must stay divisible by 2 ** depth). Uses LiteRT's
    own flatbuffer tools; returns how many operators were dropped as dead."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    (graph,) = model.subgraphs
    if tile is not None:
        rows, cols = (int(d) for d in graph.tensors[graph.inputs[0]].shape[1:3])
        for tensor in graph.tensors:
            constant = model.buffers[tensor.buffer].data is not None
            if constant or tensor.shape is None or len(tensor.shape) != 4:
                continue
            height, width = (int(d) for d in tensor.shape[1:3])
            if (height * tile) % rows or (width * tile) % cols:
                raise ValueError(f"a {height}x{width} activation does not scale from {rows}x{cols} to {tile} px")
            tensor.shape = np.array([tensor.shape[0], height * tile // rows, width * tile // cols,
                                     tensor.shape[3]], dtype=np.int32)
            tensor.shapeSignature = None  # static: exactly ``shape``
    for index in [*graph.inputs, *graph.outputs]:
        tensor = graph.tensors[index]
        tensor.shape = np.array([1, *list(tensor.shape)[1:]], dtype=np.int32)
        tensor.shapeSignature = None  # static: exactly ``shape``
    for op in graph.operators:
        if flatbuffer_utils.opcode_to_name(model, op.opcodeIndex) != "TRANSPOSE_CONV":
            continue
        out = graph.tensors[op.outputs[0]]
        if any(int(d) <= 0 for d in list(out.shape)[1:]):
            raise ValueError(f"a TRANSPOSE_CONV output of shape {list(out.shape)}: the tile must be fixed")
        data = np.frombuffer(np.array([1, *list(out.shape)[1:]], dtype=np.int32).tobytes(), dtype=np.uint8)
        pinned = graph.tensors[op.inputs[0]]
        shared = sum(int(t.buffer) == int(pinned.buffer) for t in graph.tensors) > 1
        if model.buffers[pinned.buffer].data is not None and not shared:  # pinned before: its own constant
            model.buffers[pinned.buffer].data = data
            continue
        buffer = schema.BufferT()
        buffer.data = data
        model.buffers.append(buffer)
        shape = schema.TensorT()
        shape.shape, shape.type, shape.buffer = np.array([4], dtype=np.int32), schema.TensorType.INT32, len(model.buffers) - 1
        name = graph.tensors[op.inputs[0]].name
        shape.name = (name.decode() if isinstance(name, bytes) else name) + "/batch_one"
        graph.tensors.append(shape)
        op.inputs[0] = len(graph.tensors) - 1
    before = len(graph.operators)
    while True:  # drop what computed the old shapes: operators whose outputs nobody reads any more
        read = {int(i) for op in graph.operators for i in op.inputs} | {int(o) for o in graph.outputs}
        live = [op for op in graph.operators if any(int(o) in read for o in op.outputs)]
        if len(live) == len(graph.operators):
            break
        graph.operators = live
    flatbuffer_utils.write_model(model, str(path))
    return before - len(graph.operators)


def finish(args: argparse.Namespace, out: Path, clock: Stopwatch, *, tiling: dict[str, int],
           description: str, artifact: dict, params: dict, training: dict,
           history: list[dict] | None = None, best_epoch: int | None = None) -> None:
    """Evaluate ``out/model.tflite`` as the server runs it, choose the threshold on validation, score
    the held-out slices once, and write the drift reference, the report and the metadata."""
    val_x, val_y = load_slices(args.data, VAL_SLICES)
    from app.core.runtime import TFLiteRunner

    runner = TFLiteRunner(out / "model.tflite", num_threads=args.threads)
    val, val_probs = evaluate(runner.run, val_x, val_y, THRESHOLD, **tiling)
    threshold = best_threshold(val_probs, val_y)
    val, _ = evaluate(runner.run, val_x, val_y, threshold, **tiling)
    print(f"validation (LiteRT, tiled) threshold {threshold}: {val}", flush=True)

    test_x, test_y = load_slices(args.data, TEST_SLICES)
    test, test_probs = evaluate(runner.run, test_x, test_y, threshold, **tiling)
    per_slice = {str(i): segmentation_metrics(binary_mask(p, threshold) > 0, t > 0.5)["pixel_accuracy"]
                 for i, p, t in zip(TEST_SLICES, test_probs, test_y, strict=True)}
    print(f"HELD-OUT slices 25-29 (LiteRT, tiled) threshold {threshold}: {test}", flush=True)

    # Drift reference: held-out slices 25-29 plus the 30 unlabelled test/ slices, none trained on.
    ref_paths = [args.data / "train" / "image" / f"{i}.png" for i in TEST_SLICES] + \
        sorted((args.data / "test").glob("*.png"), key=lambda p: int(p.stem))
    features: dict[str, list[float]] = {}
    for path in ref_paths:
        gray = to_grayscale(Image.open(path))
        for name, value in summary_features(gray, predict_probability(gray, runner.run, **tiling),
                                              threshold).items():
            features.setdefault(name, []).append(value)
    from app.monitoring.reference import build_reference

    reference = build_reference(features, ["mask"] * len(ref_paths), ["mask"], seed=args.seed,
                                source="membrane train/image/25-29.png (held out) + test/0-29.png")
    write_json(out / "reference.json", reference)

    report = out / "report"
    if history:
        plot_history(history, report / "loss_curves.png")
    plot_overlays(test_x, test_y, test_probs, TEST_SLICES, threshold, report / "overlays.png")
    metrics = {"held_out_test": {"slices": TEST_SLICES, **test, "pixel_accuracy_per_slice": per_slice},
               "validation": {"slices": VAL_SLICES, **val},
               "threshold": threshold, "evaluation": "exported .tflite through the server's overlap-tiling",
               "best_epoch": best_epoch, "history": history or []}
    write_json(report / "metrics.json", metrics)

    data_files = [args.data / "train" / kind / f"{i}.png" for kind in ("image", "label") for i in range(30)]
    write_metadata(
        out,
        name="segmentation",
        task="segmentation",
        version=args.version,
        description=description,
        artifact=artifact,
        data={"path": "membrane/train/{image,label}/0..29.png", "sha256": sha256_files(data_files),
              "train_slices": TRAIN_SLICES, "validation_slices": VAL_SLICES, "test_slices": TEST_SLICES},
        input={"name": "image", "type": "image/png, image/jpeg or image/tiff; grayscale or RGB "
               "(converted to luma)", "normalisation": "grayscale / 255 -> float32 [0, 1]",
               "tile_shape": [tiling["tile"], tiling["tile"], 1], "max_side": 4096},
        output={"type": "binary mask PNG with the input's width and height",
                "foreground": "membrane", "foreground_value": 255, "background_value": 0,
                "source_label_convention": "dataset labels: 255 = cell interior, 0 = membrane; the "
                                           "served mask is inverted so that 255 = membrane"},
        labels=["background (cell interior)", "membrane"],
        metrics={"held_out_pixel_accuracy": test["pixel_accuracy"],
                 "held_out_pixel_error": test["pixel_error"],
                 "held_out_iou_membrane": test["iou_membrane"], "held_out_iou_interior": test["iou_interior"],
                 "held_out_mean_iou": test["mean_iou"], "held_out_dice_membrane": test["dice_membrane"],
                 "validation_pixel_accuracy": val["pixel_accuracy"]},
        params={**params, "threshold": threshold},
        training={**training, "duration_s": clock.seconds},
    )
    print(f"done in {clock.seconds / 60:.1f} min -> {out}", flush=True)


# ---- the evaluation gate (training.compare) ---------------------------------------------------
def compare_sets(baseline: Any, candidate: Any, production: Path | None, limit: int) -> list[HeldOut]:
    """Membrane slices 25-29: pixel accuracy of each version (an export has no masks to score)."""
    if production is not None:
        print("segmentation: production data has no masks; scored on the held-out slices only")
    base = SHARED_DATA / "membrane" / "train"
    slices = [(np.asarray(Image.open(base / "image" / f"{i}.png").convert("L")),
               np.asarray(Image.open(base / "label" / f"{i}.png").convert("L")) == 0)
              for i in TEST_SLICES[:limit or None]]
    return [HeldOut("membrane slices 25-29 (held out)", len(slices), lambda m: pixel_accuracy(m, slices))]


def pixel_accuracy(model: Any, slices: list) -> float:
    correct = total = 0
    for gray, membrane in slices:
        mask = model.segment(gray, model.threshold).mask > 0
        correct += int((mask == membrane).sum())
        total += membrane.size
    return correct / total


# A drop a bit above the noise of the 1.3 M held-out pixels.
COMPARISON = Comparison("pixel_accuracy", 0.005, compare_sets)


if __name__ == "__main__":
    main()
