"""Drift statistics: pure functions over numpy arrays and a model's ``reference.json``.

Each numeric summary feature of a window of recent predictions is compared with the reference
distribution saved at training time (see :mod:`app.monitoring.reference`), and the predicted-class
distribution with the reference prior. Thresholds (documented in docs/monitoring.md):

=====================  ===========================  ==========================
test                   warning                      drift
=====================  ===========================  ==========================
PSI (feature)          PSI >= 0.1 and beyond        PSI >= 0.2 and beyond
                       chance at p 0.01             chance at p 0.001
KS two-sample          --                           p < 0.001 and D >= 0.1
chi-squared (classes)  p < 0.05                     p < 0.01
=====================  ===========================  ==========================

A feature's status is the worse of its PSI and KS verdicts; a model's status is the worst of its
features' and its class distribution's, or ``insufficient_data`` when the window holds fewer than
``DRIFT_MIN_SAMPLES`` predictions. The KS test alone never warns: with thousands of reference values
it finds tiny, harmless differences "significant", so it also needs an effect of D >= 0.1.

Small windows must not raise false alarms (a window of 30 from the very distribution of the
reference gave PSI 0.3-1.9 before; tests/unit/test_drift_false_alarms.py): bin counts are smoothed
(Jeffreys, half a count per bin) instead of floored, a PSI threshold is raised to what chance alone
reaches at these sample sizes (PSI ~ chi2(bins - 1) x (1/n_ref + 1/n_current) under no drift), every
p-value is divided among the features tested together (Bonferroni), and the class distribution is
compared with the reference's counts (a test of homogeneity: the reference is a sample too).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
from scipy import stats

PSI_WARNING = 0.1
PSI_DRIFT = 0.2
KS_PVALUE = 0.001
# Significance of a feature's shift beyond chance, shared among the model's features: drift is an
# alert (a rolling window is judged again every minute), so at most ~0.1 % of windows of unchanged
# data may raise it.
FEATURE_PVALUE_DRIFT = 0.001
FEATURE_PVALUE_WARNING = 0.01
KS_MIN_STATISTIC = 0.1
CHI2_PVALUE_DRIFT = 0.01
CHI2_PVALUE_WARNING = 0.05
PSI_EPSILON = 1e-4  # floor on bin proportions so an empty bin gives a large, finite PSI
CHI2_MIN_EXPECTED = 5.0  # classes expected fewer times than this are pooled (chi2 approximation)

OK, WARNING, DRIFT, INSUFFICIENT, NO_REFERENCE = "ok", "warning", "drift", "insufficient_data", "no_reference"
_SEVERITY = {OK: 0, WARNING: 1, DRIFT: 2}

THRESHOLDS: dict[str, Any] = {
    "psi": {"warning": PSI_WARNING, "drift": PSI_DRIFT},
    "ks": {"pvalue_below": KS_PVALUE, "min_statistic": KS_MIN_STATISTIC},
    "feature_pvalue": {"warning": FEATURE_PVALUE_WARNING, "drift": FEATURE_PVALUE_DRIFT,
                       "shared_among_features": True},
    "chi2": {"warning_pvalue_below": CHI2_PVALUE_WARNING, "drift_pvalue_below": CHI2_PVALUE_DRIFT},
}


def worst(statuses: Sequence[str]) -> str:
    """The most severe of ``ok``/``warning``/``drift`` (``ok`` for none)."""
    return max(statuses, key=lambda s: _SEVERITY.get(s, 0), default=OK)


def psi(reference: np.ndarray | Sequence[float], current: np.ndarray | Sequence[float],
        bin_edges: Sequence[float], *, epsilon: float = PSI_EPSILON) -> float:
    """Population stability index of ``current`` against ``reference`` over ``bin_edges``.

    ``PSI = sum((p_cur - p_ref) * ln(p_cur / p_ref))`` with proportions floored at ``epsilon``.
    The outer bins are open, so values outside the reference range land in the first/last bin.
    """
    return psi_from_proportions(bin_proportions(reference, bin_edges),
                                bin_proportions(current, bin_edges), epsilon=epsilon)


def bin_proportions(values: np.ndarray | Sequence[float], bin_edges: Sequence[float]) -> np.ndarray:
    """Share of ``values`` in each bin of ``bin_edges`` (outer bins open-ended)."""
    arr = _finite(values)
    edges = np.asarray(bin_edges, dtype=np.float64)
    if edges.size == 0:
        raise ValueError("bin_edges is empty")
    if edges.size == 1:  # a constant reference feature: below, at, and above the constant
        inner = np.array([edges[0], np.nextafter(edges[0], np.inf)])
    elif edges.size == 2:  # two distinct values: below the upper one, and at/above it
        inner = edges[1:]
    else:
        inner = edges[1:-1]
    counts = np.bincount(np.searchsorted(inner, arr, side="right"), minlength=inner.size + 1)
    return counts / max(arr.size, 1)


def psi_from_proportions(expected: np.ndarray, actual: np.ndarray, *,
                         epsilon: float = PSI_EPSILON) -> float:
    e = np.clip(np.asarray(expected, dtype=np.float64), epsilon, None)
    a = np.clip(np.asarray(actual, dtype=np.float64), epsilon, None)
    return float(np.sum((a - e) * np.log(a / e)))


KS_EXACT_MAX_PAIRS = 1_000_000  # reference x window sizes; a window of 500 against 2 000 stays exact


def ks(reference_sample: np.ndarray | Sequence[float],
       current: np.ndarray | Sequence[float]) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic D and p-value: the exact p-value for small samples,
    the asymptotic one beyond ``KS_EXACT_MAX_PAIRS`` (scipy's default is exact up to 10 000 values
    a side: 0.17 s per feature for 2 000 x 6 667, where the asymptotic p-value is as good)."""
    ref, cur = _finite(reference_sample), _finite(current)
    method = "asymp" if ref.size * cur.size > KS_EXACT_MAX_PAIRS else "auto"
    result = stats.ks_2samp(ref, cur, method=method)
    return float(result.statistic), float(result.pvalue)


def psi_status(value: float) -> str:
    return DRIFT if value >= PSI_DRIFT else WARNING if value >= PSI_WARNING else OK


def ks_status(statistic: float, pvalue: float, tests: int = 1) -> str:
    return DRIFT if pvalue < KS_PVALUE / tests and statistic >= KS_MIN_STATISTIC else OK


def chi2_status(pvalue: float | None) -> str:
    if pvalue is None:
        return OK
    return DRIFT if pvalue < CHI2_PVALUE_DRIFT else WARNING if pvalue < CHI2_PVALUE_WARNING else OK


def psi_thresholds(n_reference: float, n_current: float, bins: int, tests: int = 1) -> tuple[float, float]:
    """(warning, drift) PSI thresholds for these sample sizes: the fixed ones, raised to the PSI that
    chance alone exceeds with probability 1 % / 0.1 % (over ``tests`` features) when nothing drifted."""
    scale = 1.0 / max(n_reference, 1.0) + 1.0 / max(n_current, 1.0)
    dof = max(bins - 1, 1)
    chance = [float(stats.chi2.ppf(1.0 - p / tests, dof)) * scale
              for p in (FEATURE_PVALUE_WARNING, FEATURE_PVALUE_DRIFT)]
    return max(PSI_WARNING, chance[0]), max(PSI_DRIFT, chance[1])


def _smoothed(proportions: np.ndarray, n: float) -> np.ndarray:
    """Bin shares with half a count added per bin (Jeffreys): an empty bin in a small window is
    evidence of little, not a near-zero share with a huge log-ratio."""
    return (proportions * n + 0.5) / (n + 0.5 * proportions.size)


def feature_drift(reference: Mapping[str, Any], current: np.ndarray | Sequence[float], *,
                  tests: int = 1) -> dict[str, Any]:
    """PSI and KS of one numeric feature against its ``reference.json`` entry; ``tests`` is how many
    features are judged together (their p-values share the significance level)."""
    values = _finite(current)
    sample = np.asarray(reference.get("sample") or [], dtype=np.float64)
    edges = reference.get("bin_edges") or [reference.get("min", 0.0), reference.get("max", 0.0)]
    out: dict[str, Any] = {"n": int(values.size), "reference_mean": reference.get("mean"),
                           "current_mean": float(values.mean()) if values.size else None}
    if values.size == 0:
        return {**out, "psi": None, "ks_statistic": None, "ks_pvalue": None, "status": INSUFFICIENT}
    n_reference = float(sample.size or reference.get("n") or 1000)
    expected = _smoothed(_reference_proportions(sample, edges), n_reference)
    actual = _smoothed(bin_proportions(values, edges), float(values.size))
    value = psi_from_proportions(expected, actual)
    warning_at, drift_at = psi_thresholds(n_reference, values.size, expected.size, tests)
    out["psi"] = round(value, 6)
    out["psi_drift_threshold"] = round(drift_at, 6)
    status = DRIFT if value >= drift_at else WARNING if value >= warning_at else OK
    if sample.size:
        statistic, pvalue = ks(sample, values)
        out["ks_statistic"], out["ks_pvalue"] = round(statistic, 6), pvalue
        status = worst([status, ks_status(statistic, pvalue, tests)])
    else:
        out["ks_statistic"] = out["ks_pvalue"] = None
    out["status"] = status
    return out


def class_drift(reference: Mapping[str, Any], predictions: Sequence[str]) -> dict[str, Any]:
    """Chi-squared test that the window's predicted classes come from the reference's distribution
    (homogeneity of the two samples' counts: the reference is a sample too), plus PSI.

    Labels the reference never predicted (prior 0) and labels it does not know get a small prior
    by additive smoothing (half a count over the reference's ``n``), so one unexpected class raises
    the statistic instead of dividing by zero. Classes expected fewer than 5 times are pooled into
    one cell, the usual condition for the chi-squared approximation; with fewer than two cells
    left there is nothing to test (status ``ok``, p-value ``None``).
    """
    labels = [str(label) for label in reference.get("labels") or reference.get("prior", {}).keys()]
    seen = [str(p) for p in predictions]
    labels += sorted(set(seen) - set(labels))
    counts = np.array([sum(1 for p in seen if p == label) for label in labels], dtype=np.float64)
    n = float(counts.sum())
    prior = reference.get("prior", {})
    ref_n = float(reference.get("n") or 1000)
    raw = np.array([float(prior.get(label, 0.0)) for label in labels]) * ref_n + 0.5
    smoothed = raw / raw.sum()
    current = counts / n if n else counts
    out: dict[str, Any] = {
        "n": int(n),
        "reference": {label: round(float(p), 6) for label, p in zip(labels, smoothed)},
        "current": {label: round(float(p), 6) for label, p in zip(labels, current)},
        "psi": round(psi_from_proportions(smoothed, current), 6) if n else None,
        "chi2": None, "pvalue": None, "dof": None,
    }
    if n == 0:
        return {**out, "status": INSUFFICIENT}
    # The reference's counts and this window's, pooled where this window expects fewer than 5.
    reference_counts = np.array([float(prior.get(label, 0.0)) for label in labels]) * ref_n
    observed, expected = _pool_small(counts, smoothed * n)
    pooled_reference, _ = _pool_small(reference_counts, smoothed * n)
    if observed.size >= 2 and pooled_reference.sum() > 0:
        table = np.vstack([pooled_reference, observed])
        table = table[:, table.sum(axis=0) > 0]
        if table.shape[1] >= 2:
            result = stats.chi2_contingency(table, correction=False)
            out.update(chi2=round(float(result.statistic), 6), pvalue=float(result.pvalue),
                       dof=int(result.dof))
    out["status"] = chi2_status(out["pvalue"])
    return out


def model_drift(reference: Mapping[str, Any] | None, features: Mapping[str, Sequence[float]],
                predictions: Sequence[str], *, min_samples: int) -> dict[str, Any]:
    """The drift report of one model over one window: per feature, class distribution, status.

    ``drift_score`` is the largest feature PSI (the ``model_drift_score`` gauge).
    """
    n = len(predictions)
    if reference is None:
        return {"n": n, "status": NO_REFERENCE, "drift_score": None, "features": {}, "prediction": None}
    references = reference.get("features") or {}
    feature_reports = {name: feature_drift(ref, features.get(name, []), tests=len(references))
                       for name, ref in references.items()}
    prediction_report = class_drift(reference["prediction"], predictions) \
        if reference.get("prediction") else None
    scores = [f["psi"] for f in feature_reports.values() if f.get("psi") is not None]
    if not scores and prediction_report and prediction_report["psi"] is not None:
        scores = [prediction_report["psi"]]
    if n < min_samples:
        status = INSUFFICIENT
    else:
        parts = [f["status"] for f in feature_reports.values()]
        if prediction_report:
            parts.append(prediction_report["status"])
        status = worst([s for s in parts if s in _SEVERITY])
    return {"n": n, "status": status, "drift_score": round(max(scores), 6) if scores else None,
            "features": feature_reports, "prediction": prediction_report}


def max_feature_psi(reference: Mapping[str, Any], features: Mapping[str, Sequence[float]]) -> float | None:
    """Largest PSI over the features (cheap: no KS), for the drift-over-time plot."""
    scores = []
    for name, ref in (reference.get("features") or {}).items():
        values = _finite(features.get(name, []))
        edges = ref.get("bin_edges") or []
        if values.size == 0 or not edges:
            continue
        sample = np.asarray(ref.get("sample") or [], dtype=np.float64)
        scores.append(psi_from_proportions(_reference_proportions(sample, edges), bin_proportions(values, edges)))
    return round(max(scores), 6) if scores else None


@dataclass(frozen=True)
class Window:
    """The most recent ``count`` predictions, or those of the last ``seconds``."""

    count: int | None = None
    seconds: float | None = None

    def describe(self) -> dict[str, Any]:
        if self.count is not None:
            return {"kind": "count", "last": self.count}
        return {"kind": "time", "seconds": self.seconds}

    @property
    def since(self) -> timedelta | None:
        return timedelta(seconds=self.seconds) if self.seconds is not None else None


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW_COUNT = 100_000
MAX_WINDOW_SECONDS = 90 * 86400


def parse_window(text: str | None, default_count: int) -> Window:
    """``"500"`` -> the last 500 predictions; ``"30m"``, ``"1h"``, ``"7d"``, ``"45s"`` -> by time.

    Raises ``ValueError`` with a sentence for the client on anything else.
    """
    if text is None or not str(text).strip():
        return Window(count=default_count)
    text = str(text).strip()
    if text.isdigit():
        count = int(text)
        if not 1 <= count <= MAX_WINDOW_COUNT:
            raise ValueError(f"a count window must be between 1 and {MAX_WINDOW_COUNT}")
        return Window(count=count)
    match = _DURATION.match(text)
    if not match:
        raise ValueError("window must be a count (e.g. 500) or a duration (e.g. 30m, 1h, 7d)")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]
    if not 0 < seconds <= MAX_WINDOW_SECONDS:
        raise ValueError("a duration window must be longer than 0 and at most 90d")
    return Window(seconds=seconds)


def _finite(values: np.ndarray | Sequence[float | None]) -> np.ndarray:
    arr = np.asarray([np.nan if v is None else v for v in values] if not isinstance(values, np.ndarray)
                     else values, dtype=np.float64).ravel()
    return arr[np.isfinite(arr)]


def _reference_proportions(sample: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Reference share per bin: from the stored sample when there is one (the decile edges were cut
    on the whole held-out set, and ties make bins uneven), else equal shares."""
    if sample.size:
        return bin_proportions(sample, edges)
    n_bins = bin_proportions([], edges).size
    return np.full(n_bins, 1 / n_bins)


def _pool_small(observed: np.ndarray, expected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge the cells expected fewer than ``CHI2_MIN_EXPECTED`` times into one pooled cell."""
    small = expected < CHI2_MIN_EXPECTED
    if not small.any():
        return observed, expected
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] < CHI2_MIN_EXPECTED and obs.size > 2:  # the pooled cell is still too small: fold it in
        smallest = int(np.argmin(exp[:-1]))
        obs[smallest] += obs[-1]
        exp[smallest] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    return obs, exp


def clean_float(value: Any) -> float | None:
    """A JSON-safe float: ``None`` for missing, NaN and infinite values."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
