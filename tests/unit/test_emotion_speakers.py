"""bench/emotion_speakers.py's curve: each new speaker is scored by a model that never saw it, on
as many of its corpus's speakers as the curve says, and its UAR follows what the features carry."""

from __future__ import annotations

import numpy as np
import pytest

from bench import emotion_speakers as bench
from training import emotion as recipe

CORE = [recipe.LABELS.index(label) for label in recipe.CORE]


def synthetic(own_codes: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Two corpora of four speakers, 20 clips of each core class each. Features: the label
    one-hot, or (``own_codes``) one-hot in dimensions of the speaker's own, which say nothing
    about any other speaker; plus noise."""
    rng = np.random.default_rng(seed)
    features, labels, speakers, corpora = [], [], [], []
    for c, corpus in enumerate(("emodb", "nemo")):
        for s in range(4):
            offset = len(CORE) * (4 * c + s) if own_codes else 0
            for position, label in enumerate(CORE):
                for _ in range(20):
                    hot = np.zeros(len(CORE) * 8)
                    hot[offset + position] = 3.0
                    features.append(hot + rng.normal(0, 0.3, hot.size))
                    labels.append(label)
                    speakers.append(f"{corpus[0]}{s}")
                    corpora.append(corpus)
    return {"features": np.array(features), "labels": np.array(labels),
            "speakers": np.array(speakers), "corpora": np.array(corpora)}


def test_features_that_carry_the_label_give_a_new_speaker_full_recall():
    result = bench.speaker_curve(synthetic(False), "nemo", draws=2, seed=0)
    assert result["development_speakers"] == ["n0", "n1", "n2", "n3"]
    assert [point["speakers_trained_on"] for point in result["curve"]] == [1, 2, 3]
    # k = 1, 2: two of the three choices per new speaker; k = 3: the one choice there is
    assert [point["runs"] for point in result["curve"]] == [8, 8, 4]
    assert all(point["uar_mean"] > 0.95 for point in result["curve"])
    assert all(value > 0.95 for value in result["per_speaker"].values())


def test_a_new_speaker_is_never_in_its_own_training_set():
    """Each speaker's features are its own: a model that had seen the new speaker would read them;
    one that had not scores near chance (0.2)."""
    result = bench.speaker_curve(synthetic(True), "nemo", draws=3, seed=0)
    assert max(point["uar_mean"] for point in result["curve"]) < 0.5
    assert max(result["per_speaker"].values()) < 0.5


@pytest.mark.parametrize("corpus", ["emodb", "nemo"])
def test_the_other_corpus_alone_trains_a_model_for_the_first_point(corpus):
    data = synthetic(False)
    other = data["corpora"] != corpus
    new = data["speakers"] == f"{corpus[0]}0"
    assert bench.new_speaker_uar(data, other, new) > 0.95
