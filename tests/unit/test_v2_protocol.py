"""The V2 response encoder: compact JSON from orjson, never NaN or infinity written as null."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from app.openinference.protocol import HEADER_LENGTH, InferenceResponse, Output, encode_response


def response() -> InferenceResponse:
    return InferenceResponse(model_name="digits", model_version="1.1.0", id="req-1", outputs=[])


def test_a_json_answer_is_the_document_with_every_value():
    outputs = [Output("confidence", "FP32", np.array([0.25, 1e-05], dtype=np.float32)),
               Output("label", "BYTES", np.array(["7", "é"], dtype=object))]
    body, headers = encode_response(response(), outputs, {"confidence": False, "label": False})
    assert headers == {"content-type": "application/json"}
    assert json.loads(body) == {
        "model_name": "digits", "model_version": "1.1.0", "id": "req-1",
        "outputs": [{"name": "confidence", "datatype": "FP32", "shape": [2], "data": [0.25, pytest.approx(1e-05)]},
                    {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["7", "é"]}]}


def test_a_binary_answer_has_its_json_header_first():
    outputs = [Output("probabilities", "FP32", np.array([[0.5, 0.5]], dtype=np.float32))]
    body, headers = encode_response(response(), outputs, {"probabilities": True})
    size = int(headers[HEADER_LENGTH])
    header = json.loads(body[:size])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert np.frombuffer(body[size:], dtype=np.float32).tolist() == [0.5, 0.5]


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_or_infinity_in_a_json_answer_is_an_error_not_a_null(value):
    outputs = [Output("confidence", "FP32", np.array([value], dtype=np.float32))]
    with pytest.raises(ValueError, match="JSON compliant"):
        encode_response(response(), outputs, {"confidence": False})


def test_a_label_that_reads_null_is_kept_as_text():
    outputs = [Output("label", "BYTES", np.array(["null"], dtype=object))]
    body, _ = encode_response(response(), outputs, {"label": False})
    assert json.loads(body)["outputs"][0]["data"] == ["null"]
