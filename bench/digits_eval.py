"""Digits models scored through HTTP on handwriting as people send it, and on non-digits.

    .venv-dev/bin/python -m bench.digits_eval [--versions 1.0.1,1.1.0] [--batch 128] [--limit N]

For each version a real server is started (``running_server``) with that version pinned
(``MODEL_VERSIONS='{"digits": "<version>"}'``) and every set is sent to ``POST /v1/digits/predict``:

- MNIST test: the 10,000 held-out digits as JSON ``pixels``;
- pendigits test: the 3,498 trajectories of ``pendigits.tes`` (14 writers never trained on) drawn as
  a canvas draws them (``training.digit_data.render_trajectory``: 112x112 white canvas, 8 px dark
  strokes with round joints, 16 px margins, anti-aliased), sent as PNG images;
- UCI 8x8: scikit-learn's bundled ``load_digits()`` (1,797 digits, 4x4-block counts 0-16), levels
  scaled to 0-255 and enlarged bilinearly to 28x28, sent as ``pixels``;
- letters: the evaluation letters (``EVAL_LETTERS``) in the Liberation fonts (``EVAL_FONTS``) at
  three sizes, dark on white PNG; neither fonts nor letters are in any training set;
- photos: crops of ``examples/sunset.png`` (and the whole photo);
- textures: crops of the EM membrane slices and masks (``../shared/data/membrane/train``) and of
  ``examples/membrane-slice3-crop.png``.

Per digit set: accuracy, expected calibration error (15 equal-width bins), mean confidence. Per
non-digit set: the share answered with confidence >= 0.9 (a blank image answered 422 counts as not
answered). Writes ``bench/results/digits_eval.json``.
"""

from __future__ import annotations

import argparse
import base64
import io
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench.common import (
    REPO_ROOT,
    SHARED_DATA,
    serving_python,
    write_results,
)
from bench.liveserver import serving_version
from training.common import expected_calibration_error
from training.digit_data import (
    EVAL_FONTS,
    EVAL_LETTERS,
    read_pendigits,
    render_glyph,
    render_trajectory,
)

URL = "/v1/digits/predict"
CONFIDENT = 0.9
BINS = 15


def png_b64(gray: np.ndarray) -> str:
    """A float [0, 1] or uint8 grayscale / RGB array as a base64 PNG."""
    array = gray if gray.dtype == np.uint8 else (np.clip(gray, 0, 1) * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# ---- the sets ---------------------------------------------------------------------------------
def mnist_test(limit: int) -> tuple[list[dict], np.ndarray]:
    with np.load(SHARED_DATA / "mnist" / "mnist.npz") as data:
        x, y = data["x_test"], data["y_test"].astype(int)
    x, y = (x[:limit], y[:limit]) if limit else (x, y)
    return [{"pixels": image.tolist()} for image in x], y


def pendigits_test(limit: int) -> tuple[list[dict], np.ndarray]:
    points, labels = read_pendigits(SHARED_DATA / "pendigits" / "pendigits.tes")
    points, labels = (points[:limit], labels[:limit]) if limit else (points, labels)
    return [{"image_b64": png_b64(render_trajectory(p, canvas=112, width=8, margin=16, supersample=3))}
            for p in points], labels


def uci_digits(limit: int) -> tuple[list[dict], np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images, digits.target.astype(int)
    images, labels = (images[:limit], labels[:limit]) if limit else (images, labels)
    out = []
    for image in images:
        small = Image.fromarray((image * 255.0 / 16.0).round().astype(np.uint8))
        out.append({"pixels": np.asarray(small.resize((28, 28), Image.BILINEAR)).tolist()})
    return out, labels


def letters(limit: int) -> list[dict]:
    rng = np.random.default_rng(7)
    out = []
    for font in EVAL_FONTS:
        for char in EVAL_LETTERS:
            for _ in range(3):
                out.append({"image_b64": png_b64(render_glyph(char, font, rng))})
    return out[:limit] if limit else out


def crops(paths: list[Path], n: int, rng: np.random.Generator) -> list[dict]:
    """``n`` random square crops (48 to 256 px, never past the edge) spread over ``paths``."""
    images = [np.asarray(Image.open(p).convert("RGB" if Image.open(p).mode == "RGB" else "L")) for p in paths]
    out = []
    for k in range(n):
        image = images[k % len(images)]
        h, w = image.shape[:2]
        side = int(rng.integers(48, min(h, w, 256) + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        out.append({"image_b64": png_b64(np.ascontiguousarray(image[top:top + side, left:left + side]))})
    return out


def photos(limit: int) -> list[dict]:
    sunset = REPO_ROOT / "examples" / "sunset.png"
    out = [{"image_b64": png_b64(np.asarray(Image.open(sunset).convert("RGB")))}]
    out += crops([sunset], 99, np.random.default_rng(11))
    return out[:limit] if limit else out


def textures(limit: int) -> list[dict]:
    membrane = SHARED_DATA / "membrane" / "train"
    slices = sorted((membrane / "image").glob("*.png"))
    masks = sorted((membrane / "label").glob("*.png"))
    rng = np.random.default_rng(13)
    out = crops([*slices, REPO_ROOT / "examples" / "membrane-slice3-crop.png"], 150, rng)
    out += crops(masks, 50, rng)
    return out[:limit] if limit else out


# ---- scoring ----------------------------------------------------------------------------------
def send(client: httpx.Client, instances: list[dict], batch: int) -> list[dict | None]:
    """One prediction per instance; None for an instance the API refuses (a blank image: 422)."""
    out: list[dict | None] = []
    for start in range(0, len(instances), batch):
        chunk = instances[start:start + batch]
        response = client.post(URL, json={"instances": chunk})
        if response.status_code == 200:
            out.extend(response.json()["predictions"])
            continue
        for instance in chunk:  # find the refused one(s): one at a time
            single = client.post(URL, json={"instances": [instance]})
            if single.status_code == 422:
                out.append(None)
            else:
                single.raise_for_status()
                out.append(single.json()["predictions"][0])
    return out


def score_digits(predictions: list[dict | None], labels: np.ndarray) -> dict:
    answered = np.asarray([p is not None for p in predictions])
    digit = np.asarray([p["digit"] if p else -1 for p in predictions])
    confidence = np.asarray([p["confidence"] if p else 0.0 for p in predictions])
    correct = digit == labels
    return {"n": len(labels), "refused": int((~answered).sum()), "accuracy": round(float(correct.mean()), 4),
            "correct": int(correct.sum()),
            "ece": round(expected_calibration_error(confidence[answered], correct[answered], BINS), 4),
            "mean_confidence": round(float(confidence[answered].mean()), 4),
            "confident_share": round(float((confidence >= CONFIDENT).mean()), 4),
            "accuracy_when_confident": round(float(correct[confidence >= CONFIDENT].mean()), 4)
            if (confidence >= CONFIDENT).any() else None}


def score_non_digits(predictions: list[dict | None]) -> dict:
    confidence = np.asarray([p["confidence"] if p else 0.0 for p in predictions])
    return {"n": len(predictions), "refused": sum(p is None for p in predictions),
            "confident_share": round(float((confidence >= CONFIDENT).mean()), 4),
            "confident": int((confidence >= CONFIDENT).sum()),
            "mean_confidence": round(float(confidence[[p is not None for p in predictions]].mean()), 4)
            if any(p is not None for p in predictions) else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", default="1.0.1,1.1.0", help="comma-separated digits versions")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--limit", type=int, default=0, help="first N of each set (smoke runs)")
    args = parser.parse_args()

    started = time.perf_counter()
    digit_sets = {"MNIST test": mnist_test(args.limit), "pendigits test (drawn)": pendigits_test(args.limit),
                  "UCI 8x8 (enlarged to 28x28)": uci_digits(args.limit)}
    other_sets = {"letters": letters(args.limit), "photos": photos(args.limit), "textures": textures(args.limit)}
    print(f"sets built in {time.perf_counter() - started:.0f}s: "
          f"{ {k: len(v[1]) for k, v in digit_sets.items()} } { {k: len(v) for k, v in other_sets.items()} }",
          flush=True)

    python = serving_python()
    results: dict[str, dict] = {}
    for version in [v.strip() for v in args.versions.split(",") if v.strip()]:
        with serving_version("digits", version, python) as client:
            scores: dict[str, dict] = {}
            for name, (instances, labels) in digit_sets.items():
                t0 = time.perf_counter()
                scores[name] = score_digits(send(client, instances, args.batch), labels)
                print(f"{version} {name}: {scores[name]} ({time.perf_counter() - t0:.0f}s)", flush=True)
            for name, instances in other_sets.items():
                scores[name] = score_non_digits(send(client, instances, args.batch))
                print(f"{version} {name}: {scores[name]}", flush=True)
            results[version] = scores

    write_results("digits_eval" if not args.limit else "digits_eval-smoke", {
        "model": "digits", "through": f"POST {URL} on a real server (bench/liveserver.py), one per version",
        "confident_threshold": CONFIDENT, "ece_bins": BINS, "serving_python": python,
        "sets": {"MNIST test": "mnist.npz x_test as pixels",
                 "pendigits test (drawn)": "pendigits.tes, 112x112 canvas, 8 px strokes, 16 px margins, PNG",
                 "UCI 8x8 (enlarged to 28x28)": "sklearn load_digits, levels x 255/16, bilinear to 28x28, pixels",
                 "letters": f"letters {EVAL_LETTERS!r} in {len(EVAL_FONTS)} Liberation fonts, 3 renderings each",
                 "photos": "examples/sunset.png and 99 random crops (48-200 px)",
                 "textures": "150 crops of the membrane slices (train/image, examples/membrane-slice3-crop.png), "
                             "50 of the masks (train/label)"},
        "limit": args.limit, "versions": results,
    })


if __name__ == "__main__":
    main()
