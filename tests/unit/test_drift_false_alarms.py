"""Drift monitoring without false alarms, on real data through each task's own serving code.

For each task a reference is built (as training builds ``reference.json``) from one sample of real
inputs, and the drift report of a *disjoint* sample of the same distribution must not say drift,
while the same sample shifted (brighter, louder, inverted, richer customers) must. Windows are the
sizes a deployment sees: ``DRIFT_MIN_SAMPLES`` (30) and larger.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from app.core.codecs.audio import decode_audio
from app.core.config import Settings
from app.monitoring.drift import model_drift
from app.monitoring.reference import build_reference
from app.tasks.clustering.model import ClusteringModel
from app.tasks.clustering.preprocess import summary_features as clustering_features
from app.tasks.digits.model import DigitsModel
from app.tasks.digits.preprocess import prepare_pixels
from app.tasks.digits.preprocess import summary_features as digit_features
from app.tasks.digits.schemas import LABELS as DIGIT_LABELS
from app.tasks.emotion.model import EmotionModel
from app.tasks.emotion.preprocess import summary_features as emotion_features
from app.tasks.segmentation.model import SegmentationModel
from tests.support import SHARED_DATA, committed_version, mall_rows

MIN_SAMPLES = Settings().drift_min_samples


def columns(rows: list[dict[str, float]]) -> dict[str, list[float]]:
    return {name: [r[name] for r in rows] for name in rows[0]}


def report(reference_rows, reference_predictions, labels, rows, predictions) -> dict:
    reference = build_reference(columns(reference_rows), reference_predictions, labels)
    return model_drift(reference, columns(rows), predictions, min_samples=MIN_SAMPLES)


def assert_no_false_alarm(result: dict) -> None:
    drifting = {name: (f["psi"], f["ks_statistic"]) for name, f in result["features"].items()
                if f["status"] == "drift"}
    assert result["status"] != "drift", f"false alarm on a sample of the same data: {drifting}, " \
                                        f"classes {result['prediction'] and result['prediction']['status']}"


# ---- digits ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    model = DigitsModel.load(committed_version("digits"), Settings())
    with np.load(SHARED_DATA / "mnist" / "mnist.npz") as data:
        images = data["x_test"]

    def sample(batch: np.ndarray) -> tuple[list[dict], list[str]]:
        prepared = [prepare_pixels(im) for im in batch]
        probabilities = model.predict(np.stack([p.array for p in prepared]))
        return [digit_features(p) for p in prepared], [DIGIT_LABELS[i] for i in probabilities.argmax(axis=1)]

    return images, sample


@pytest.mark.parametrize("window", [MIN_SAMPLES, 100, 500])
def test_digits_same_distribution_is_no_drift_and_inverted_ink_is(digits, window):
    images, sample = digits
    # Random, disjoint draws: MNIST's test set is ordered (its first 5 000 digits come from other
    # writers than the last 5 000), so slices of it are not one distribution.
    order = np.random.default_rng(0).permutation(len(images))
    ref_rows, ref_pred = sample(images[order[:2000]])
    window_images = images[order[2000:2000 + window]]
    rows, pred = sample(window_images)
    assert_no_false_alarm(report(ref_rows, ref_pred, DIGIT_LABELS, rows, pred))
    shifted_rows, shifted_pred = sample(255 - window_images)  # dark ink on white paper
    assert report(ref_rows, ref_pred, DIGIT_LABELS, shifted_rows, shifted_pred)["status"] == "drift"


# ---- clustering --------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clustering_random_halves_of_the_customers_do_not_drift_and_richer_ones_do(seed):
    model = ClusteringModel.load(committed_version("clustering"), Settings())
    rows = [{"annual_income": income, "spending_score": score} for income, score in mall_rows()]
    order = np.random.default_rng(seed).permutation(len(rows))
    half_a, half_b = [rows[i] for i in order[:100]], [rows[i] for i in order[100:]]

    def predict(part: list[dict]) -> list[str]:
        labels, _ = model.predict(np.array([[r["annual_income"], r["spending_score"]] for r in part]))
        return [model.segments[i] for i in labels]

    features_a = [clustering_features(r) for r in half_a]
    assert_no_false_alarm(report(features_a, predict(half_a), model.segments,
                                 [clustering_features(r) for r in half_b], predict(half_b)))
    richer = [{**r, "annual_income": r["annual_income"] + 30} for r in half_b]
    assert report(features_a, predict(half_a), model.segments,
                  [clustering_features(r) for r in richer], predict(richer))["status"] == "drift"


# ---- emotion -----------------------------------------------------------------------------------

def test_emotion_a_disjoint_set_of_clips_does_not_drift_and_louder_clips_do():
    model = EmotionModel.load(committed_version("emotion"), Settings())
    rate = model.params.sample_rate
    clips = sorted((SHARED_DATA / "emodb" / "wav").glob("*.wav"))
    order = np.random.default_rng(0).permutation(len(clips))

    def sample(indices, gain: float = 1.0) -> tuple[list[dict], list[str]]:
        rows, predictions = [], []
        for i in indices:
            waveform = decode_audio(clips[i].read_bytes(), "audio", max_seconds=60, target_rate=rate)
            waveform = np.clip(waveform * gain, -1.0, 1.0).astype(np.float32)
            result = model.classify(waveform, rate)
            rows.append(emotion_features(result.waveform, model.params))
            predictions.append(result.emotion)
        return rows, predictions

    ref_rows, ref_pred = sample(order[:150])
    rows, pred = sample(order[150:150 + 60])
    assert_no_false_alarm(report(ref_rows, ref_pred, model.labels, rows, pred))
    loud_rows, loud_pred = sample(order[150:150 + 60], gain=4.0)  # +12 dB
    assert report(ref_rows, ref_pred, model.labels, loud_rows, loud_pred)["status"] == "drift"


# ---- segmentation ------------------------------------------------------------------------------

def test_segmentation_other_slices_of_the_stack_do_not_drift_and_darker_ones_do():
    model = SegmentationModel.load(committed_version("segmentation"), Settings())
    base = SHARED_DATA / "membrane" / "train" / "image"

    def crops(slices, scale: float = 1.0) -> tuple[list[dict], list[str]]:
        rows = []
        for i in slices:
            image = np.asarray(Image.open(base / f"{i}.png").convert("L"), dtype=np.float64)
            for y, x in ((0, 0), (256, 256)):
                gray = np.clip(image[y:y + 256, x:x + 256] * scale, 0, 255).astype(np.uint8)
                rows.append(model.segment(gray, model.threshold).features)
        return rows, ["mask"] * len(rows)

    ref_rows, ref_pred = crops(range(0, 30, 2))  # 30 crops of the even slices
    rows, pred = crops(range(1, 30, 2))  # 30 of the odd ones
    assert_no_false_alarm(report(ref_rows, ref_pred, ["mask"], rows, pred))
    dark_rows, dark_pred = crops(range(1, 30, 2), scale=0.6)
    assert report(ref_rows, ref_pred, ["mask"], dark_rows, dark_pred)["status"] == "drift"
