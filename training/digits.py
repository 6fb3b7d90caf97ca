"""Train the digits CNN on handwriting as people send it and export ``models/digits/<version>/``.

    .venv-train/bin/python -m training.digits [--data ../shared/data/mnist/mnist.npz] [--epochs 10]
        [--pendigits ../shared/data/pendigits/pendigits.tra] [--production-data export.zip
        [--production-repeat 4]] [--version 1.1.0] [--models-dir models]

Reads top to bottom: arguments, data, model, fit, calibrate, evaluate, export. Every image, training
and test, first goes through ``app.tasks.digits.preprocess`` (the function serving uses), so the
model sees at training time exactly what it will see behind the API.

Training data (``training/digit_data.py`` makes the raw images):
- MNIST training digits as drawn, and half of them once more, redrawn as a pen, marker, scan or
  photo would (stroke width, binarised or anti-aliased ink, blur, elastic distortion, rotation, shear, tight box
  or margins, either polarity, paper level and noise);
- MNIST training digits counted into 8x8 grids of 4x4 blocks and enlarged again (low resolution);
- pendigits training trajectories (``pendigits.tra``, 30 writers) drawn as canvas strokes, and drawn
  with a thick pen and counted into 8x8 grids;
- non-digits (letters and symbols in the DejaVu fonts, synthetic textures), with the uniform
  distribution as their target (outlier exposure), so the model spreads its probability on them.

Validation: the last 5,000 MNIST training digits (as drawn, redrawn and low resolution) and the last
10 % of the pendigits training rows, drawn; the temperature that divides the logits before the
softmax is fitted on it (negative log-likelihood) and folded into the exported model. The 10,000
MNIST test images are used once, at the end, for the report and the drift reference.

Model: two double-conv blocks with batch norm and light dropout (Conv32-Conv32-Pool-Conv64-Conv96-
Pool-Dense256), light on-the-fly augmentation (small rotations, shifts, zoom) and Adam under a cosine
learning-rate schedule.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.monitoring.reference import build_reference
from app.tasks.digits.preprocess import (
    PREPROCESSING_PARAMS,
    SIZE,
    normalize_batch,
    normalize_gray,
    summary_features,
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
    write_json,
    write_metadata,
)
from training.common import expected_calibration_error as calibration_error
from training.digit_data import (
    EVAL_FONTS,
    EVAL_LETTERS,
    TRAIN_FONTS,
    TRAIN_LETTERS,
    augment_digit,
    low_resolution_digit,
    low_resolution_trajectory,
    non_digit,
    prepared,
    random_trajectory_render,
    read_pendigits,
)
from training.production import read_export, summary

LABELS = [str(d) for d in range(10)]
ARCHITECTURE = ("Conv32-Conv32-Pool-Conv64-Conv96-Pool-Dense256 (3x3 valid convs, batch norm, dropout "
                "0.05/0.1/0.25), logits divided by a temperature before the softmax")


def production_digits(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """The export's labelled digits through the serving decode and preprocessing (what the model
    saw when it answered), as training arrays; unreadable or blank images are skipped and counted."""
    from app.core.codecs.image import load_image, open_image
    from app.core.errors import ProblemError
    from app.core.limits import MAX_REQUEST_PIXELS
    from app.tasks.digits.preprocess import DigitInputError, prepare_image

    examples = read_export(path, "digits")
    arrays, labels, skipped = [], [], 0
    for example in examples:
        if example.label not in LABELS:
            skipped += 1
            continue
        try:
            image = load_image(open_image(example.data, example.file, max_pixels=MAX_REQUEST_PIXELS),
                               example.file)
            arrays.append(prepare_image(image, example.file).array)
        except (ProblemError, DigitInputError):
            skipped += 1
            continue
        labels.append(LABELS.index(example.label))
    x = np.stack(arrays)[..., None].astype(np.float32) if arrays else np.zeros((0, SIZE, SIZE, 1), np.float32)
    return x, np.asarray(labels, dtype=np.int64), {**summary(examples, len(arrays), path), "skipped": skipped}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "mnist" / "mnist.npz")
    parser.add_argument("--version", default=None, help="default: the next free version; an existing "
                        "one is refused")
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    parser.add_argument("--production-data", type=Path, default=None,
                        help="a /v1/monitoring/dataset export: its labelled digits join the training split")
    parser.add_argument("--production-repeat", type=int, default=1,
                        help="times each production digit is repeated in the training split")
    parser.add_argument("--pendigits", type=Path, default=SHARED_DATA / "pendigits" / "pendigits.tra",
                        help="pen trajectories of the training writers (never pendigits.tes)")
    parser.add_argument("--redrawn", type=float, default=0.5,
                        help="share of MNIST training digits added once more, redrawn")
    parser.add_argument("--low-resolution", type=int, default=6000, help="8x8-grid digits added")
    parser.add_argument("--pen-renderings", type=int, default=2, help="renderings per pendigits row")
    parser.add_argument("--pen-low-resolution", type=int, default=1,
                        help="8x8-grid renderings per pendigits row")
    parser.add_argument("--non-digits", type=int, default=8000, help="outlier-exposure images")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--validation", type=int, default=5000, help="last N training images")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--limit", type=int, default=0, help="use only N training images (smoke runs)")
    return parser.parse_args()


def build_model(keras):  # noqa: ANN001, ANN201 - keras is imported lazily
    layers = keras.layers

    def conv(x, filters):  # noqa: ANN001, ANN202
        x = layers.Conv2D(filters, 3, use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        return layers.Activation("relu")(x)

    inputs = keras.Input((SIZE, SIZE, 1), name="digit")
    x = conv(inputs, 32)  # 26x26
    x = conv(x, 32)  # 24x24
    x = layers.MaxPooling2D()(x)  # 12x12
    x = layers.Dropout(0.05)(x)
    x = conv(x, 64)  # 10x10
    x = conv(x, 96)  # 8x8
    x = layers.MaxPooling2D()(x)  # 4x4
    x = layers.Dropout(0.1)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(256, use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    x = layers.Dropout(0.25)(x)
    logits = layers.Dense(10, name="logits")(x)
    return keras.Model(inputs, logits, name="digits_cnn")


def calibrated(keras, model, temperature: float):  # noqa: ANN001, ANN201
    """The served model: logits divided by the temperature, then the softmax (one graph, so the
    .tflite answers calibrated probabilities with no code in serving)."""
    layers = keras.layers
    scaled = layers.Rescaling(1.0 / temperature, name="temperature")(model.output)
    outputs = layers.Softmax(name="probabilities")(scaled)
    return keras.Model(model.input, outputs, name="digits_cnn_calibrated")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    p = softmax(logits / temperature)[np.arange(len(y)), y]
    return float(-np.mean(np.log(np.clip(p, 1e-12, 1.0))))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising the validation negative log-likelihood (a 1-D search)."""
    from scipy.optimize import minimize_scalar

    result = minimize_scalar(lambda log_t: nll(logits, y, float(np.exp(log_t))), bounds=(-3, 3),
                             method="bounded")
    return float(np.exp(result.x))


def expected_calibration_error(probabilities: np.ndarray, y: np.ndarray) -> float:
    """ECE of class probabilities against the true labels (training.common)."""
    return calibration_error(probabilities.max(axis=1), probabilities.argmax(axis=1) == y)


def make_set(images, make, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """``make(image, rng)`` for each image, through the serving preprocessing; (arrays, kept index)."""
    arrays, kept = [], []
    for i, image in enumerate(images):
        array = prepared(make(image, rng))
        if array is not None:
            arrays.append(array)
            kept.append(i)
    return np.stack(arrays)[..., None].astype(np.float32), np.asarray(kept, dtype=np.int64)


def augmenter(keras, seed: int):  # noqa: ANN001, ANN201
    """Small rotations (+-10 degrees), shifts (+-2 px) and zoom (+-10 %): real handwriting varies
    this much even after centring, and the centring itself is only exact to a pixel."""
    layers = keras.layers
    return keras.Sequential([
        layers.RandomRotation(10 / 360, fill_mode="constant", seed=seed),
        layers.RandomZoom(0.1, fill_mode="constant", seed=seed + 1),
        layers.RandomTranslation(2 / SIZE, 2 / SIZE, fill_mode="constant", seed=seed + 2),
    ], name="augment")


def plot_history(history: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(history["loss"]) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, history["loss"], label="train (augmented)")
    ax_loss.plot(epochs, history["val_loss"], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss", yscale="log")
    ax_acc.plot(epochs, history["accuracy"], label="train (augmented)")
    ax_acc.plot(epochs, history["val_accuracy"], label="validation")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (argmax; non-digits count as errors in training)",
               title="Accuracy", ylim=(0.8, 1.0))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_confusion(confusion: np.ndarray, accuracy: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    shown = np.where(np.eye(10, dtype=bool), 0, confusion)  # errors only, so they are visible
    im = ax.imshow(shown, cmap="Reds")
    for i in range(10):
        for j in range(10):
            if confusion[i, j]:
                ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7,
                        color="black" if i != j else "tab:blue")
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true",
           title=f"MNIST test set confusion (accuracy {accuracy:.2%})")
    fig.colorbar(im, ax=ax, label="errors")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_errors(images: np.ndarray, true: np.ndarray, pred: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(len(images), 40)
    fig, axes = plt.subplots(4, 10, figsize=(12, 5.4))
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k < n:
            ax.imshow(images[k], cmap="gray")
            ax.set_title(f"{true[k]} -> {pred[k]}", fontsize=8)
    fig.suptitle("Misclassified test digits (true -> predicted), after preprocessing")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reliability(probabilities: np.ndarray, y: np.ndarray, title: str, path: Path,
                     bins: int = 15) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    centres = (edges[:-1] + edges[1:]) / 2
    accuracy = [correct[which == b].mean() if (which == b).any() else np.nan for b in range(bins)]
    counts = np.bincount(which, minlength=bins)
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5.5, 6), sharex=True, height_ratios=[3, 1])
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfect calibration")
    ax.bar(centres, accuracy, width=1 / bins, alpha=0.7, edgecolor="black", label="accuracy in bin")
    ax.set(ylabel="accuracy", title=title, ylim=(0, 1))
    ax.legend()
    ax_n.bar(centres, counts, width=1 / bins, color="tab:grey")
    ax_n.set(xlabel="confidence", ylabel="images", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    args.version = output_version("digits", args.version, args.models_dir)
    clock = Stopwatch()

    import keras
    import tensorflow as tf

    seed_everything(args.seed)
    rng = np.random.default_rng(args.seed)

    # ---- data: every image through the serving preprocessing --------------------------------
    with np.load(args.data) as data:
        x_train_raw, y_train = data["x_train"], data["y_train"].astype(np.int64)
        x_test_raw, y_test = data["x_test"], data["y_test"].astype(np.int64)
    if args.limit:
        x_train_raw, y_train = x_train_raw[:args.limit], y_train[:args.limit]
    started = time.perf_counter()
    x_all = normalize_batch(x_train_raw)[..., None]
    print(f"preprocessed {len(x_all)} training images in {time.perf_counter() - started:.1f}s", flush=True)
    n_val = min(args.validation, len(x_all) // 10)
    raw_train, raw_val = x_train_raw[:-n_val] / 255.0, x_train_raw[-n_val:] / 255.0
    x_clean, y_clean = x_all[:-n_val], y_train[:-n_val]
    x_val, y_val = x_all[-n_val:], y_train[-n_val:]

    # MNIST as drawn by other pens: a share of the training digits replaced by a redrawn version
    started = time.perf_counter()
    redraw = np.flatnonzero(rng.random(len(x_clean)) < args.redrawn)
    x_redrawn, kept = make_set(raw_train[redraw], augment_digit, rng)
    x_mnist = np.concatenate([x_clean, x_redrawn])
    y_mnist = np.concatenate([y_clean, y_clean[redraw[kept]]])
    low = rng.choice(len(raw_train), size=min(args.low_resolution, len(raw_train)), replace=False)
    x_low, kept = make_set(raw_train[low], low_resolution_digit, rng)
    y_low = y_clean[low[kept]]
    print(f"redrawn {len(redraw)} and low-resolution {len(x_low)} MNIST digits in "
          f"{time.perf_counter() - started:.0f}s", flush=True)

    # pendigits training writers drawn as canvas strokes; the last 10 % of rows validate
    started = time.perf_counter()
    points, pen_labels = read_pendigits(args.pendigits)
    if args.limit:
        points, pen_labels = points[:args.limit // 5], pen_labels[:args.limit // 5]
    n_pen_val = len(points) // 10
    pen_train = np.repeat(np.arange(len(points) - n_pen_val), args.pen_renderings)
    x_pen, kept = make_set(points[pen_train], random_trajectory_render, rng)
    y_pen = pen_labels[pen_train[kept]]
    pen_low = np.repeat(np.arange(len(points) - n_pen_val), args.pen_low_resolution)
    x_pen_low, kept = make_set(points[pen_low], low_resolution_trajectory, rng)
    x_pen, y_pen = np.concatenate([x_pen, x_pen_low]), np.concatenate([y_pen, pen_labels[pen_low[kept]]])
    x_pen_val, kept = make_set(points[-n_pen_val:], random_trajectory_render, rng)
    y_pen_val = pen_labels[-n_pen_val:][kept]

    # non-digits (training fonts and letters, synthetic textures): the uniform distribution as target
    x_other, _ = make_set(range(args.non_digits), lambda _, r: non_digit(r), rng)
    print(f"{len(x_pen)} pen renderings, {len(x_other)} non-digits in {time.perf_counter() - started:.0f}s",
          flush=True)

    # validation digits: MNIST as drawn, redrawn and low resolution; pendigits rows held back
    x_val_redrawn, kept_redrawn = make_set(raw_val, augment_digit, rng)
    x_val_low, kept_low = make_set(raw_val[:n_val // 2], low_resolution_digit, rng)
    validation_sets = {
        "MNIST validation": (x_val, y_val),
        "MNIST validation redrawn": (x_val_redrawn, y_val[kept_redrawn]),
        "MNIST validation low resolution": (x_val_low, y_val[:n_val // 2][kept_low]),
        "pendigits.tra held-back rows drawn": (x_pen_val, y_pen_val),
    }

    production = None
    x_prod, y_prod = np.zeros((0, SIZE, SIZE, 1), np.float32), np.zeros(0, np.int64)
    if args.production_data is not None:  # the training split only: validation and test stay MNIST
        x_prod, y_prod, production = production_digits(args.production_data)
        production["repeat"] = args.production_repeat
        x_prod = np.concatenate([x_prod] * args.production_repeat)
        y_prod = np.concatenate([y_prod] * args.production_repeat)
        print(f"production data: {production['used']} labelled digits x {args.production_repeat} added to "
              f"training ({production['skipped']} skipped)", flush=True)

    x_train = np.concatenate([x_mnist, x_low, x_pen, x_prod, x_other])
    digit_labels = np.concatenate([y_mnist, y_low, y_pen, y_prod])
    targets = np.full((len(x_train), 10), 0.1, dtype=np.float32)  # non-digits: uniform
    targets[:len(digit_labels)] = np.eye(10, dtype=np.float32)[digit_labels]
    composition = {"mnist": len(x_clean), "mnist_redrawn": len(x_redrawn), "mnist_low_resolution": len(x_low),
                   "pendigits_renderings": len(x_pen) - len(x_pen_low),
                   "pendigits_low_resolution": len(x_pen_low), "production": len(x_prod), "non_digits": len(x_other)}
    print(f"train {len(x_train)} {composition}; validation "
          f"{ {name: len(v[1]) for name, v in validation_sets.items()} }", flush=True)

    augment = augmenter(keras, args.seed)
    train_ds = (tf.data.Dataset.from_tensor_slices((x_train, targets))
                .shuffle(len(x_train), seed=args.seed, reshuffle_each_iteration=True)
                .batch(args.batch_size)
                .map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
                .prefetch(tf.data.AUTOTUNE))
    val_ds = tf.data.Dataset.from_tensor_slices((x_val, np.eye(10, dtype=np.float32)[y_val])).batch(512)

    # ---- model ----------------------------------------------------------------------------------
    model = build_model(keras)
    model.summary(print_fn=lambda line, **_: print(line, flush=True))
    steps_per_epoch = int(np.ceil(len(x_train) / args.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(
        args.learning_rate, decay_steps=steps_per_epoch * args.epochs, alpha=0.01)
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True), metrics=["accuracy"])

    class Progress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):  # noqa: ANN001, ANN202
            self.epoch, self.t0 = epoch, time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):  # noqa: ANN001, ANN202
            if (batch + 1) % 100 == 0:
                rate = (batch + 1) / (time.perf_counter() - self.t0)
                print(f"  epoch {self.epoch + 1} step {batch + 1}/{steps_per_epoch} "
                      f"loss {logs['loss']:.4f} acc {logs['accuracy']:.4f} ({rate:.1f} steps/s)", flush=True)

        def on_epoch_end(self, epoch, logs=None):  # noqa: ANN001, ANN202
            print(f"epoch {epoch + 1}/{args.epochs}: loss {logs['loss']:.4f} acc {logs['accuracy']:.4f} "
                  f"val_loss {logs['val_loss']:.4f} val_acc {logs['val_accuracy']:.4f} "
                  f"({time.perf_counter() - self.t0:.0f}s, total {clock.seconds:.0f}s)", flush=True)

    # ---- fit ------------------------------------------------------------------------------------
    fit_clock = Stopwatch()
    history = model.fit(train_ds, validation_data=val_ds, epochs=args.epochs, verbose=0,
                        callbacks=[Progress()]).history
    fit_seconds = fit_clock.seconds

    # ---- calibrate on the validation digits: one temperature for the logits ---------------------
    val_logits = {name: model.predict(x, batch_size=512, verbose=0) for name, (x, _) in validation_sets.items()}
    all_logits = np.concatenate(list(val_logits.values()))
    all_labels = np.concatenate([y for _, y in validation_sets.values()])
    temperature = fit_temperature(all_logits, all_labels)
    validation = {}
    for name, (_, y) in validation_sets.items():
        logits = val_logits[name]
        validation[name] = {
            "n": len(y), "accuracy": float((logits.argmax(axis=1) == y).mean()),
            "ece_before": expected_calibration_error(softmax(logits), y),
            "ece": expected_calibration_error(softmax(logits / temperature), y)}
        print(f"{name}: accuracy {validation[name]['accuracy']:.4f}, ECE {validation[name]['ece_before']:.4f}"
              f" -> {validation[name]['ece']:.4f} at temperature {temperature:.3f}", flush=True)
    other_confidence = softmax(model.predict(x_other[:2000], batch_size=512, verbose=0) / temperature).max(axis=1)
    print(f"training non-digits: {np.mean(other_confidence >= 0.9):.3f} with confidence >= 0.9", flush=True)
    served = calibrated(keras, model, temperature)

    # ---- evaluate once on the test set -----------------------------------------------------------
    test_digits = [normalize_gray(np.asarray(img, dtype=np.float32) / 255.0) for img in x_test_raw]
    x_test = np.stack([d.array for d in test_digits])[..., None]
    test_logits = model.predict(x_test, batch_size=512, verbose=0)
    probabilities = softmax(test_logits / temperature)
    y_pred = probabilities.argmax(axis=1)
    test_accuracy = float((y_pred == y_test).mean())
    test_loss = float(-np.mean(np.log(np.clip(probabilities[np.arange(len(y_test)), y_test], 1e-12, 1.0))))
    test_ece = expected_calibration_error(probabilities, y_test)
    test_ece_before = expected_calibration_error(softmax(test_logits), y_test)
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (y_test, y_pred), 1)
    per_class = {LABELS[c]: float(confusion[c, c] / confusion[c].sum()) for c in range(10)}
    val_accuracy = validation["MNIST validation"]["accuracy"]
    print(f"test accuracy {test_accuracy:.4%} (loss {test_loss:.4f}, ECE {test_ece_before:.4f} -> "
          f"{test_ece:.4f}); validation {val_accuracy:.4%}", flush=True)

    # ---- export ---------------------------------------------------------------------------------
    out = model_dir("digits", args.version, args.models_dir)
    artifact = export_tflite(served, out / "model.tflite", x_test[:64])
    if artifact["bytes"] >= 2 * 1024 * 1024:
        raise RuntimeError(f"model.tflite is {artifact['bytes']} bytes; the budget is 2 MiB")

    features = [summary_features(d) for d in test_digits]
    reference = build_reference(
        {name: [f[name] for f in features] for name in features[0]},
        predictions=[LABELS[p] for p in y_pred], labels=LABELS,
        true_labels=[LABELS[t] for t in y_test],
        source="MNIST test set (10,000 images) through app.tasks.digits.preprocess", seed=args.seed)
    write_json(out / "reference.json", reference)

    report = out / "report"
    plot_history(history, report / "learning_curves.png")
    plot_confusion(confusion, test_accuracy, report / "confusion_matrix.png")
    plot_reliability(probabilities, y_test, f"MNIST test, temperature {temperature:.2f} "
                     f"(ECE {test_ece:.4f})", report / "reliability_mnist_test.png")
    wrong = np.flatnonzero(y_pred != y_test)
    plot_errors(x_test[wrong, ..., 0], y_test[wrong], y_pred[wrong], report / "errors.png")
    calibration = {"method": "temperature scaling of the logits, folded into model.tflite",
                   "temperature": temperature,
                   "fitted_on": "validation digits: " + ", ".join(validation_sets),
                   "ece_bins": 15, "validation": validation,
                   "test_ece": test_ece, "test_ece_before": test_ece_before}
    metrics = {
        "test_accuracy": test_accuracy, "test_loss": test_loss, "test_ece": test_ece,
        "test_errors": int(len(wrong)), "n_test": len(y_test), "validation_accuracy": val_accuracy,
        "validation_loss": float(history["val_loss"][-1]), "per_class_test_accuracy": per_class,
        "confusion_matrix": confusion.tolist(), "calibration": calibration,
        "training_non_digits_confident_share": float(np.mean(other_confidence >= 0.9)),
        "history": {k: [float(v) for v in vals] for k, vals in history.items() if k != "learning_rate"},
    }
    write_json(report / "metrics.json", metrics)

    write_metadata(
        out, name="digits", task="digits", version=args.version,
        description="Handwritten digit classifier (CNN) trained on MNIST as drawn and redrawn, low-resolution "
                    "digits, pen-trajectory drawings and non-digits, with calibrated probabilities. Any image "
                    "is normalised MNIST-style (polarity, ink box to 20x20, centre of mass at the centre of "
                    "28x28) first.",
        artifact={"file": "model.tflite", "format": "tflite-fp32", **artifact},
        data={"path": "../shared/data/mnist/mnist.npz", "sha256": sha256_file(args.data),
              "pendigits": {"path": "../shared/data/pendigits/pendigits.tra",
                            "sha256": sha256_file(args.pendigits), "rows_train": len(points) - n_pen_val,
                            "rows_validation": n_pen_val},
              "non_digits": {"fonts": [Path(f).name for f in TRAIN_FONTS], "glyphs": TRAIN_LETTERS,
                             "textures": "synthetic: smooth noise, cells, lines, blobs, photo-like scenes",
                             "evaluation_fonts_not_used": [Path(f).name for f in EVAL_FONTS],
                             "evaluation_glyphs_not_used": EVAL_LETTERS},
              "train": len(x_train), "composition": composition,
              "validation": {name: len(v[1]) for name, v in validation_sets.items()}, "test": len(y_test),
              "production": production},
        input={"name": "digit", "shape": [None, SIZE, SIZE, 1], "dtype": "float32",
               "description": "white digit on black in [0, 1], normalised by app.tasks.digits.preprocess"},
        output={"name": "probabilities", "shape": [None, 10], "dtype": "float32",
                "description": "softmax over the digits 0-9 of the logits divided by the temperature"},
        labels=LABELS,
        metrics={"test_accuracy": test_accuracy, "test_loss": test_loss, "test_ece": test_ece,
                 "validation_accuracy": val_accuracy},
        calibration={"method": calibration["method"], "temperature": temperature,
                     "fitted_on": calibration["fitted_on"], "ece_bins": 15,
                     "validation_ece": {name: v["ece"] for name, v in validation.items()}},
        params={"architecture": ARCHITECTURE,
                "parameters": int(model.count_params()), "optimizer": "adam",
                "loss": "cross-entropy; one-hot for digits, uniform for non-digits (outlier exposure)",
                "learning_rate": args.learning_rate, "schedule": "cosine decay to 1% over all steps",
                "batch_size": args.batch_size,
                "augmentation": {"on_the_fly": {"rotation_degrees": 10, "zoom": 0.1, "shift_pixels": 2},
                                 "redrawn_share": args.redrawn, "redrawn": "training/digit_data.py "
                                 "augment_digit: stroke width, binarised or anti-aliased, blur, elastic, "
                                 "rotation +-12, shear +-0.25, tight box or margins, polarity, noise",
                                 "low_resolution": args.low_resolution, "pen_renderings": args.pen_renderings,
                                 "pen_low_resolution": args.pen_low_resolution,
                                 "non_digits": args.non_digits},
                "preprocessing": PREPROCESSING_PARAMS},
        training={"seed": args.seed, "epochs": args.epochs, "duration_s": clock.seconds,
                  "fit_duration_s": fit_seconds},
    )
    print(f"wrote {out} in {clock.seconds:.0f}s", flush=True)


# ---- the evaluation gate (training.compare) ---------------------------------------------------
def compare_sets(baseline: Any, candidate: Any, production: Path | None, limit: int) -> list[HeldOut]:
    """MNIST test and, with an export, its labelled digits: accuracy of each version."""
    with np.load(SHARED_DATA / "mnist" / "mnist.npz") as data:
        x, y = data["x_test"], data["y_test"].astype(np.int64)
    if limit:
        x, y = x[:limit], y[:limit]
    sets = [("MNIST test (held out)", normalize_batch(x)[..., None], y)]
    if production is not None:
        xp, yp, _ = production_digits(production)
        sets.append(("production (labelled)", xp, yp))
    return [HeldOut(name, len(y), lambda m, x=x, y=y: accuracy(m, x, y)) for name, x, y in sets]


def accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    if len(x) == 0:
        return float("nan")
    predicted = np.concatenate([model.predict(x[i:i + 256]).argmax(axis=1) for i in range(0, len(x), 256)])
    labels = np.asarray([int(label) for label in model.metadata["labels"]])
    return float((labels[predicted] == y).mean())


# A drop a bit above the run-to-run noise of 10 000 MNIST test digits.
COMPARISON = Comparison("accuracy", 0.003, compare_sets)


if __name__ == "__main__":
    main()
