"""The monitoring dashboard: one self-contained HTML page with inline SVG plots.

No CDN, no JavaScript, no matplotlib at serving time: a few small functions that turn numbers
into SVG. The page is rendered from the same database reports as the JSON endpoints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

import numpy as np

from app.monitoring.drift import PSI_DRIFT, PSI_WARNING

W, H, PAD_L, PAD_R, PAD_T, PAD_B = 360, 170, 44, 10, 22, 34
REF_COLOUR, CUR_COLOUR, LINE_COLOUR = "#9bb7d4", "#d9534f", "#2c6fbb"
STATUS_COLOUR = {"ok": "#2e7d32", "warning": "#ed6c02", "drift": "#c62828",
                 "insufficient_data": "#757575", "no_reference": "#757575"}


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    return f"{v:.3g}" if 1e-3 <= a < 1e4 else f"{v:.1e}"


def _frame(title: str, body: list[str], y_max: float, y_label: str = "",
           x_labels: tuple[str, str] = ("", "")) -> str:
    x0, x1, y0, y1 = PAD_L, W - PAD_R, H - PAD_B, PAD_T
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
             f'role="img" aria-label="{escape(title)}">',
             f'<text x="{W / 2}" y="14" text-anchor="middle" font-size="12" font-weight="bold">{escape(title)}</text>',
             f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#444"/>',
             f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="#444"/>',
             f'<text x="{x0 - 4}" y="{y1 + 4}" text-anchor="end" font-size="9">{_fmt(y_max)}</text>',
             f'<text x="{x0 - 4}" y="{y0}" text-anchor="end" font-size="9">0</text>',
             f'<text x="{x0}" y="{y0 + 12}" font-size="9">{escape(x_labels[0])}</text>',
             f'<text x="{x1}" y="{y0 + 12}" text-anchor="end" font-size="9">{escape(x_labels[1])}</text>',
             f'<text x="{(x0 + x1) / 2}" y="{H - 4}" text-anchor="middle" font-size="9">{escape(y_label)}</text>']
    return "".join(parts + body + ["</svg>"])


def _y(v: float, y_max: float) -> float:
    return (H - PAD_B) - (H - PAD_B - PAD_T) * (v / y_max if y_max > 0 else 0)


def histogram_svg(title: str, reference: Sequence[float], current: Sequence[float], bins: int = 20) -> str:
    """Reference (filled) vs current (outlined) histograms as densities over shared bins."""
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    ref, cur = ref[np.isfinite(ref)], cur[np.isfinite(cur)]
    both = np.concatenate([ref, cur])
    if both.size == 0:
        return _frame(title, [], 1.0, "no data")
    lo, hi = float(both.min()), float(both.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    ref_h = np.histogram(ref, edges)[0] / max(ref.size, 1)
    cur_h = np.histogram(cur, edges)[0] / max(cur.size, 1)
    y_max = float(max(ref_h.max(initial=0), cur_h.max(initial=0))) or 1.0
    step = (W - PAD_L - PAD_R) / bins
    body = []
    for i, share in enumerate(ref_h):
        x, y = PAD_L + i * step, _y(share, y_max)
        body.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{step:.1f}" height="{H - PAD_B - y:.1f}" '
                    f'fill="{REF_COLOUR}"/>')
    points = []
    for i, share in enumerate(cur_h):
        y = _y(share, y_max)
        points += [f"{PAD_L + i * step:.1f},{y:.1f}", f"{PAD_L + (i + 1) * step:.1f},{y:.1f}"]
    body.append(f'<polyline points="{" ".join(points)}" fill="none" stroke="{CUR_COLOUR}" stroke-width="1.5"/>')
    return _frame(title, body, y_max, f"share per bin (reference n={ref.size}, current n={cur.size})",
                  (_fmt(lo), _fmt(hi)))


def bars_svg(title: str, reference: Mapping[str, float], current: Mapping[str, float]) -> str:
    """Grouped bars per class: reference prior (filled) next to current share (red)."""
    labels = list(reference) or list(current)
    if not labels:
        return _frame(title, [], 1.0, "no data")
    y_max = max([*reference.values(), *current.values(), 1e-9])
    step = (W - PAD_L - PAD_R) / len(labels)
    body = []
    for i, label in enumerate(labels):
        x = PAD_L + i * step
        for j, (values, colour) in enumerate(((reference, REF_COLOUR), (current, CUR_COLOUR))):
            y = _y(values.get(label, 0.0), y_max)
            body.append(f'<rect x="{x + 1 + j * step * 0.45:.1f}" y="{y:.1f}" width="{step * 0.43:.1f}" '
                        f'height="{H - PAD_B - y:.1f}" fill="{colour}"/>')
        if len(labels) <= 20:
            body.append(f'<text x="{x + step / 2:.1f}" y="{H - PAD_B + 11}" text-anchor="middle" '
                        f'font-size="8">{escape(label[:6])}</text>')
    return _frame(title, body, y_max, "share of predictions: reference vs current")


def line_svg(title: str, series: Sequence[float | None], x_labels: tuple[str, str], y_label: str,
             thresholds: Sequence[tuple[float, str]] = ()) -> str:
    """One line over time buckets (gaps where a bucket has no value), optional threshold lines."""
    values = [v for v in series if v is not None]
    y_max = max([*values, *(t for t, _ in thresholds), 1e-9]) * 1.1
    n = max(len(series), 1)
    step = (W - PAD_L - PAD_R) / max(n - 1, 1)
    body = []
    for level, colour in thresholds:
        y = _y(level, y_max)
        body.append(f'<line x1="{PAD_L}" y1="{y:.1f}" x2="{W - PAD_R}" y2="{y:.1f}" stroke="{colour}" '
                    f'stroke-dasharray="4 3"/>')
    segment: list[str] = []
    for i, v in enumerate([*series, None]):
        if v is None:
            if len(segment) > 1:
                body.append(f'<polyline points="{" ".join(segment)}" fill="none" stroke="{LINE_COLOUR}" '
                            'stroke-width="1.5"/>')
            elif segment:
                x, y = segment[0].split(",")
                body.append(f'<circle cx="{x}" cy="{y}" r="2" fill="{LINE_COLOUR}"/>')
            segment = []
        else:
            segment.append(f"{PAD_L + i * step:.1f},{_y(v, y_max):.1f}")
    if not values:
        body.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" font-size="10">no data</text>')
    return _frame(title, body, y_max, y_label, x_labels)


def shadow_table(shadow: Mapping[str, Any]) -> str:
    """The shadow version beside the primary one: agreement, and accuracy on labelled instances."""
    def acc(score: Mapping[str, Any]) -> str:
        return "&ndash;" if score["accuracy"] is None else f"{score['accuracy']:.3f}"

    rows = "".join(f"<tr><th>{role}</th><td>{escape(str(score['version']))}</td><td>{score['labelled']}</td>"
                   f"<td>{acc(score)}</td></tr>"
                   for role, score in (("primary", shadow["primary"]), ("shadow", shadow["shadow"])))
    return (f"<h3 class='shadow'>Shadow version</h3><p>{shadow['n']} instances predicted by both; agreement "
            f"{_fmt(shadow['agreement'])}.</p><table class='shadow'><tr><th>role</th><th>version</th>"
            f"<th>labelled</th><th>accuracy</th></tr>{rows}</table>")


def render_dashboard(sections: Sequence[Mapping[str, Any]], *, generated_at: str, window: str,
                     history: str) -> str:
    """The page. Each section: ``report`` (drift report of one model), ``timeline``,
    ``reference`` (reference.json or None), ``current_features`` (name -> values)."""
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<title>Model monitoring</title><style>body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}"
        "h2{margin-top:1.6em}.status{padding:.1em .5em;border-radius:.3em;color:#fff}"
        ".grid{display:flex;flex-wrap:wrap;gap:8px}svg{background:#fafafa;border:1px solid #ddd}"
        "table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}"
        "</style></head><body>",
        f"<h1>Model monitoring</h1><p>Generated {escape(generated_at)} UTC. Drift window: "
        f"<code>{escape(window)}</code>; time series: <code>{escape(history)}</code>. "
        f"PSI &ge; {PSI_WARNING} warns, &ge; {PSI_DRIFT} is drift. Reference in blue, current in red.</p>",
    ]
    if not sections:
        parts.append("<p>No models are loaded.</p>")
    for section in sections:
        report, tl = section["report"], section["timeline"]
        status = report["status"]
        parts.append(f"<h2 id='{escape(report['model'])}'>{escape(report['model'])} {escape(report['version'])} "
                     f"<span class='status' style='background:{STATUS_COLOUR.get(status, '#757575')}'>"
                     f"{escape(status)}</span></h2>")
        parts.append(f"<p>{report['n']} predictions in the window; drift score (largest PSI): "
                     f"{'&ndash;' if report['drift_score'] is None else _fmt(report['drift_score'])}.</p>")
        releases = report.get("client_versions") or []
        if "client_version" in report:
            parts.append(f"<p>Client release: {escape(str(report['client_version'] or 'none'))}.</p>")
        elif releases:
            parts.append("<p>Client releases in the window: " + ", ".join(
                f"{escape(str(r['client_version'] or 'none'))} ({r['n']})" for r in releases) + ".</p>")
        reference = section.get("reference") or {}
        if report.get("features"):
            parts.append("<table><tr><th>feature</th><th>PSI</th><th>KS D</th><th>KS p</th>"
                         "<th>ref mean</th><th>current mean</th><th>status</th></tr>")
            for name, f in report["features"].items():
                cells = [f.get("psi"), f.get("ks_statistic"), f.get("ks_pvalue"), f.get("reference_mean"),
                         f.get("current_mean")]
                parts.append(f"<tr><th>{escape(name)}</th>" + "".join(
                    f"<td>{'&ndash;' if c is None else _fmt(c)}</td>" for c in cells) +
                    f"<td>{escape(f['status'])}</td></tr>")
            parts.append("</table>")
        grid = []
        for name, ref in (reference.get("features") or {}).items():
            grid.append(histogram_svg(name, ref.get("sample") or [], section["current_features"].get(name, [])))
        pred = report.get("prediction")
        if pred:
            grid.append(bars_svg("predicted class", pred["reference"], pred["current"]))
        start = tl.get("start") or []
        x_labels = (start[0][5:16].replace("T", " "), start[-1][5:16].replace("T", " ")) if start else ("", "")
        grid.append(line_svg("drift score over time (largest PSI)", tl.get("drift_score", []), x_labels, "PSI",
                             thresholds=[(PSI_WARNING, "#ed6c02"), (PSI_DRIFT, "#c62828")]))
        grid.append(line_svg("latency p50 / request", tl.get("latency_p50_ms", []), x_labels, "ms"))
        grid.append(line_svg("latency p95 / request", tl.get("latency_p95_ms", []), x_labels, "ms"))
        grid.append(line_svg("throughput", tl.get("throughput_per_min", []), x_labels, "predictions per minute"))
        parts.append("<div class='grid'>" + "".join(grid) + "</div>")
        shadow = section.get("shadow")
        if shadow and shadow.get("n"):
            parts.append(shadow_table(shadow))
    parts.append("</body></html>")
    return "".join(parts)
