"""The Open Inference Protocol (V2) on the live server, driven by Triton's own client
(``tritonclient[http]``, binary tensors by default) and checked against the v1 answers."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import tritonclient.http as tritonhttp
from PIL import Image
from tritonclient.utils import InferenceServerException

from bench.common import REPO_ROOT
from bench.liveserver import running_server
from tests.support import SHARED_DATA, wait_until


@pytest.fixture(scope="module")
def triton(live_server):
    client = tritonhttp.InferenceServerClient(live_server.removeprefix("http://"), network_timeout=60.0)
    yield client
    client.close()


@pytest.fixture(scope="module")
def mnist200():
    with np.load(SHARED_DATA / "mnist" / "mnist.npz") as data:
        return data["x_test"][:200], data["y_test"][:200]


def examples(name: str) -> bytes:
    return (REPO_ROOT / "examples" / name).read_bytes()


def texts(array: np.ndarray) -> list[str]:
    """A BYTES output: bytes when it came as binary data, str when it came as JSON."""
    return [x.decode() if isinstance(x, bytes) else str(x) for x in array]


def bytes_input(name: str, files: list[bytes], binary: bool = True):
    tensor = tritonhttp.InferInput(name, [len(files)], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=object), binary_data=binary)
    return tensor


def test_health_readiness_and_server_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    for name in ("digits", "emotion", "segmentation", "clustering"):
        assert triton.is_model_ready(name)
    assert "binary_tensor_data" in triton.get_server_metadata()["extensions"]


def test_model_metadata_names_the_tensors_the_version_and_the_label_order(triton, client):
    served = {m["task"]: m for m in client.get("/v1/models").json()["models"]}
    digits = triton.get_model_metadata("digits")
    assert digits["versions"] == [served["digits"]["version"]]
    assert [(t["name"], t["datatype"], t["shape"]) for t in digits["inputs"]] == [("pixels", "FP32", [-1, 28, 28])]
    assert digits["parameters"]["alternative_inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert [(t["name"], t["datatype"]) for t in digits["outputs"]] == [
        ("probabilities", "FP32"), ("label", "BYTES"), ("confidence", "FP32")]
    emotion = triton.get_model_metadata("emotion")
    assert emotion["parameters"]["labels"] == served["emotion"]["labels"]
    assert [t["shape"] for t in emotion["outputs"] if t["name"] == "probabilities"] == [[-1, 7]]
    version = served["segmentation"]["version"]
    assert triton.get_model_metadata("segmentation", version)["versions"] == [version]
    assert triton.is_model_ready("segmentation", version)
    assert not triton.is_model_ready("segmentation", "0.0.1")


def test_200_mnist_test_digits_as_a_fp32_json_tensor_match_v1(triton, client, mnist200):
    images, labels = mnist200
    pixels = tritonhttp.InferInput("pixels", [200, 28, 28], "FP32")
    pixels.set_data_from_numpy(images.astype(np.float32), binary_data=False)
    outputs = [tritonhttp.InferRequestedOutput(n, binary_data=False) for n in ("label", "probabilities")]
    result = triton.infer("digits", [pixels], outputs=outputs)
    v2_labels = texts(result.as_numpy("label"))
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (200, 10) and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert v2_labels == [str(i) for i in probabilities.argmax(axis=1)]

    v1 = client.post("/v1/digits/predict", json={"instances": [{"pixels": im.tolist()} for im in images]})
    v1_labels = [p["label"] for p in v1.json()["predictions"]]
    assert v2_labels == v1_labels
    v1_probabilities = np.array([[p["probabilities"][str(d)] for d in range(10)] for p in v1.json()["predictions"]])
    assert np.allclose(probabilities, v1_probabilities, atol=5e-7)  # the same answer...
    assert np.abs(probabilities - np.round(probabilities, 6)).max() > 1e-9  # ... not rebuilt from v1's rounding
    accuracy = np.mean(np.array(v2_labels) == labels.astype(str))
    assert accuracy == np.mean(np.array(v1_labels) == labels.astype(str)) and accuracy >= 0.98


def test_digit_images_as_binary_bytes(triton, mnist200):
    images, labels = mnist200
    files = []
    for image in images[:8]:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG")
        files.append(buffer.getvalue())
    result = triton.infer("digits", [bytes_input("image", files)])  # binary in, binary out
    assert texts(result.as_numpy("label")) == [str(d) for d in labels[:8]]
    assert result.get_output("label")["parameters"]["binary_data_size"] > 0


def test_emotion_from_wav_bytes_with_the_binary_extension_matches_v1(triton, client):
    wav = examples("emodb-08a01Wa-anger.wav")
    result = triton.infer("emotion", [bytes_input("audio", [wav, wav])])
    v1 = client.post("/v1/emotion/predict", files={"audio": ("a.wav", wav, "audio/wav")}).json()["predictions"][0]
    labels = triton.get_model_metadata("emotion")["parameters"]["labels"]
    probabilities = result.as_numpy("probabilities")
    assert texts(result.as_numpy("label")) == [v1["label"]] * 2
    assert np.allclose(probabilities[0], [v1["probabilities"][name] for name in labels], atol=1e-6)
    assert labels[int(probabilities[0].argmax())] == v1["label"]
    assert np.allclose(result.as_numpy("confidence"), v1["confidence"], atol=1e-6)


def test_segmentation_mask_has_the_input_shape_and_equals_v1(triton, client):
    png = examples("membrane-slice3-crop.png")
    height, width = np.asarray(Image.open(io.BytesIO(png))).shape[:2]
    outputs = [tritonhttp.InferRequestedOutput("mask"), tritonhttp.InferRequestedOutput("probability")]
    result = triton.infer("segmentation", [bytes_input("image", [png])], outputs=outputs)
    mask, probability = result.as_numpy("mask"), result.as_numpy("probability")
    assert mask.shape == (height, width) and mask.dtype == np.uint8 and probability.shape == (height, width)
    v1 = client.post("/v1/segmentation/predict", files={"image": ("m.png", png, "image/png")})
    assert np.array_equal(mask, np.asarray(Image.open(io.BytesIO(v1.content))))
    assert set(np.unique(mask)) <= {0, 255} and 0 < (mask == 255).mean() < 1
    # The mask is the probability map at the model's threshold (a parameter can move it).
    higher = triton.infer("segmentation", [bytes_input("image", [png])], parameters={"threshold": 0.8})
    assert (higher.as_numpy("mask") == 255).sum() < (mask == 255).sum()
    assert np.array_equal(higher.as_numpy("mask") == 255, probability >= 0.8)


def test_clustering_matches_v1(triton, client):
    rows = json.loads(examples("mall-customers.json"))["instances"]
    features = tritonhttp.InferInput("features", [len(rows), 2], "FP32")
    features.set_data_from_numpy(np.array([[r["annual_income"], r["spending_score"]] for r in rows], np.float32))
    result = triton.infer("clustering", [features])
    v1 = client.post("/v1/clustering/predict", json={"instances": rows}).json()["predictions"]
    assert result.as_numpy("cluster").tolist() == [p["cluster"] for p in v1]
    assert texts(result.as_numpy("segment")) == [p["segment"] for p in v1]
    assert np.allclose(result.as_numpy("distance"), [p["distance"] for p in v1], rtol=1e-5)


def test_v2_predictions_go_to_the_same_log_and_access_log(client, server):
    body = {"id": "v2-log-check", "inputs": [{"name": "features", "shape": [1, 2], "datatype": "FP32",
                                              "data": [15, 39]}]}
    response = client.post("/v2/models/clustering/infer", json=body)
    assert response.status_code == 200 and response.json()["id"] == "v2-log-check"
    request_id = response.headers["x-request-id"]
    assert response.headers["x-model-version"] and "inference;dur=" in response.headers["server-timing"]
    line = server.access_entries(request_id)[0]  # written after the answer: waits for it
    assert (line["route"], line["model"], line["status"]) == ("/v2/models/{name}/infer", "clustering", 200)


@pytest.mark.parametrize("path, body, headers, status, words", [
    ("/v2/models/nope/infer", {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]},
     {}, 404, "unknown model"),
    ("/v2/models/digits/versions/0.0.1/infer", {"inputs": [{"name": "pixels", "shape": [1, 28, 28],
                                                            "datatype": "FP32", "data": [0] * 784}]},
     {}, 404, "no version"),
    ("/v2/models/digits/infer", {"inputs": [{"name": "pixels", "shape": [1, 28, 27], "datatype": "FP32",
                                             "data": [0] * 756}]}, {}, 400, "must have shape"),
    ("/v2/models/digits/infer", {"inputs": [{"name": "pixels", "shape": [1, 28, 28], "datatype": "FP32",
                                             "data": [0] * 783}]}, {}, 400, "784 elements"),
    ("/v2/models/digits/infer", {"inputs": [{"name": "pixels", "shape": [1, 28, 28], "datatype": "FP32",
                                             "data": [0] * 784}]}, {}, 400, "blank"),
    ("/v2/models/clustering/infer", {"inputs": [{"name": "features", "shape": [1, 2], "datatype": "FP64",
                                                 "data": [1e308, 1e308]}]}, {}, 400, "out-of-range"),
    ("/v2/models/clustering/infer", {"inputs": []}, {}, 400, "inputs"),
    ("/v2/models/clustering/infer", {"inputs": [{"name": "features", "shape": [1, 2], "datatype": "FP32",
                                                 "data": [1, 2]}], "outputs": [{"name": "nope"}]},
     {}, 400, "unknown output"),
    ("/v2/models/segmentation/infer", {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                   "data": ["not base64!"]}]}, {}, 400, "base64"),
    ("/v2/models/digits/infer", {"inputs": [{"name": "pixels", "shape": [10**2200, 10**2200],
                                             "datatype": "FP32", "data": [0]}]}, {}, 400, "more elements"),
    ("/v2/models/digits/infer", {"inputs": [{"name": "pixels", "shape": [1] * 9, "datatype": "FP32",
                                             "data": [0]}]}, {}, 400, "dimensions"),
    ("/v2/models/emotion/infer", {"inputs": [{"name": "audio", "shape": [9], "datatype": "BYTES",
                                              "data": [""] * 9}]}, {}, 400, "more elements"),
    ("/v2/models/digits/infer", {"inputs": [{"name": "nope", "shape": [1], "datatype": "FP32",
                                             "data": [0]}]}, {}, 400, "unexpected input"),
])
def test_bad_requests_are_v2_errors(client, path, body, headers, status, words):
    response = client.post(path, json=body, headers=headers)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert words in response.json()["error"]


def test_an_empty_outputs_list_means_the_default_outputs(client):
    png = examples("membrane-slice3-crop.png")
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                        "data": [base64.b64encode(png).decode()]}], "outputs": []}
    response = client.post("/v2/models/segmentation/infer", json=body)
    assert response.status_code == 200, response.text
    assert [o["name"] for o in response.json()["outputs"]] == ["mask"]


def test_a_large_output_must_be_asked_for_in_binary(client):
    big = io.BytesIO()
    Image.fromarray(np.zeros((1100, 1000), np.uint8)).save(big, "PNG")
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                        "data": [base64.b64encode(big.getvalue()).decode()]}]}
    response = client.post("/v2/models/segmentation/infer", json=body)
    assert response.status_code == 400 and "binary_data" in response.json()["error"]


def test_malformed_binary_bodies_are_400(client):
    header = json.dumps({"inputs": [{"name": "pixels", "shape": [1, 28, 28], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 3136}}]}).encode()
    short = client.post("/v2/models/digits/infer", content=header + b"\0" * 100,
                        headers={"Inference-Header-Content-Length": str(len(header))})
    assert short.status_code == 400 and "binary_data_size" in short.json()["error"]
    lying = client.post("/v2/models/digits/infer", content=header,
                        headers={"Inference-Header-Content-Length": str(len(header) + 10)})
    assert lying.status_code == 400
    huge = json.dumps({"inputs": [{"name": "image", "shape": [200], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": 8}}]}).encode()
    lying_shape = client.post("/v2/models/digits/infer", content=huge + b"\0" * 8,
                              headers={"Inference-Header-Content-Length": str(len(huge))})
    assert lying_shape.status_code == 400 and "cannot hold" in lying_shape.json()["error"]
    nan = np.full((1, 28, 28), np.nan, np.float32).tobytes()
    bad = client.post("/v2/models/digits/infer", content=header + nan,
                      headers={"Inference-Header-Content-Length": str(len(header))})
    assert bad.status_code == 400 and "NaN" in bad.json()["error"]


def test_a_model_that_is_not_loaded_answers_not_ready():
    with running_server(workers=1, ready=False, env={"MODEL_VERSIONS": '{"emotion": "9.9.9"}'}) as live:
        triton = tritonhttp.InferenceServerClient(live.base_url.removeprefix("http://"))
        try:
            assert wait_until(lambda: triton.is_model_ready("digits"), 60, 0.2)
            assert not triton.is_model_ready("emotion") and not triton.is_server_ready()
            with pytest.raises(InferenceServerException) as refused:
                triton.infer("emotion", [bytes_input("audio", [examples("emodb-08a01Wa-anger.wav")])])
            assert refused.value.status() == "503" and "not ready" in refused.value.message()
            assert httpx.get(live.base_url + "/v2/models/emotion/ready").status_code == 503
        finally:
            triton.close()


def test_model_configs_are_in_tritons_form(client):
    digits = client.get("/v2/models/digits/config").json()
    assert (digits["name"], digits["max_batch_size"]) == ("digits", 256)
    assert digits["input"] == [{"name": "pixels", "data_type": "TYPE_FP32", "dims": [28, 28]}]
    assert [(o["name"], o["data_type"], o["dims"]) for o in digits["output"]] == [
        ("probabilities", "TYPE_FP32", [10]), ("label", "TYPE_STRING", []), ("confidence", "TYPE_FP32", [])]
    segmentation = client.get("/v2/models/segmentation/config").json()
    assert segmentation["max_batch_size"] == 0 and segmentation["input"][0]["dims"] == [1]
    version = digits["version_policy"]["specific"]["versions"][0]
    assert client.get(f"/v2/models/digits/versions/{version}/config").json() == digits
    assert client.get("/v2/models/nope/config").status_code == 404


def test_answers_carry_no_empty_parameters_and_echo_the_id_as_sent(client):
    body = {"id": "", "inputs": [{"name": "features", "shape": [1, 2], "datatype": "FP32", "data": [15, 39]}]}
    answer = client.post("/v2/models/clustering/infer", json=body).json()
    assert answer["id"] == ""
    assert "parameters" not in answer and all("parameters" not in o for o in answer["outputs"])
    long_id = {**body, "id": "x" * 129}
    refused = client.post("/v2/models/clustering/infer", json=long_id)
    assert refused.status_code == 400 and "at most 128 characters" in refused.json()["error"]
