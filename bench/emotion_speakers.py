"""How the emotion recipe does on a new speaker as it is trained on more speakers, measured on the
development speakers only: the speakers that ``training/emotion.py`` holds out (EmoDB 03 and 16,
nEMO KD0 and SM0) and the RAVDESS subset are dropped before anything is computed.

    make var/Resemblyzer-0.1.4-py3-none-any.whl      # --encoder whisper: make speech-encoder
    .venv-train/bin/python -m bench.emotion_speakers [--encoder ge2e|whisper] [--draws 4]

- Clips: every development clip of EmoDB and nEMO of the five classes both corpora share (anger,
  fear, happiness, neutral, sadness), clean, cut to its speech span as ``training/emotion.py``
  loads it.
- Features: the encoder of ``training/emotion.py`` (``ENCODERS``, as LiteRT runs it) on each 3 s
  window; a clip's features are the mean over its windows.
- Model: ``training/emotion.py``'s head (standardisation, logistic regression with C 0.03, each
  (corpus, class) weighted equally); no channel copies, no temperature.
- For each corpus, each of its development speakers in turn is the new speaker: the model is
  trained on the other corpus's development speakers and on ``k`` of this corpus's other speakers
  (``k`` = 1 to all of them; for each ``k`` up to ``--draws`` random choices of which), and scored
  on the new speaker: unweighted average recall (UAR) over the five classes. The curve is the mean
  over new speakers and draws; ``per_speaker`` is each new speaker's UAR with all the others.

Writes ``bench/results/emotion_speakers-<encoder>.json``.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np

from bench.common import REPO_ROOT, SHARED_DATA, write_results
from training import emotion as recipe

HEAD_C = 0.03


def development_features(encoder: str, workers: int) -> dict[str, np.ndarray]:
    """Clip features, labels, speakers and corpora of the development clips of the shared classes."""
    spec = recipe.ENCODERS[encoder]
    clips = recipe.load_emodb(SHARED_DATA / "emodb" / "wav") + recipe.load_nemo(SHARED_DATA / "nemo")
    core = {recipe.LABELS.index(label) for label in recipe.CORE}
    clips = [c for c in clips if c["speaker"] not in recipe.HELD_OUT[c["corpus"]] and c["label"] in core]
    windows, _, owner = recipe.windows_of(clips, 0, 0, spec.features, workers)
    path = REPO_ROOT / "var" / f"emotion-speakers-{encoder}.tflite"
    path.parent.mkdir(exist_ok=True)
    window_features = spec.runner(spec.module.load_weights(), path, workers).run(windows)
    return {"features": np.stack([window_features[owner == i].mean(axis=0) for i in range(len(clips))]),
            "labels": np.array([c["label"] for c in clips]),
            "speakers": np.array([c["speaker"] for c in clips]),
            "corpora": np.array([c["corpus"] for c in clips])}


def new_speaker_uar(data: dict[str, np.ndarray], train: np.ndarray, test: np.ndarray) -> float:
    """UAR on ``test`` of the head fitted on ``train`` (boolean masks over the clips)."""
    features, labels = data["features"], data["labels"]
    weights = recipe.group_weights(data["corpora"][train], labels[train])
    head = recipe.fit_head(features[train], labels[train], weights, len(recipe.LABELS), HEAD_C)
    return recipe.scores(labels[test], recipe.head_probabilities(head, features[test]), recipe.LABELS)["uar"]


def speaker_curve(data: dict[str, np.ndarray], corpus: str, draws: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    in_corpus = data["corpora"] == corpus
    speakers = sorted(str(s) for s in set(data["speakers"][in_corpus]))
    curve = []
    for k in range(1, len(speakers)):
        values = []
        for new in speakers:
            choices = list(itertools.combinations([s for s in speakers if s != new], k))
            for pick in rng.permutation(len(choices))[:draws]:
                train = ~in_corpus | np.isin(data["speakers"], choices[pick])
                values.append(new_speaker_uar(data, train, data["speakers"] == new))
        curve.append({"speakers_trained_on": k, "uar_mean": round(float(np.mean(values)), 4),
                      "uar_sd": round(float(np.std(values)), 4), "runs": len(values)})
        print(f"{corpus}: {k} of its speakers in training, new-speaker UAR {curve[-1]['uar_mean']:.3f} "
              f"(sd {curve[-1]['uar_sd']:.3f}, {len(values)} runs)", flush=True)
    per_speaker = {new: round(new_speaker_uar(data, data["speakers"] != new, data["speakers"] == new), 4)
                   for new in speakers}
    print(f"{corpus}: each speaker new, trained on all others: {per_speaker}", flush=True)
    return {"development_speakers": speakers, "clips": int(in_corpus.sum()), "curve": curve,
            "per_speaker": per_speaker}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", choices=sorted(recipe.ENCODERS), default="ge2e")
    parser.add_argument("--draws", type=int, default=4, help="speaker choices per (new speaker, k)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    data = development_features(args.encoder, args.workers)
    print(f"{len(data['labels'])} development clips [{time.perf_counter() - started:.0f}s]", flush=True)
    corpora = {corpus: speaker_curve(data, corpus, args.draws, args.seed) for corpus in ("nemo", "emodb")}
    write_results(f"emotion_speakers-{args.encoder}", {
        "encoder": recipe.ENCODERS[args.encoder].summary, "classes": list(recipe.CORE),
        "head_c": HEAD_C, "draws": args.draws, "seed": args.seed,
        "held_out_dropped": {c: list(s) for c, s in recipe.HELD_OUT.items()},
        "corpora": corpora, "seconds": round(time.perf_counter() - started)})


if __name__ == "__main__":
    main()
