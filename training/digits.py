"""Train the digits CNN on MNIST and export ``models/digits/<version>/``.

    .venv-train/bin/python -m training.digits [--data ../shared/data/mnist/mnist.npz] [--epochs 8]
        [--production-data export.zip [--production-repeat 4]] [--version 1.0.2] [--models-dir models]

Reads top to bottom: arguments, data, model, fit, evaluate, export. Every image, training and test,
first goes through ``app.tasks.digits.preprocess`` (the function serving uses), so the model sees at
training time exactly what it will see behind the API. The last 5,000 training images are the
validation set; the 10,000 test images are used once, at the end, for the report and the drift
reference.

Model: the course's Conv16-Pool-Conv32-Pool-Dense64 (98.97 %) grown into two double-conv blocks with
batch norm and dropout (Conv32-Conv32-Pool-Conv64-Conv64-Pool-Dense128), trained with light
augmentation (small rotations, shifts, zoom) and Adam under a cosine learning-rate schedule.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

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
    Stopwatch,
    export_tflite,
    model_dir,
    output_version,
    seed_everything,
    sha256_file,
    write_json,
    write_metadata,
)
from training.production import read_export, summary

LABELS = [str(d) for d in range(10)]


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
    parser.add_argument("--epochs", type=int, default=8)
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
    x = layers.Dropout(0.1)(x)
    x = conv(x, 64)  # 10x10
    x = conv(x, 64)  # 8x8
    x = layers.MaxPooling2D()(x)  # 4x4
    x = layers.Dropout(0.2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    x = layers.Dropout(0.4)(x)
    outputs = layers.Dense(10, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


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
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0.97, 1.0))
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


def main() -> None:
    args = parse_args()
    args.version = output_version("digits", args.version, args.models_dir)
    clock = Stopwatch()

    import keras
    import tensorflow as tf

    seed_everything(args.seed)

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
    x_train, y_train_split = x_all[:-n_val], y_train[:-n_val]
    x_val, y_val = x_all[-n_val:], y_train[-n_val:]
    production = None
    if args.production_data is not None:  # the training split only: validation and test stay MNIST
        x_prod, y_prod, production = production_digits(args.production_data)
        production["repeat"] = args.production_repeat
        x_train = np.concatenate([x_train, *([x_prod] * args.production_repeat)])
        y_train_split = np.concatenate([y_train_split, *([y_prod] * args.production_repeat)])
        print(f"production data: {production['used']} labelled digits x {args.production_repeat} added to "
              f"training ({production['skipped']} skipped)", flush=True)
    print(f"train {len(x_train)}, validation {len(x_val)} (last {n_val} of the training set)", flush=True)

    augment = augmenter(keras, args.seed)
    train_ds = (tf.data.Dataset.from_tensor_slices((x_train, y_train_split))
                .shuffle(len(x_train), seed=args.seed, reshuffle_each_iteration=True)
                .batch(args.batch_size)
                .map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
                .prefetch(tf.data.AUTOTUNE))
    val_ds = tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(512)

    # ---- model ----------------------------------------------------------------------------------
    model = build_model(keras)
    model.summary(print_fn=lambda line, **_: print(line, flush=True))
    steps_per_epoch = int(np.ceil(len(x_train) / args.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(
        args.learning_rate, decay_steps=steps_per_epoch * args.epochs, alpha=0.01)
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])

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

    # ---- evaluate once on the test set -----------------------------------------------------------
    test_digits = [normalize_gray(np.asarray(img, dtype=np.float32) / 255.0) for img in x_test_raw]
    x_test = np.stack([d.array for d in test_digits])[..., None]
    probabilities = model.predict(x_test, batch_size=512, verbose=0)
    y_pred = probabilities.argmax(axis=1)
    test_accuracy = float((y_pred == y_test).mean())
    test_loss = float(-np.mean(np.log(np.clip(probabilities[np.arange(len(y_test)), y_test], 1e-12, 1.0))))
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (y_test, y_pred), 1)
    per_class = {LABELS[c]: float(confusion[c, c] / confusion[c].sum()) for c in range(10)}
    val_accuracy = float(history["val_accuracy"][-1])
    print(f"test accuracy {test_accuracy:.4%} (loss {test_loss:.4f}); validation {val_accuracy:.4%}", flush=True)

    # ---- export ---------------------------------------------------------------------------------
    out = model_dir("digits", args.version, args.models_dir)
    artifact = export_tflite(model, out / "model.tflite", x_test[:64])
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
    wrong = np.flatnonzero(y_pred != y_test)
    plot_errors(x_test[wrong, ..., 0], y_test[wrong], y_pred[wrong], report / "errors.png")
    metrics = {
        "test_accuracy": test_accuracy, "test_loss": test_loss, "test_errors": int(len(wrong)),
        "n_test": len(y_test), "validation_accuracy": val_accuracy,
        "validation_loss": float(history["val_loss"][-1]), "per_class_test_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
        "history": {k: [float(v) for v in vals] for k, vals in history.items() if k != "learning_rate"},
    }
    write_json(report / "metrics.json", metrics)

    write_metadata(
        out, name="digits", task="digits", version=args.version,
        description="Handwritten digit classifier (MNIST CNN). Any image is normalised MNIST-style "
                    "(polarity, ink box to 20x20, centre of mass at the centre of 28x28) first.",
        artifact={"file": "model.tflite", "format": "tflite-fp32", **artifact},
        data={"path": "../shared/data/mnist/mnist.npz", "sha256": sha256_file(args.data),
              "train": len(x_train), "validation": len(x_val), "test": len(y_test),
              "production": production},
        input={"name": "digit", "shape": [None, SIZE, SIZE, 1], "dtype": "float32",
               "description": "white digit on black in [0, 1], normalised by app.tasks.digits.preprocess"},
        output={"name": "probabilities", "shape": [None, 10], "dtype": "float32",
                "description": "softmax over the digits 0-9"},
        labels=LABELS,
        metrics={"test_accuracy": test_accuracy, "test_loss": test_loss,
                 "validation_accuracy": val_accuracy},
        params={"architecture": "Conv32-Conv32-Pool-Conv64-Conv64-Pool-Dense128 (3x3 valid convs, "
                                "batch norm, dropout 0.1/0.2/0.4)",
                "parameters": int(model.count_params()), "optimizer": "adam",
                "learning_rate": args.learning_rate, "schedule": "cosine decay to 1% over all steps",
                "batch_size": args.batch_size,
                "augmentation": {"rotation_degrees": 10, "zoom": 0.1, "shift_pixels": 2},
                "preprocessing": PREPROCESSING_PARAMS},
        training={"seed": args.seed, "epochs": args.epochs, "duration_s": clock.seconds,
                  "fit_duration_s": fit_seconds},
    )
    print(f"wrote {out} in {clock.seconds:.0f}s", flush=True)


if __name__ == "__main__":
    main()
