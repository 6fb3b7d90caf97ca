"""Retraining never overwrites a version; production exports are read strictly; the evaluation gate
(training.compare) scores committed versions through the serving code and fails a worse one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from training.common import (
    REPO_ROOT,
    VersionExists,
    model_dir,
    next_version,
    output_version,
)
from training.compare import main as compare_main
from training.production import read_export


def versions_dir(tmp_path: Path, *names: str) -> Path:
    for name in names:
        (tmp_path / "digits" / name).mkdir(parents=True)
    return tmp_path


@pytest.mark.parametrize(("existing", "expected"), [
    ((), "1.0.0"), (("1.0.0",), "1.0.1"), (("1.0.0", "1.0.1"), "1.0.2"), (("1.9.9", "1.10.0"), "1.10.1"),
    (("2026.11.25.0912",), "2026.11.25.913"), (("1.0.0-rc1",), "1.0.0-rc1.1"),
])
def test_the_default_version_is_the_next_free_one(tmp_path, existing, expected):
    models = versions_dir(tmp_path, *existing)
    assert next_version("digits", models) == expected
    assert output_version("digits", None, models) == expected
    assert expected not in existing


def test_an_existing_version_is_refused_before_anything_is_written(tmp_path):
    models = versions_dir(tmp_path, "1.0.0", "1.0.1")
    marker = models / "digits" / "1.0.1" / "model.tflite"
    marker.write_bytes(b"committed")
    with pytest.raises(VersionExists, match="refusing to overwrite"):
        output_version("digits", "1.0.1", models)
    with pytest.raises(VersionExists):
        model_dir("digits", "1.0.1", models)
    assert marker.read_bytes() == b"committed"
    assert output_version("digits", "1.1.0", models) == "1.1.0"
    with pytest.raises(SystemExit, match="use letters"):
        output_version("digits", "../1.0.0", models)


@pytest.mark.parametrize("script", ["digits", "segmentation"])
def test_training_scripts_refuse_a_committed_version(script):
    """Run as a user would (the scripts whose imports need no TensorFlow until after the check)."""
    committed = sorted(p.name for p in (REPO_ROOT / "models" / script).iterdir())[-1]
    before = {p: p.stat().st_mtime_ns for p in (REPO_ROOT / "models" / script / committed).rglob("*")}
    run = subprocess.run([sys.executable, "-m", f"training.{script}", "--version", committed],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "refusing to overwrite" in run.stderr
    assert {p: p.stat().st_mtime_ns for p in (REPO_ROOT / "models" / script / committed).rglob("*")} == before


def export_zip(path: Path, lines: list[dict], files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("manifest.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def line(request_id: str, model: str = "digits", label: str | None = "7", instance: int = 0) -> dict:
    return {"request_id": request_id, "instance": instance, "model": model, "version": "1.0.1",
            "created_at": "2026-11-25T12:00:00+00:00", "prediction": "7", "confidence": 0.9,
            "label": label, "file": f"inputs/{model}/{request_id}-{instance}.png"}


def test_an_export_is_read_for_one_task_its_labelled_instances_once(tmp_path):
    lines = [line("a"), line("b", label=None), line("c", model="emotion"), line("a"), line("a", instance=1)]
    files = {entry["file"]: entry["request_id"].encode() for entry in lines}
    path = export_zip(tmp_path / "export.zip", lines, files)
    labelled = read_export(path, "digits")
    assert [(e.request_id, e.instance, e.label, e.data) for e in labelled] == [("a", 0, "7", b"a"), ("a", 1, "7", b"a")]
    assert [e.request_id for e in read_export(path, "digits", labelled_only=False)] == ["a", "b", "a"]


@pytest.mark.parametrize(("make", "words"), [
    (lambda p: p.write_bytes(b"not a zip"), "not a readable zip"),
    (lambda p: zipfile.ZipFile(p, "w").close(), "no manifest.jsonl"),
    (lambda p: export_zip(p, [line("a")], {}), "not in the zip"),
    (lambda p: export_zip(p, [{"request_id": "a"}], {}), "lacks instance"),
])
def test_a_file_that_is_not_an_export_is_refused_with_a_sentence(tmp_path, make, words):
    path = tmp_path / "export.zip"
    make(path)
    with pytest.raises(SystemExit, match=words):
        read_export(path, "digits")


def test_compare_scores_two_committed_versions_and_writes_its_report(tmp_path):
    code = compare_main(["digits", "--candidate", "1.0.1", "--baseline", "1.0.0", "--limit", "2000",
                         "--out", str(tmp_path)])
    report = json.loads((tmp_path / "compare.json").read_text())
    assert code == 0 and report["passed"] is True
    (held_out,) = report["sets"]
    assert held_out["n"] == 2000
    assert held_out["baseline"] > 0.99 and held_out["candidate"] > 0.99  # both measured, both real
    assert "| MNIST test (held out) | 2000 |" in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_fails_a_candidate_worse_than_the_baseline(tmp_path):
    """A copy of the committed model with two labels swapped: the gate must say no (exit 1)."""
    models = tmp_path / "models"
    shutil.copytree(REPO_ROOT / "models" / "digits" / "1.0.1", models / "digits" / "1.0.1")
    broken = models / "digits" / "9.0.0"
    shutil.copytree(models / "digits" / "1.0.1", broken)
    metadata = json.loads((broken / "metadata.json").read_text())
    metadata["labels"][3], metadata["labels"][8] = metadata["labels"][8], metadata["labels"][3]
    metadata["version"] = "9.0.0"
    (broken / "metadata.json").write_text(json.dumps(metadata))
    out = tmp_path / "report"
    code = compare_main(["digits", "--candidate", "9.0.0", "--baseline", "1.0.1", "--limit", "1000",
                         "--models-dir", str(models), "--out", str(out)])
    report = json.loads((out / "compare.json").read_text())
    assert code == 1 and report["passed"] is False
    assert report["sets"][0]["candidate"] < report["sets"][0]["baseline"] - 0.1
    assert "worse by" in report["reasons"][0]


def test_compare_scores_production_data_through_the_serving_decode(tmp_path):
    from bench.common import mnist_digit_png

    lines = [line(f"r{i}", label=label) for i, label in enumerate(["7", "2", "1"])]
    files = {entry["file"]: mnist_digit_png(i) for i, entry in enumerate(lines)}  # MNIST test 0-2: 7, 2, 1
    export = export_zip(tmp_path / "export.zip", lines, files)
    code = compare_main(["digits", "--candidate", "1.0.1", "--baseline", "1.0.0", "--limit", "200",
                         "--production-data", str(export), "--out", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "compare.json").read_text())
    production = report["sets"][1]
    assert code == 0 and production["n"] == 3
    assert production["baseline"] == production["candidate"] == 1.0


def test_the_export_zip_of_the_service_is_what_training_reads(tmp_path):
    """The server's own zip writer (streamed, no seeking) read back by training.production."""
    from app.monitoring.lifecycle import _Sink

    sink = _Sink()
    with zipfile.ZipFile(sink, "w") as archive:
        archive.writestr("inputs/digits/x-0.png", b"\x89PNG...")
        archive.writestr("manifest.jsonl", json.dumps({**line("x"), "file": "inputs/digits/x-0.png"}) + "\n")
    (tmp_path / "export.zip").write_bytes(sink.take())
    (example,) = read_export(tmp_path / "export.zip", "digits")
    assert example.data == b"\x89PNG..."
