"""The OpenAPI document is the contract: clients generated from the live server's /openapi.json
call every prediction endpoint with real files and get typed answers."""

from __future__ import annotations

import importlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from bench.liveserver import running_server
from tests.support import SHARED_DATA, wait_until

BIN = Path(sys.executable).parent


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def spec(live_server: str) -> dict:
    return httpx.get(live_server + "/openapi.json").json()


@pytest.fixture(scope="module")
def generated(spec: dict, tmp_path_factory) -> object:
    """``openapi-python-client generate`` on the live spec; fails on any warning."""
    root = tmp_path_factory.mktemp("generated")
    (root / "openapi.json").write_text(json.dumps(spec))
    # The dataset export is a zip: the generator reads it as a file (its bytes) when told to.
    (root / "config.json").write_text(json.dumps({"content_type_overrides": {"application/zip": "application/octet-stream"}}))
    result = subprocess.run([str(BIN / "openapi-python-client"), "generate", "--path", str(root / "openapi.json"),
                             "--output-path", str(root / "inference_client"), "--meta", "none",
                             "--config", str(root / "config.json")],
                            capture_output=True, text=True, env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"},
                            timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "warning" not in output.lower(), output
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module("inference_client")
    finally:
        sys.path.remove(str(root))


def test_every_operation_has_a_meaningful_unique_id_and_documented_problems(spec):
    ids = [op["operationId"] for ops in spec["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    assert all(not i.endswith(("_post", "_get")) for i in ids), ids
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for path, ops in spec["paths"].items():
        for op in ops.values():
            for status, response in op["responses"].items():
                if int(status) >= 400 and path.startswith("/v2"):  # the V2 protocol's own errors
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (path, status)
                elif int(status) >= 400:
                    schema = response["content"]["application/problem+json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Problem"}, (path, status)
            if path.startswith("/v1/monitoring") or (path == "/v1/feedback" and "get" in ops):
                assert {"401", "403"} <= set(ops["get"]["responses"]), path
                assert ops["get"]["security"] == [{"AdminToken": []}]


def test_the_generated_python_client_calls_every_prediction_endpoint(generated, live_server):
    from inference_client import Client
    from inference_client.api.clustering import (
        clustering_fit,
        clustering_palette,
        clustering_predict,
    )
    from inference_client.api.digits import digits_predict
    from inference_client.api.emotion import emotion_predict
    from inference_client.api.monitoring import feedback_create
    from inference_client.api.segmentation import segmentation_predict
    from inference_client.models import (
        ClusteringFitRequest,
        ClusteringPaletteFilesBody,
        ClusteringInstance,
        ClusteringPredictRequest,
        DigitsInstance,
        DigitsPredictFilesBody,
        DigitsPredictRequest,
        EmotionPredictFilesBody,
        FeedbackIn,
        MaskFormat,
        SegmentationPredictFilesBody,
    )
    from inference_client.types import File

    with np.load(SHARED_DATA / "mnist" / "mnist.npz") as data:
        seven, two = data["x_test"][0], data["x_test"][1]
    client = Client(base_url=live_server, timeout=httpx.Timeout(60.0))

    digits = digits_predict.sync(client=client, body=DigitsPredictFilesBody(image=[
        File(payload=io.BytesIO(png(seven)), file_name="7.png", mime_type="image/png"),
        File(payload=io.BytesIO(png(two)), file_name="2.png", mime_type="image/png")]))
    assert [p.digit for p in digits.predictions] == [7, 2] and digits.model == "digits"
    as_json = digits_predict.sync(client=client, body=DigitsPredictRequest(
        instances=[DigitsInstance(pixels=seven.astype(float).tolist())]))
    assert as_json.predictions[0].label == "7"
    raw = digits_predict.sync(client=client, body=File(payload=io.BytesIO(png(seven)), file_name="7.png"))
    assert raw.predictions[0].digit == 7

    clip = io.BytesIO()
    waveform, rate = sf.read(SHARED_DATA / "emodb" / "wav" / "03a01Wa.wav", dtype="float32")
    sf.write(clip, waveform, rate, format="WAV")
    emotion = emotion_predict.sync(client=client, body=EmotionPredictFilesBody(audio=[
        File(payload=io.BytesIO(clip.getvalue()), file_name="anger.wav", mime_type="audio/wav")]))
    assert emotion.predictions[0].label == "anger" and emotion.predictions[0].segments

    membrane = np.asarray(Image.open(SHARED_DATA / "membrane" / "train" / "image" / "25.png"))[:256, :256]
    masks = segmentation_predict.sync(client=client, format_=MaskFormat.JSON, body=SegmentationPredictFilesBody(
        image=[File(payload=io.BytesIO(png(membrane)), file_name="m.png", mime_type="image/png")]))
    assert (masks.predictions[0].width, masks.predictions[0].height) == (256, 256)

    segments = clustering_predict.sync(client=client, body=ClusteringPredictRequest(instances=[
        ClusteringInstance(annual_income=15, spending_score=39)]))
    assert segments.predictions[0].segment == "low income, low spending"
    fit = clustering_fit.sync(client=client, body=ClusteringFitRequest(
        data=[[1.0, 1.0], [1.1, 0.9], [9.0, 9.0], [9.1, 8.8], [5.0, 0.0], [5.1, 0.2]], k=3))
    assert fit.predictions[0].k == 3 and fit.model == "clustering-fit"
    flag = np.zeros((20, 30, 3), np.uint8)
    flag[:10] = (230, 40, 40)
    palette = clustering_palette.sync(client=client, body=ClusteringPaletteFilesBody(
        image=[File(payload=io.BytesIO(png(flag)), file_name="f.png", mime_type="image/png")], colors=2))
    assert [c.hex_ for c in palette.predictions[0].colors] == ["#000000", "#e62828"]

    feedback = feedback_create.sync(client=client, body=FeedbackIn(request_id=digits.request_id, label="7"))
    assert feedback.correct is True and feedback.replaced is False


def test_the_generated_python_client_submits_and_polls_a_job(generated, tmp_path):
    from inference_client import Client
    from inference_client.api.digits import digits_predict
    from inference_client.api.jobs import get_job
    from inference_client.models import DigitsPredictFilesBody, JobDocumentStatus
    from inference_client.types import File

    with np.load(SHARED_DATA / "mnist" / "mnist.npz") as data:
        seven = data["x_test"][0]
    env = {"JOBS": "embedded", "JOBS_QUEUE_PATH": str(tmp_path / "queue.db")}
    with running_server(workers=1, env=env) as live:
        client = Client(base_url=live.base_url, timeout=httpx.Timeout(60.0))
        submitted = digits_predict.sync_detailed(client=client, prefer="respond-async", body=DigitsPredictFilesBody(
            image=[File(payload=io.BytesIO(png(seven)), file_name="7.png", mime_type="image/png")]))
        assert submitted.status_code == 202
        job_id = submitted.headers["location"].rsplit("/", 1)[1]
        finished = (JobDocumentStatus.DONE, JobDocumentStatus.FAILED)
        assert wait_until(lambda: get_job.sync(client=client, job_id=job_id).status in finished, 60, 0.2)
        job = get_job.sync(client=client, job_id=job_id)
    assert job.status == JobDocumentStatus.DONE and job.request_id == submitted.headers["x-request-id"]
    assert job.result["predictions"][0]["digit"] == 7


TYPESCRIPT = Path(__file__).resolve().parents[1] / "typescript"


def test_typescript_types_generated_from_the_spec_compile_against_a_typed_call_of_every_endpoint(spec, tmp_path):
    """openapi-typescript on the live spec, then tsc --noEmit on tests/typescript/calls.ts."""
    bin_dir = TYPESCRIPT / "node_modules" / ".bin"
    assert (bin_dir / "tsc").exists(), "run `npm ci` in tests/typescript (make test does)"
    (TYPESCRIPT / "spec.json").write_text(json.dumps(spec))
    generate = subprocess.run(["node", "generate.mjs", "spec.json", "schema.d.ts"], cwd=TYPESCRIPT,
                              capture_output=True, text=True, timeout=120)
    assert generate.returncode == 0, generate.stdout + generate.stderr
    assert "warn" not in (generate.stdout + generate.stderr).lower(), generate.stdout + generate.stderr
    compile_ = subprocess.run([str(bin_dir / "tsc"), "--noEmit", "-p", "."], cwd=TYPESCRIPT,
                              capture_output=True, text=True, timeout=300)
    assert compile_.returncode == 0, compile_.stdout + compile_.stderr


def test_every_operation_has_a_request_and_a_response_example(spec):
    schemas = spec["components"]["schemas"]

    def has_example(media: dict) -> bool:
        if "example" in media or "examples" in media:
            return True
        ref = media.get("schema", {}).get("$ref", "")
        return bool(ref) and "examples" in schemas[ref.rsplit("/", 1)[1]]

    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            for media_type, media in op.get("requestBody", {}).get("content", {}).items():
                assert has_example(media), (method, path, "request", media_type)
            success = op["responses"].get("200") or op["responses"].get("201")
            if success is None and "204" in op["responses"]:  # no content, nothing to show
                continue
            assert any(has_example(m) for m in success.get("content", {}).values()), (method, path, "response")


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_the_python_client_example_runs_on_generated_code_only(generated, live_server):
    example = EXAMPLES / "clients" / "python_client.py"
    source = example.read_text()
    assert "from_dict" not in source and "additional_properties" not in source
    root = Path(generated.__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(example), live_server], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stdout + result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["digit"] == answer["digit_best_class"] == "7"
    assert answer["emotion"] in answer["emotion_classes"] and answer["emotion_version"]
    assert len(answer["request_id"]) == 32
    assert answer["segments"] == ["low income, low spending", "high income, high spending"]


def test_the_typescript_client_example_runs_with_blob_uploads_and_no_form_data(spec, live_server, tmp_path):
    bin_dir = TYPESCRIPT / "node_modules" / ".bin"
    assert (bin_dir / "tsc").exists(), "run `npm ci` in tests/typescript (make test does)"
    source = (EXAMPLES / "clients" / "typescript_client.ts").read_text()
    assert "FormData" not in source and "as any" not in source
    (tmp_path / "node_modules").symlink_to(TYPESCRIPT / "node_modules")
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    generate = subprocess.run(["node", str(TYPESCRIPT / "generate.mjs"), "spec.json", "schema.d.ts"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
    assert generate.returncode == 0, generate.stdout + generate.stderr
    assert '"application/octet-stream": Blob' in (tmp_path / "schema.d.ts").read_text()  # uploads typed as Blob
    (tmp_path / "typescript_client.ts").write_text(source)
    (tmp_path / "tsconfig.json").write_text(json.dumps({"compilerOptions": {
        "target": "ES2022", "module": "ES2022", "moduleResolution": "bundler", "lib": ["ES2022", "DOM"],
        "strict": True, "skipLibCheck": True, "outDir": "out", "types": []},
        "files": ["typescript_client.ts"]}))
    (tmp_path / "package.json").write_text('{"type": "module"}')
    compile_ = subprocess.run([str(bin_dir / "tsc"), "-p", "."], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert compile_.returncode == 0, compile_.stdout + compile_.stderr
    (tmp_path / "out" / "package.json").write_text('{"type": "module"}')
    (tmp_path / "out" / "main.js").write_text(  # what an app does with the example: files as Blobs
        'import { readFileSync } from "node:fs";\n'
        'import { run } from "./typescript_client.js";\n'
        'const [base, png, wav] = process.argv.slice(2);\n'
        'const answer = await run(base, new Blob([readFileSync(png)], { type: "image/png" }), '
        'new Blob([readFileSync(wav)], { type: "audio/wav" }));\n'
        'console.log(JSON.stringify(answer));\n')
    run = subprocess.run(["node", "out/main.js", live_server, str(EXAMPLES / "digit-7-drawn.png"),
                          str(EXAMPLES / "emodb-08a01Wa-anger.wav")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    answer = json.loads(run.stdout.strip().splitlines()[-1])
    assert answer["digit"] == answer["digit_best_class"] == "7" and answer["emotion"] and answer["emotion_version"]
    assert answer["segments"] == ["low income, low spending", "high income, high spending"]
