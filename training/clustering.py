"""Customer segmentation by K-means on the Mall Customers data (scikit-learn; no TensorFlow).

Reads top to bottom: arguments, data, scaling, elbow + silhouette over k, fit, evaluate, export.
The model is plain JSON (scaler mean/scale, centroids, feature names, segment names), served by
``app/tasks/clustering/model.py`` as a nearest-centroid lookup; no pickles on the serving path.

    cd /work/main && .venv-train/bin/python -m training.clustering
    .venv-train/bin/python -m training.clustering --features "Age" "Spending Score (1-100)" --version 1.1.0
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    calinski_harabasz_score,
    davies_bouldin_score,
    silhouette_samples,
    silhouette_score,
)

from app.monitoring.reference import build_reference  # noqa: E402
from app.tasks.clustering.preprocess import (  # noqa: E402
    KSelection,
    Scaler,
    count_distinct_rows,
    feature_key,
    nearest_centroid,
    one_thread,
    segment_names,
    select_k,
    summary_features,
)
from training.common import (  # noqa: E402
    MODELS_DIR,
    SHARED_DATA,
    Comparison,
    HeldOut,
    Stopwatch,
    model_dir,
    output_version,
    seed_everything,
    sha256_file,
    write_json,
    write_metadata,
)
from training.production import production_rows

DEFAULT_DATA = SHARED_DATA / "mall_customers" / "Mall_Customers.csv"
DEFAULT_FEATURES = ["Annual Income (k$)", "Spending Score (1-100)"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--features", nargs="+", default=DEFAULT_FEATURES, help="CSV columns to cluster on")
    p.add_argument("--k-min", type=int, default=2)
    p.add_argument("--k-max", type=int, default=10)
    p.add_argument("--n-init", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--version", default=None, help="default: the next free version; an existing one is refused")
    p.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    p.add_argument("--production-data", type=Path, default=None,
                   help="a /v1/monitoring/dataset export: its customer rows (labelled or not: K-means "
                        "needs no labels) join the fit")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    args.version = output_version("clustering", args.version, args.models_dir)
    watch = Stopwatch()
    seed_everything(args.seed)

    # --- data -------------------------------------------------------------------------------------
    frame = pd.read_csv(args.data)
    missing = [c for c in args.features if c not in frame.columns]
    if missing:
        raise SystemExit(f"columns {missing} not in {args.data} (has {list(frame.columns)})")
    features = [feature_key(c) for c in args.features]
    x = frame[args.features].to_numpy(dtype=np.float64)
    if not np.isfinite(x).all():
        raise SystemExit("the feature columns contain missing or non-finite values")
    if count_distinct_rows(x) <= args.k_max:
        raise SystemExit(f"need more than k_max={args.k_max} distinct rows")
    print(f"data: {args.data} ({len(x)} rows); features {dict(zip(features, args.features, strict=True))}")
    production = None
    if args.production_data is not None:
        x_prod, production = production_rows(args.production_data, features)
        x = np.concatenate([x, x_prod])
        print(f"production data: {production['used']} rows added ({production['skipped']} skipped)")

    # --- scale, scan k, fit ---------------------------------------------------------------------------
    scaler = Scaler.fit(x)
    z = scaler.transform(x)
    selection = select_k(z, k_min=args.k_min, k_max=args.k_max, seed=args.seed, n_init=args.n_init)
    for fit in selection.fits:
        print(f"k={fit.k:2d}  inertia={fit.inertia:9.3f}  silhouette={fit.silhouette:.4f}")
    chosen = selection.chosen
    print(f"chosen k={chosen.k} by {selection.method} (elbow at k={selection.elbow_k})")

    # --- evaluate --------------------------------------------------------------------------------------
    labels, distances = nearest_centroid(z, chosen.centers)
    assert (labels == chosen.labels).all(), "nearest-centroid labels differ from K-means labels"
    with one_thread():
        metrics = {
            "k": chosen.k,
            "inertia": chosen.inertia,
            "silhouette": chosen.silhouette,
            "calinski_harabasz": float(calinski_harabasz_score(z, labels)),
            "davies_bouldin": float(davies_bouldin_score(z, labels)),
            "elbow_k": selection.elbow_k,
            "elbow": [{"k": f.k, "inertia": f.inertia} for f in selection.fits],
            "silhouette_by_k": [{"k": f.k, "silhouette": f.silhouette} for f in selection.fits],
        }
    centroids = scaler.inverse_transform(chosen.centers)
    names = segment_names(centroids, x.mean(axis=0), x.std(axis=0), features)
    sizes = np.bincount(labels, minlength=chosen.k)
    metrics["segments"] = [{"cluster": i, "segment": names[i], "size": int(sizes[i]),
                            "centroid": dict(zip(features, map(float, centroids[i]), strict=True))}
                           for i in range(chosen.k)]
    for seg in metrics["segments"]:
        print(f"  cluster {seg['cluster']}: {seg['segment']:<36} n={seg['size']:3d}  {seg['centroid']}")
    print(f"silhouette {metrics['silhouette']:.4f}  Calinski-Harabasz {metrics['calinski_harabasz']:.1f}  "
          f"Davies-Bouldin {metrics['davies_bouldin']:.4f}")

    # --- export ----------------------------------------------------------------------------------------
    out = model_dir("clustering", args.version, args.models_dir)
    model = {
        "format": "kmeans-nearest-centroid/1",
        "features": features,
        "columns": list(args.features),
        "scaler": {"mean": scaler.mean.tolist(), "scale": scaler.scale.tolist()},
        "centroids_scaled": chosen.centers.tolist(),
        "centroids": centroids.tolist(),
        "segments": names,
    }
    write_json(out / "model.json", model)
    write_metadata(
        out,
        name="clustering",
        task="clustering",
        version=args.version,
        description=f"K-means customer segments ({chosen.k} clusters) on "
                    f"{', '.join(features)} of the Mall Customers data, standard-scaled.",
        artifact={"file": "model.json", "format": model["format"], "sha256": sha256_file(out / "model.json"),
                  "bytes": (out / "model.json").stat().st_size},
        data={"path": "../shared/data/mall_customers/Mall_Customers.csv", "sha256": sha256_file(args.data),
              "rows": len(x), "production": production},
        input={"type": "object", "features": features, "columns": list(args.features),
               "units": "original (unscaled) values, as in the CSV columns"},
        output={"cluster": "int index into labels", "segment": "segment name", "distance":
                "Euclidean distance to the nearest centroid in the standard-scaled space",
                "distances": "distances to every centroid, same space"},
        labels=names,
        metrics=metrics,
        params={"features": features, "columns": list(args.features), "k_min": args.k_min,
                "k_max": args.k_max, "selection": selection.method, "init": "k-means++",
                "n_init": args.n_init, "seed": args.seed,
                "scaler": {"kind": "standard", "mean": scaler.mean.tolist(),
                           "scale": scaler.scale.tolist()}},
        training={"seed": args.seed, "epochs": None, "duration_s": watch.seconds},
    )
    # Unsupervised: there is no held-out set to keep apart, so the reference is the training rows.
    rows = [summary_features(dict(zip(features, r, strict=True))) for r in x.tolist()]
    reference = build_reference({f: [r[f] for r in rows] for f in features},
                                [names[i] for i in labels], names,
                                source=f"{args.data.name}: all {len(x)} training rows", seed=args.seed)
    write_json(out / "reference.json", reference)
    write_json(out / "report" / "metrics.json", metrics)
    write_report(out / "report", selection, x, labels, centroids, names, features, args.features, z)
    print(f"wrote {out} in {watch.seconds}s")


def write_report(report: Path, selection: KSelection, x: np.ndarray, labels: np.ndarray,
                 centroids: np.ndarray, names: list[str], features: list[str], columns: list[str],
                 z: np.ndarray) -> None:
    """elbow.png, silhouette.png (by k, and per sample for the chosen k), segments.png."""
    ks = [f.k for f in selection.fits]
    chosen_k = selection.chosen.k

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, [f.inertia for f in selection.fits], "o-")
    if selection.elbow_k is not None:
        ax.axvline(selection.elbow_k, color="grey", ls="--", label=f"elbow k={selection.elbow_k}")
    ax.set(xlabel="k", ylabel="inertia (scaled space)", title="Elbow method", xticks=ks)
    ax.legend()
    fig.tight_layout()
    fig.savefig(report / "elbow.png", dpi=100)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(ks, [f.silhouette for f in selection.fits], "o-")
    left.axvline(chosen_k, color="tab:red", ls="--", label=f"chosen k={chosen_k}")
    left.set(xlabel="k", ylabel="mean silhouette", title="Silhouette by k", xticks=ks)
    left.legend()
    with one_thread():
        values = silhouette_samples(z, labels)
    y = 0
    for c in range(chosen_k):
        v = np.sort(values[labels == c])
        right.fill_betweenx(np.arange(y, y + len(v)), 0, v, alpha=0.7, label=names[c])
        y += len(v) + 5
    right.axvline(values.mean(), color="tab:red", ls="--")
    right.set(xlabel="silhouette", yticks=[], title=f"Silhouette per sample (k={chosen_k})")
    right.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(report / "silhouette.png", dpi=100)
    plt.close(fig)

    # The first two features (a single feature is drawn along a line).
    xy = x[:, :2] if x.shape[1] > 1 else np.column_stack([x[:, 0], np.zeros(len(x))])
    cxy = centroids[:, :2] if x.shape[1] > 1 else np.column_stack([centroids[:, 0], np.zeros(len(centroids))])
    fig, ax = plt.subplots(figsize=(7, 5))
    for c in range(chosen_k):
        ax.scatter(xy[labels == c, 0], xy[labels == c, 1], s=18, label=names[c])
    ax.scatter(cxy[:, 0], cxy[:, 1], marker="X", s=160, c="black", label="centroids")
    ax.set(xlabel=columns[0], ylabel=columns[1] if len(columns) > 1 else features[0],
           title=f"Segments (k={chosen_k})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(report / "segments.png", dpi=100)
    plt.close(fig)


# ---- the evaluation gate (training.compare) ---------------------------------------------------
def compare_sets(baseline: Any, candidate: Any, production: Path | None, limit: int) -> list[HeldOut]:
    """The Mall customers (the training data: clustering has no labels) and, with an export, its
    rows: the silhouette of each version's segments."""
    if baseline.features != candidate.features:
        raise SystemExit(f"the versions cluster different features ({baseline.features} vs "
                         f"{candidate.features}); their silhouettes are not comparable")
    columns = baseline.metadata.get("input", {}).get("columns") or baseline.features
    with open(DEFAULT_DATA, newline="") as f:
        table = [[float(row[c]) for c in columns] for row in csv.DictReader(f)]
    sets = [("Mall customers (in-sample: the training data)", np.asarray(table, dtype=np.float64))]
    if production is not None:
        rows, _ = production_rows(production, baseline.features)
        sets.append(("production rows", rows))
    return [HeldOut(name, len(x), lambda m, x=x: silhouette(m, x)) for name, x in sets]


def silhouette(model: Any, x: np.ndarray) -> float:
    labels = model.predict(x).labels
    if len(x) < 3 or len(set(labels.tolist())) < 2:
        return float("nan")
    return float(silhouette_score(model.scaler.transform(x), labels))


COMPARISON = Comparison("silhouette", 0.02, compare_sets)


if __name__ == "__main__":
    main()
