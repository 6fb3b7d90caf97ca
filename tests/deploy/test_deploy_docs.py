"""The deployment's figures and recipes agree with their sources: app.json and docs/deploy.md show what
bench/results says, the by-hand Heroku recipe sets what app.json sets, and CI runs both deployment
checks. (Part of `make test`: no Docker needed.)"""

from __future__ import annotations

import json
import re
import shlex

from bench import deploy_figures
from bench.common import REPO_ROOT, newest_versions

APP = json.loads((REPO_ROOT / "app.json").read_text())
DOCS = (REPO_ROOT / "docs" / "deploy.md").read_text()


def test_app_json_and_the_docs_show_the_measured_figures():
    assert deploy_figures.stale() == [], "run python -m bench.deploy_figures"


def test_the_figures_block_shows_the_image_size_and_the_memory_peaks():
    figures = deploy_figures.figures()
    block = DOCS.split(deploy_figures.BEGIN)[1].split(deploy_figures.END)[0]
    assert f"{figures['image']} MiB" in block and f"{figures['peak_pairs']} MiB" in block
    assert f"{figures['pss_heavy']} MiB" in APP["env"]["WEB_CONCURRENCY"]["description"]


def test_the_figures_were_measured_with_the_models_served_now():
    """A new model version changes the memory and the image: measure again (bench.startup,
    bench.docker_image) when one is added."""
    served = newest_versions()
    assert deploy_figures.measured_models() == {"startup": served, "docker": served}


def by_hand_commands() -> list[list[str]]:
    commands = re.findall(r"^    (heroku .+?)(?<!\\)$", DOCS.replace("\\\n", " "), re.M)
    return [shlex.split(command.replace("$(openssl rand -hex 32)", "GENERATED"), comments=True) for command in commands]


def test_the_by_hand_recipe_adds_the_add_ons_app_json_declares():
    added = [(c[2], c[c.index("--as") + 1]) for c in by_hand_commands() if c[1] == "addons:create"]
    assert added == [(addon["plan"], addon["as"]) for addon in APP["addons"]]


def test_the_by_hand_recipe_sets_every_variable_app_json_sets():
    (config_set,) = [c for c in by_hand_commands() if c[1] == "config:set" and "ADMIN_TOKEN=GENERATED" in c]
    given = dict(word.split("=", 1) for word in config_set if "=" in word)
    wanted = {name: spec.get("value", "GENERATED" if spec.get("generator") else None)
              for name, spec in APP["env"].items() if spec.get("value") or spec.get("generator")}
    assert given == wanted


def test_ci_runs_both_deployment_checks_after_the_tests():
    script = (REPO_ROOT / ".ci" / "run").read_text().split()
    assert script.index("docker-test") > script.index("test") and script.index("dynos-test") > script.index("test")
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "tests/deploy/check_docker.py" in makefile and "tests/deploy/check_dynos.py" in makefile
