"""Reads over the prediction log: drift reports, live accuracy, feedback, time series.

Everything here queries the database, never one process's memory, so a report covers every worker
and every instance that shares ``DATABASE_URL``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import Engine, and_, func, select
from sqlalchemy.exc import IntegrityError

from app.core.registry import ServedModel
from app.monitoring import drift
from app.monitoring.drift import MAX_WINDOW_COUNT, Window
from app.monitoring.metrics import DRIFT_DETECTED, DRIFT_SCORE
from app.monitoring.store import as_utc, feedback, predictions, shadow_predictions, utcnow

TIMELINE_MAX_ROWS = 10_000


@dataclass
class WindowRows:
    created_at: list[datetime]
    request_ids: list[str]
    instances: list[int]
    latency_ms: list[float]
    predictions: list[str]
    features: dict[str, list[float | None]]
    client_versions: list[str | None]

    @property
    def n(self) -> int:
        return len(self.predictions)


ANY_CLIENT = object()  # no filter on the client's release (None filters the rows without one)


def window_rows(engine: Engine, model: str, window: Window, *, version: str | None = None,
                limit: int = drift.MAX_WINDOW_COUNT, feature_names: Sequence[str] | None = None,
                drift_only: bool = False, client_version: Any = ANY_CLIENT) -> WindowRows:
    """The window's rows of ``model`` (newest first in the query, returned oldest first).

    With ``feature_names`` (a reference's features) the database extracts those values from the
    JSON column itself, as floats, rather than decoding every row's JSON in Python, which would take
    much of a large report's time. Without, every feature found in the rows is read. ``drift_only`` leaves out what
    a drift report does not read (request ids, instances and latencies come back empty).
    ``client_version`` keeps the rows of one client release (X-Client-Version) only."""
    cols = [predictions.c.created_at, predictions.c.prediction, predictions.c.client_version]
    if not drift_only:
        cols += [predictions.c.request_id, predictions.c.instance, predictions.c.latency_ms]
    first_feature = len(cols)
    if feature_names is None:
        cols.append(predictions.c.features)
    else:
        cols += [predictions.c.features[name].as_float().label(f"feature_{i}")
                 for i, name in enumerate(feature_names)]
    query = select(*cols).where(predictions.c.model == model)
    if version is not None:
        query = query.where(predictions.c.version == version)
    if client_version is not ANY_CLIENT:
        query = query.where(predictions.c.client_version.is_(None) if client_version is None
                            else predictions.c.client_version == client_version)
    if window.seconds is not None:
        # Newest first by time, so the (model, created_at) index is read from the cutoff on; by id,
        # PostgreSQL walks the primary key back through the whole table looking for more rows.
        query = (query.where(predictions.c.created_at >= utcnow() - window.since)
                 .order_by(predictions.c.created_at.desc()))
    else:
        query = query.order_by(predictions.c.id.desc())
    query = query.limit(min(window.count or limit, limit))
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    rows.reverse()
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in cols]
    if feature_names is None:
        blobs = columns[first_feature]
        names: list[str] = sorted({k for blob in blobs for k in (blob or {})})
        features = {name: [(blob or {}).get(name) for blob in blobs] for name in names}
    else:
        features = {name: list(columns[first_feature + i]) for i, name in enumerate(feature_names)}
    return WindowRows(
        created_at=[as_utc(t) for t in columns[0]],
        predictions=list(columns[1]),
        client_versions=list(columns[2]),
        request_ids=[] if drift_only else list(columns[3]),
        instances=[] if drift_only else list(columns[4]),
        latency_ms=[] if drift_only else list(columns[5]),
        features=features,
    )


def reference_features(model: ServedModel) -> list[str] | None:
    """The features a model's drift reference has (what a drift report reads), if it has one."""
    reference = model.reference or {}
    return sorted(reference["features"]) if reference.get("features") else None


def model_drift_report(engine: Engine, model: ServedModel, window: Window, *, min_samples: int,
                       rows: WindowRows | None = None, client_version: Any = ANY_CLIENT) -> dict[str, Any]:
    """Drift of the model's current version over the window, and the client releases the window
    holds; for one release when ``client_version`` is given (the gauges follow the pooled report)."""
    if rows is None:
        rows = window_rows(engine, model.task, window, version=model.version,
                           feature_names=reference_features(model), drift_only=True,
                           client_version=client_version)
    report = drift.model_drift(model.reference, rows.features, rows.predictions, min_samples=min_samples)
    if client_version is ANY_CLIENT:
        update_gauges(model.task, report)
    releases = Counter(rows.client_versions)
    return {"model": model.task, "version": model.version, "window": window.describe(),
            **({} if client_version is ANY_CLIENT else {"client_version": client_version}),
            "client_versions": [{"client_version": v, "n": n} for v, n in releases.most_common()],
            "from": rows.created_at[0].isoformat() if rows.n else None,
            "to": rows.created_at[-1].isoformat() if rows.n else None, **report}


def drift_report(engine: Engine, models: Iterable[ServedModel], window: Window, *,
                 min_samples: int, client_version: Any = ANY_CLIENT) -> dict[str, Any]:
    return {"generated_at": utcnow().isoformat(timespec="seconds"), "window": window.describe(),
            "min_samples": min_samples, "thresholds": drift.THRESHOLDS,
            "models": [model_drift_report(engine, m, window, min_samples=min_samples,
                                          client_version=client_version) for m in models]}


def update_gauges(model: str, report: dict[str, Any]) -> None:
    if report.get("drift_score") is not None:
        DRIFT_SCORE.labels(model).set(report["drift_score"])
    if report.get("status") in (drift.OK, drift.WARNING, drift.DRIFT, drift.INSUFFICIENT):
        DRIFT_DETECTED.labels(model).set(1.0 if report["status"] == drift.DRIFT else 0.0)


# ---- feedback and accuracy --------------------------------------------------------------------
def prediction_of(engine: Engine, request_id: str, instance: int | None = None) -> list[Any]:
    """The logged rows of ``request_id`` (one instance when given)."""
    query = select(predictions.c.instance, predictions.c.model, predictions.c.version,
                   predictions.c.prediction).where(predictions.c.request_id == request_id)
    if instance is not None:
        query = query.where(predictions.c.instance == instance)
    with engine.connect() as conn:
        return list(conn.execute(query.order_by(predictions.c.instance)).all())


def record_feedback(engine: Engine, request_id: str, instance: int, label: str) -> str | None:
    """Upsert the ground-truth label of one instance; returns the label it replaced, if any."""
    where = and_(feedback.c.request_id == request_id, feedback.c.instance == instance)

    def upsert() -> str | None:
        with engine.begin() as conn:
            previous = conn.execute(select(feedback.c.label).where(where)).scalar_one_or_none()
            if previous is None:
                conn.execute(feedback.insert().values(created_at=utcnow(), request_id=request_id,
                                                      instance=instance, label=label))
            else:
                conn.execute(feedback.update().where(where).values(label=label, created_at=utcnow()))
            return previous

    try:
        return upsert()
    except IntegrityError:  # a concurrent insert of the same key won: ours becomes an update
        return upsert()


def list_feedback(engine: Engine, model: str | None, limit: int) -> list[dict[str, Any]]:
    query = (select(feedback.c.created_at, feedback.c.request_id, feedback.c.instance, feedback.c.label,
                    predictions.c.model, predictions.c.version, predictions.c.prediction,
                    predictions.c.confidence)
             .join(predictions, and_(predictions.c.request_id == feedback.c.request_id,
                                     predictions.c.instance == feedback.c.instance)))
    if model:
        query = query.where(predictions.c.model == model)
    query = query.order_by(feedback.c.id.desc()).limit(limit)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [{"created_at": as_utc(r.created_at).isoformat(), "request_id": r.request_id,
             "index": r.instance, "label": r.label, "model": r.model, "version": r.version,
             "prediction": r.prediction, "confidence": r.confidence,
             "correct": r.prediction == r.label} for r in rows]


def accuracy(engine: Engine, model: str, window: Window, client_version: Any = ANY_CLIENT) -> dict[str, Any]:
    """Live accuracy of ``model`` over the window's labelled predictions (by count: the last N
    predictions that have feedback; by time: predictions made within the duration), of one client
    release when ``client_version`` is given."""
    query = (select(predictions.c.prediction, feedback.c.label, predictions.c.version,
                    predictions.c.client_version)
             .join(feedback, and_(predictions.c.request_id == feedback.c.request_id,
                                  predictions.c.instance == feedback.c.instance))
             .where(predictions.c.model == model))
    if client_version is not ANY_CLIENT:
        query = query.where(predictions.c.client_version.is_(None) if client_version is None
                            else predictions.c.client_version == client_version)
    if window.seconds is not None:  # by time on the (model, created_at) index, as in window_rows
        query = (query.where(predictions.c.created_at >= utcnow() - window.since)
                 .order_by(predictions.c.created_at.desc()))
    else:
        query = query.order_by(predictions.c.id.desc())
    query = query.limit(window.count or drift.MAX_WINDOW_COUNT)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    labelled = len(rows)
    correct = sum(1 for r in rows if r.prediction == r.label)
    per_class: dict[str, dict[str, int]] = {}
    for r in rows:
        entry = per_class.setdefault(r.label, {"labelled": 0, "correct": 0})
        entry["labelled"] += 1
        entry["correct"] += int(r.prediction == r.label)
    return {"model": model, "window": window.describe(), "labelled": labelled, "correct": correct,
            "accuracy": round(correct / labelled, 6) if labelled else None,
            **({} if client_version is ANY_CLIENT else {"client_version": client_version}),
            "client_versions": [{"client_version": v, "n": n}
                                for v, n in Counter(r.client_version for r in rows).most_common()],
            "versions": sorted({r.version for r in rows}),
            "per_class": {k: {**v, "accuracy": round(v["correct"] / v["labelled"], 6)}
                          for k, v in sorted(per_class.items())}}


def count_predictions(engine: Engine, model: str | None = None) -> int:
    query = select(func.count()).select_from(predictions)
    if model:
        query = query.where(predictions.c.model == model)
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


# ---- time series for the dashboard ------------------------------------------------------------
def timeline(engine: Engine, model: ServedModel, window: Window, *, buckets: int = 24,
             min_samples: int = 30) -> dict[str, Any]:
    """Per time bucket over the window: predictions/min, request latency p50/p95, largest PSI."""
    rows = window_rows(engine, model.task, window, limit=TIMELINE_MAX_ROWS,
                       feature_names=reference_features(model))
    if rows.n == 0:
        return {"start": [], "throughput_per_min": [], "latency_p50_ms": [], "latency_p95_ms": [],
                "drift_score": []}
    t = np.array([c.timestamp() for c in rows.created_at])
    lo, hi = float(t.min()), float(t.max())
    width = max((hi - lo) / buckets, 1.0)
    n_buckets = max(1, min(buckets, int(np.ceil((hi - lo) / width)) or 1))
    which = np.minimum(((t - lo) / width).astype(int), n_buckets - 1)
    first_instance = np.array(rows.instances) == 0  # one latency per request, not per instance
    latency = np.array(rows.latency_ms, dtype=np.float64)
    out: dict[str, list[Any]] = {"start": [], "throughput_per_min": [], "latency_p50_ms": [],
                                 "latency_p95_ms": [], "drift_score": []}
    for b in range(n_buckets):
        members = which == b
        lat = latency[members & first_instance]
        out["start"].append(datetime.fromtimestamp(lo + b * width, tz=as_utc(rows.created_at[0]).tzinfo)
                            .isoformat(timespec="seconds"))
        out["throughput_per_min"].append(round(float(members.sum()) / (width / 60.0), 3))
        out["latency_p50_ms"].append(round(float(np.percentile(lat, 50)), 3) if lat.size else None)
        out["latency_p95_ms"].append(round(float(np.percentile(lat, 95)), 3) if lat.size else None)
        score = None
        if model.reference is not None and members.sum() >= min_samples:
            idx = np.flatnonzero(members)
            score = drift.max_feature_psi(model.reference,
                                          {k: [v[i] for i in idx] for k, v in rows.features.items()})
        out["drift_score"].append(score)
    return out


def feature_values(rows: WindowRows, name: str) -> Sequence[float]:
    return [v for v in rows.features.get(name, []) if v is not None]


def shadow_report(engine: Engine, model: str, window: Window, shadow_version: str | None) -> dict[str, Any]:
    """Pairs (primary row, shadow row) of the same request and instance, newest first."""
    if shadow_version is None:  # none configured now: the most recent one logged
        with engine.connect() as conn:
            shadow_version = conn.execute(
                select(shadow_predictions.c.version).where(shadow_predictions.c.model == model)
                .order_by(shadow_predictions.c.id.desc()).limit(1)).scalar()
    query = (select(predictions.c.version, predictions.c.prediction,
                    shadow_predictions.c.prediction.label("shadow_prediction"), feedback.c.label)
             .join(predictions, and_(predictions.c.request_id == shadow_predictions.c.request_id,
                                     predictions.c.instance == shadow_predictions.c.instance,
                                     predictions.c.model == shadow_predictions.c.model))
             .outerjoin(feedback, and_(feedback.c.request_id == shadow_predictions.c.request_id,
                                       feedback.c.instance == shadow_predictions.c.instance))
             .where(shadow_predictions.c.model == model, shadow_predictions.c.version == shadow_version))
    if window.seconds is not None:
        query = (query.where(shadow_predictions.c.created_at >= utcnow() - window.since)
                 .order_by(shadow_predictions.c.created_at.desc()))
    else:
        query = query.order_by(shadow_predictions.c.id.desc())
    query = query.limit(window.count or MAX_WINDOW_COUNT)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    n = len(rows)
    labelled = [r for r in rows if r.label is not None]
    versions = sorted({r.version for r in rows})

    def score(version: str | None, column: str) -> dict[str, Any]:
        correct = sum(1 for r in labelled if getattr(r, column) == r.label)
        return {"version": version, "n": n, "labelled": len(labelled),
                "accuracy": round(correct / len(labelled), 6) if labelled else None}

    agreement = sum(1 for r in rows if r.prediction == r.shadow_prediction) / n if n else None
    return {"model": model, "window": window.describe(), "n": n,
            "agreement": round(agreement, 6) if agreement is not None else None,
            "primary": score(", ".join(versions) or None, "prediction"),
            "shadow": score(shadow_version, "shadow_prediction")}
