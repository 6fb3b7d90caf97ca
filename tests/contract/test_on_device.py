"""On-device models: an app downloads the served artifact, revalidates it by ETag, and checks with the
parity set that its own runtime (here LiteRT, as on a phone) gives what the server gives."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from bench.liveserver import running_server
from tests.support import MODELS


def run_litert(model: bytes, parity: dict) -> list[np.ndarray]:
    interpreter = Interpreter(model_content=model)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    answers = []
    for case in parity["cases"]:
        x = np.asarray(case["input"]["data"], dtype=case["input"]["dtype"]).reshape(case["input"]["shape"])
        interpreter.resize_tensor_input(inp["index"], list(x.shape))
        interpreter.allocate_tensors()
        interpreter.reset_all_variables()  # as the preprocessing says: each run from the initial state
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        answers.append(np.array(interpreter.get_tensor(out["index"])))
    return answers


@pytest.mark.parametrize("task", ["digits", "segmentation", "emotion"])
def test_the_downloaded_model_gives_the_servers_outputs_on_the_parity_set(client, task):
    described = client.get(f"/v1/models/{task}").json()["on_device"]
    artifact = client.get(described["artifact"]["url"])
    assert artifact.status_code == 200 and artifact.headers["content-type"] == "application/octet-stream"
    assert hashlib.sha256(artifact.content).hexdigest() == described["artifact"]["sha256"]
    assert described["artifact"]["bytes"] == len(artifact.content)
    parity = client.get(described["parity"]).json()
    assert parity["artifact_sha256"] == described["artifact"]["sha256"] and len(parity["cases"]) >= 4
    mine = run_litert(artifact.content, parity)
    for case, answer in zip(parity["cases"], mine, strict=True):
        server = np.asarray(case["output"]["data"]).reshape(case["output"]["shape"])
        assert answer.shape == server.shape
        assert np.abs(answer - server).max() <= parity["tolerance"]


def test_a_parity_set_tells_a_wrong_runtime_apart(client):
    """The check is not vacuous: the other digits version's file does not reproduce the outputs."""
    parity = client.get("/v1/models/digits/parity").json()
    served = client.get("/v1/models/digits").json()["version"]
    other = next(v for v in sorted(p.name for p in (MODELS / "digits").iterdir()) if v != served)
    wrong = run_litert((MODELS / "digits" / other / "model.tflite").read_bytes(), parity)
    server = [np.asarray(c["output"]["data"]).reshape(c["output"]["shape"]) for c in parity["cases"]]
    assert max(np.abs(w - s).max() for w, s in zip(wrong, server, strict=True)) > parity["tolerance"]


def test_the_clustering_artifact_is_its_model_json_and_reproduces_the_distances(client):
    model = client.get("/v1/models/clustering/artifact")
    assert model.headers["content-type"].startswith("application/json")
    spec = model.json()
    parity = client.get("/v1/models/clustering/parity").json()
    mean, scale = np.asarray(spec["scaler"]["mean"]), np.asarray(spec["scaler"]["scale"])
    centroids = np.asarray(spec["centroids_scaled"])
    for case in parity["cases"]:
        rows = np.asarray(case["input"]["data"]).reshape(case["input"]["shape"])
        mine = np.linalg.norm(((rows - mean) / scale)[:, None, :] - centroids[None], axis=2)
        assert np.abs(mine - np.asarray(case["output"]["data"]).reshape(mine.shape)).max() <= 1e-9


def test_the_artifact_is_revalidated_by_etag_and_a_changed_model_changes_it(client, live_server):
    first = client.get("/v1/models/digits/artifact")
    etag = first.headers["etag"]
    assert etag == f'"{hashlib.sha256(first.content).hexdigest()}"'
    assert "max-age" in first.headers["cache-control"]
    again = client.get("/v1/models/digits/artifact", headers={"If-None-Match": etag})
    assert (again.status_code, again.content, again.headers["etag"]) == (304, b"", etag)
    assert client.get("/v1/models/digits/artifact", headers={"If-None-Match": '"other"'}).status_code == 200
    served = client.get("/v1/models/digits").json()["version"]
    other = next(v for v in sorted(p.name for p in (MODELS / "digits").iterdir()) if v != served)
    with running_server(workers=1, env={"MODEL_VERSIONS": json.dumps({"digits": other})}) as pinned:
        import httpx

        changed = httpx.get(pinned.base_url + "/v1/models/digits/artifact", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag


def test_unknown_models_and_models_without_an_artifact_are_404(client):
    assert client.get("/v1/models/nope/artifact").json()["code"] == "unknown-model"
    assert client.get("/v1/models/nope").status_code == 404
