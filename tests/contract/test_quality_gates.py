"""Model quality gates through HTTP: each model, asked on held-out data it never saw, must still be
good, class by class; and each gate is shown to fail on a deliberately broken copy of the committed
artefacts (two emotion labels swapped, a default threshold of 0.95, two segment names swapped).

The floors are set from the committed models' measured figures (in the comments), with a margin
for nothing but rounding: a model that gets worse fails.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.liveserver import running_server
from tests.support import MODELS, SHARED_DATA, committed_version

EMODB_LETTERS = {"W": "anger", "L": "boredom", "E": "disgust", "A": "fear", "F": "happiness",
                 "T": "sadness", "N": "neutral"}
PER_CLASS = 6  # clips per emotion from the held-out speakers 03 and 16: 42 in all (fear has 11)


def emotion_sample() -> list[tuple[Path, str]]:
    clips: dict[str, list[Path]] = {}
    for path in sorted((SHARED_DATA / "emodb" / "wav").glob("*.wav")):
        if path.name[:2] in ("03", "16"):
            clips.setdefault(EMODB_LETTERS[path.name[5]], []).append(path)
    # Alternate the two speakers so both are in every class's sample.
    sample = []
    for label, paths in sorted(clips.items()):
        by_speaker = [[p for p in paths if p.name.startswith(s)] for s in ("03", "16")]
        mixed = [p for pair in zip(*by_speaker, strict=False) for p in pair] + \
            [p for group in by_speaker for p in group[min(map(len, by_speaker)):]]
        sample += [(p, label) for p in mixed[:PER_CLASS]]
    return sample


def emotion_gate(client: httpx.Client) -> None:
    sample = emotion_sample()
    predicted = []
    for start in range(0, len(sample), 8):
        batch = sample[start:start + 8]
        response = client.post("/v1/emotion/predict", files=[
            ("audio", (p.name, p.read_bytes(), "audio/wav")) for p, _ in batch])
        assert response.status_code == 200, response.text
        predicted += [p["label"] for p in response.json()["predictions"]]
    truth = [label for _, label in sample]
    correct = Counter(t for t, p in zip(truth, predicted, strict=True) if t == p)
    accuracy = sum(correct.values()) / len(truth)
    # Committed 1.3.0 on this sample: 0.762 (32/42, every class at least 3 of 6); on all 120
    # held-out clips 0.767. The floor allows two more mistakes.
    assert accuracy >= 0.71, f"emotion accuracy {accuracy:.3f} on {len(truth)} held-out clips"
    missed = sorted(set(EMODB_LETTERS.values()) - set(correct))
    assert not missed, f"never recognised: {missed} ({Counter(predicted)})"
    assert max(Counter(predicted).values()) <= 2 * PER_CLASS, f"one answer dominates: {Counter(predicted)}"


def digits_gate(client: httpx.Client) -> None:
    with np.load(SHARED_DATA / "mnist" / "mnist.npz") as data:
        images, labels = data["x_test"][-500:], data["y_test"][-500:]  # the last 500 test digits
    predicted = []
    for start in range(0, 500, 250):
        response = client.post("/v1/digits/predict", json={"instances": [
            {"pixels": im.tolist()} for im in images[start:start + 250]]})
        assert response.status_code == 200, response.text
        predicted += [p["digit"] for p in response.json()["predictions"]]
    predicted = np.array(predicted)
    accuracy = float((predicted == labels).mean())
    recall = {d: float((predicted[labels == d] == d).mean()) for d in range(10)}
    # Committed 1.0.1: 0.990 on these 500 (99.53 % on all 10 000), the lowest digit recall 0.976.
    assert accuracy >= 0.985, f"digits accuracy {accuracy:.3f}"
    assert min(recall.values()) >= 0.95, f"digit recall {recall}"


def _slice(i: int) -> tuple[bytes, np.ndarray]:
    base = SHARED_DATA / "membrane" / "train"
    membrane = np.asarray(Image.open(base / "label" / f"{i}.png")) == 0
    return (base / "image" / f"{i}.png").read_bytes(), membrane


def _mask(client: httpx.Client, png: bytes, **params: float) -> np.ndarray:
    response = client.post("/v1/segmentation/predict", params=params,
                           files={"image": ("s.png", png, "image/png")})
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content))) == 255


def segmentation_gate(client: httpx.Client) -> None:
    png, membrane = _slice(27)  # held out (25-29)
    default = _mask(client, png)
    accuracy = float((default == membrane).mean())
    # Committed 1.0.0 on slice 27: 0.9211 (0.922 on 25-29); membrane pixels at thresholds
    # 0.2/0.45/0.7/0.9: 68 382 / 54 047 / 39 475 / 24 104. 1.1.0: 0.922 on 25-29.
    assert accuracy >= 0.91, f"pixel accuracy {accuracy:.4f} on held-out slice 27"
    # The default threshold is the one tuned on the validation slices and committed in the
    # metadata (1.0.0: 0.45, 1.1.0: 0.5): the same mask as asking for it, not as 0.05 either side.
    tuned = json.loads((committed_version("segmentation") / "metadata.json").read_text())["params"]["threshold"]
    assert np.array_equal(default, _mask(client, png, threshold=tuned))
    for other in (tuned - 0.05, tuned + 0.05):
        assert not np.array_equal(default, _mask(client, png, threshold=other)), other
    # Strictly monotonic on a real slice: a higher threshold marks strictly fewer membrane pixels.
    counts = [int(_mask(client, png, threshold=t).sum()) for t in (0.2, tuned, 0.7, 0.9)]
    assert counts == sorted(counts, reverse=True) and len(set(counts)) == 4, counts
    # Membrane is ~22 % of a slice; a mask far from it is wrong however accurate the rest looks.
    assert 0.5 < default.mean() / membrane.mean() < 2.0


def mall_rows() -> list[dict[str, float]]:
    with open(SHARED_DATA / "mall_customers" / "Mall_Customers.csv", newline="") as f:
        return [{"annual_income": float(r["Annual Income (k$)"]),
                 "spending_score": float(r["Spending Score (1-100)"])} for r in csv.DictReader(f)]


def clustering_gate(client: httpx.Client) -> None:
    """Each segment's name says where its customers are: 'high income' means above the others'
    income, 'average' in between, and the same for spending."""
    rows = mall_rows()
    response = client.post("/v1/clustering/predict", json={"instances": rows})
    assert response.status_code == 200, response.text
    segments = [p["segment"] for p in response.json()["predictions"]]
    means = {}
    for name in set(segments):
        members = [r for r, s in zip(rows, segments, strict=True) if s == name]
        means[name] = (np.mean([m["annual_income"] for m in members]),
                       np.mean([m["spending_score"] for m in members]))
    assert len(means) == 5, means
    for axis, word in ((0, "income"), (1, "spending")):
        level = {name: next(w for w in ("low", "average", "high") if f"{w} {word}" in name) for name in means}
        for low_name in means:
            for high_name in means:
                order = ["low", "average", "high"]
                if order.index(level[low_name]) < order.index(level[high_name]):
                    assert means[low_name][axis] < means[high_name][axis], (word, low_name, high_name, means)


GATES = {"emotion": emotion_gate, "digits": digits_gate, "segmentation": segmentation_gate,
         "clustering": clustering_gate}


@pytest.mark.parametrize("task", list(GATES))
def test_committed_model_passes_its_quality_gate(client, task):
    GATES[task](client)


# ---- the gates fail on broken artefacts --------------------------------------------------------------

def _copy_models(root: Path) -> Path:
    models = root / "models"
    for task in ("digits", "emotion", "segmentation", "clustering"):
        version = committed_version(task)
        shutil.copytree(version, models / task / version.name)
    return models


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _swap(items: list, a: int, b: int) -> None:
    items[a], items[b] = items[b], items[a]


def test_every_gate_fails_on_a_broken_copy_of_its_model(tmp_path):
    models = _copy_models(tmp_path)
    emotion = models / "emotion" / committed_version("emotion").name / "metadata.json"
    _edit_json(emotion, lambda m: _swap(m["labels"], 1, 4))  # boredom <-> happiness
    segmentation = models / "segmentation" / committed_version("segmentation").name / "metadata.json"
    _edit_json(segmentation, lambda m: m["params"].__setitem__("threshold", 0.95))
    clustering = models / "clustering" / committed_version("clustering").name / "model.json"
    _edit_json(clustering, lambda m: _swap(m["segments"], 1, 3))  # two segment names swapped
    with running_server(workers=1, env={"MODELS_DIR": str(models)}) as live, \
            httpx.Client(base_url=live.base_url, timeout=60) as client:
        assert all(m["ready"] for m in client.get("/v1/models").json()["models"])
        # Digits takes its labels from code (0-9), not from the artefact: no label to swap in a copy.
        for task in ("emotion", "segmentation", "clustering"):
            with pytest.raises(AssertionError):
                GATES[task](client)
    assert MODELS.is_dir()  # the committed artefacts were not touched
