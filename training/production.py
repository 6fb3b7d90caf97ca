"""Production data for retraining: the zip ``GET /v1/monitoring/dataset`` exports.

    curl -H "Authorization: Bearer $ADMIN_TOKEN" "$URL/v1/monitoring/dataset?model=digits&labelled=true" -o export.zip
    .venv-train/bin/python -m training.digits --production-data export.zip

The zip holds ``manifest.jsonl`` (one line per stored input: ``request_id``, ``instance``, ``model``,
``version``, ``created_at``, ``prediction``, ``confidence``, ``label`` or null, ``file``) and the files
it names. Only inputs whose clients consented are in it (``X-Data-Consent: granted``). Training
scripts add the labelled ones to their *training* split only; the fixed held-out sets (MNIST test,
membrane slices 25-29, EmoDB speakers 03 and 16) never see production data.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.jsonl"
FIELDS = ("request_id", "instance", "model", "version", "created_at", "prediction", "confidence", "label", "file")


@dataclass(frozen=True)
class ProductionExample:
    request_id: str
    instance: int
    model: str
    version: str
    created_at: str
    prediction: str
    label: str | None
    file: str
    data: bytes

    @property
    def key(self) -> str:
        return f"{self.request_id}-{self.instance}"


def read_export(path: Path, task: str, *, labelled_only: bool = True) -> list[ProductionExample]:
    """The export's examples of ``task`` (labelled ones only, by default), in manifest order, each
    instance once. Raises ``SystemExit`` with a sentence on a file that is not such an export."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise SystemExit(f"--production-data {path}: not a readable zip ({exc})") from None
    with archive:
        names = set(archive.namelist())
        if MANIFEST not in names:
            raise SystemExit(f"--production-data {path}: no {MANIFEST}; is it a /v1/monitoring/dataset export?")
        examples: list[ProductionExample] = []
        seen: set[str] = set()
        for number, line in enumerate(archive.read(MANIFEST).decode().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry: dict[str, Any] = json.loads(line)
                missing = [f for f in FIELDS if f not in entry]
            except json.JSONDecodeError:
                missing = ["(not JSON)"]
            if missing:
                raise SystemExit(f"--production-data {path}: {MANIFEST} line {number} lacks {', '.join(missing)}")
            if entry["model"] != task or (labelled_only and entry["label"] is None):
                continue
            if entry["file"] not in names:
                raise SystemExit(f"--production-data {path}: {MANIFEST} line {number} names "
                                 f"{entry['file']}, which is not in the zip")
            example = ProductionExample(
                request_id=str(entry["request_id"]), instance=int(entry["instance"]), model=entry["model"],
                version=str(entry["version"]), created_at=str(entry["created_at"]),
                prediction=str(entry["prediction"]), label=None if entry["label"] is None else str(entry["label"]),
                file=entry["file"], data=archive.read(entry["file"]))
            if example.key not in seen:
                seen.add(example.key)
                examples.append(example)
    return examples


def summary(examples: list[ProductionExample], used: int, path: Path | None) -> dict[str, Any]:
    """What ``metadata.json`` records about the production data a model was trained with."""
    return {"path": str(path) if path else None, "examples": len(examples), "used": used,
            "versions": sorted({e.version for e in examples}),
            "from": min((e.created_at for e in examples), default=None),
            "to": max((e.created_at for e in examples), default=None)}


def production_rows(path: Path, features: list[str]) -> tuple[Any, dict]:
    """The export's customer rows that have exactly ``features`` (finite), in their original units."""
    examples = read_export(path, "clustering", labelled_only=False)
    rows, skipped = [], 0
    for example in examples:
        try:
            row = json.loads(example.data)
            values = [float(row[f]) for f in features]
        except (ValueError, KeyError, TypeError):
            skipped += 1
            continue
        if not all(math.isfinite(v) for v in values):
            skipped += 1
            continue
        rows.append(values)
    import numpy as np

    x = np.asarray(rows, dtype=np.float64).reshape(-1, len(features))
    return x, {**summary(examples, len(rows), path), "skipped": skipped}
