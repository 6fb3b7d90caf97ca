"""The deployment figures shown in app.json and docs/deploy.md, from bench/results/startup.json
(bench/startup.py: the processes' PSS outside a container) and bench/results/docker.json
(bench/docker_image.py: the image and the 512 MiB container). Both scripts call :func:`write` after
measuring; tests/deploy/test_deploy_docs.py checks that app.json and the docs show what the results say.

    python -m bench.deploy_figures      # rewrite both from the committed results
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, RESULTS_DIR

APP_JSON = REPO_ROOT / "app.json"
DOCS = REPO_ROOT / "docs" / "deploy.md"
BEGIN = "<!-- figures: written by python -m bench.deploy_figures from bench/results -->"
END = "<!-- end of figures -->"


def results(name: str, results_dir: Path = RESULTS_DIR) -> dict[str, Any]:
    return json.loads((results_dir / f"{name}.json").read_text())


def figures(results_dir: Path = RESULTS_DIR) -> dict[str, Any]:
    startup, docker = results("startup", results_dir), results("docker", results_dir)
    memory = docker["memory_mib"]
    return {
        "workers": startup["workers"],
        "pss_one": round(startup["total_pss_mib_after_one_request_per_task"]),
        "pss_heavy": round(startup["total_pss_mib_after_heavy_requests"]),
        "boot_s": startup["boot_to_ready_s"]["median"],
        "startup_date": startup["measured_at"][:10],
        "image": round(docker["image_mib"]),
        "base": docker["base_image"],
        "healthy_s": docker["boot_to_healthy_s"],
        "anon_boot": round(memory["after_boot"]["anon_mib"]),
        "anon_one": round(memory["after_one_request_per_task"]["anon_mib"]),
        "peak_pairs": round(memory["heaviest_of_each_kind_on_both_workers"]["peak_anon_mib"]),
        "peak_mixed": round(memory["every_heavy_kind_at_once"]["peak_anon_mib"]),
        "oom_kills": memory["every_heavy_kind_at_once"]["oom_kills"],
        "stop_status": docker["docker_stop_during_a_segmentation"]["status"],
        "stop_s": docker["docker_stop_during_a_segmentation"]["stop_s"],
        "exit_code": docker["docker_stop_during_a_segmentation"]["exit_code"],
        "docker_date": docker["measured_at"][:10],
        "models": ", ".join(f"{task} {version}" for task, version in docker["models"].items()),
        "machine": docker["machine"],
    }


def web_concurrency_description(f: dict[str, Any]) -> str:
    return (f"gunicorn workers. Measured (bench/startup.py, bench/docker_image.py): the master and "
            f"{f['workers']} workers take {f['pss_one']} MiB PSS after one request per task and "
            f"{f['pss_heavy']} MiB after the heaviest requests; in a 512 MiB container they hold "
            f"{f['anon_one']} MiB and peak at {f['peak_pairs']} MiB with the heaviest request of each "
            f"kind on both workers ({f['peak_mixed']} MiB with every kind at once). So "
            f"{f['workers']} on a 512 MiB dyno; more workers need a larger one")


def docs_block(f: dict[str, Any]) -> str:
    rows = [
        ("image size (`docker image inspect`)", f"{f['image']} MiB, on `{f['base']}`"),
        ("start to Docker's `healthy`", f"{f['healthy_s']} s"),
        ("boot to ready outside a container (median of 3)", f"{f['boot_s']} s"),
        ("master + 2 workers, PSS, after one request per task / after the heaviest requests",
         f"{f['pss_one']} / {f['pss_heavy']} MiB"),
        ("container, memory the processes hold after boot / after one request per task",
         f"{f['anon_boot']} / {f['anon_one']} MiB"),
        ("container, peak with the heaviest request of each kind on both workers at once",
         f"{f['peak_pairs']} MiB"),
        ("container, peak with every heavy kind at once (OOM kills)",
         f"{f['peak_mixed']} MiB ({f['oom_kills']})"),
        ("`docker stop` a second into a 2048 x 2048 segmentation: its answer, time to exit, exit code",
         f"{f['stop_status']}, {f['stop_s']} s, {f['exit_code']}"),
    ]
    table = "\n".join(["| measured | value |", "| --- | --- |", *(f"| {a} | {b} |" for a, b in rows)])
    return (f"{BEGIN}\n{table}\n\nContainer figures: `python -m bench.docker_image` "
            f"(bench/results/docker.json, {f['docker_date']}, {f['machine']}), 512 MiB, no swap, one CPU, "
            f"read-only, `WEB_CONCURRENCY=2`. PSS: `python -m bench.startup` "
            f"(bench/results/startup.json, {f['startup_date']}). Models: {f['models']}.\n{END}")


def measured_models(results_dir: Path = RESULTS_DIR) -> dict[str, dict[str, str]]:
    """The model versions each deployment result was measured with, by result."""
    return {name: results(name, results_dir).get("models", {}) for name in ("startup", "docker")}


def rendered_app_json(f: dict[str, Any]) -> str:
    app = json.loads(APP_JSON.read_text())
    app["env"]["WEB_CONCURRENCY"]["description"] = web_concurrency_description(f)
    return json.dumps(app, indent=2, ensure_ascii=False) + "\n"


def rendered_docs(f: dict[str, Any]) -> str:
    text = DOCS.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{DOCS} has no figures block ({BEGIN} ... {END})")
    return pattern.sub(lambda _: docs_block(f), text)


def stale(results_dir: Path = RESULTS_DIR) -> list[str]:
    """The files whose figures differ from the results (empty: they agree)."""
    f = figures(results_dir)
    return [str(path.relative_to(REPO_ROOT)) for path, text in
            ((APP_JSON, rendered_app_json(f)), (DOCS, rendered_docs(f))) if path.read_text() != text]


def write(results_dir: Path = RESULTS_DIR) -> None:
    f = figures(results_dir)
    for path, text in ((APP_JSON, rendered_app_json(f)), (DOCS, rendered_docs(f))):
        if path.read_text() != text:
            path.write_text(text)
            print(f"figures written to {path.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    write()
