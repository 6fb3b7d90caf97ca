"""The Open Inference Protocol (KServe V2) on the wire: tensors in JSON and in Triton's binary
tensor data extension.

A request body is JSON, or (binary extension) ``Inference-Header-Content-Length`` bytes of JSON
followed by the raw data of every input whose ``parameters.binary_data_size`` is set, in the order
of ``inputs``. Fixed-size types are little-endian, row-major; a ``BYTES`` element is a 4-byte
little-endian length and its bytes. Outputs go back the same way when asked for
(``parameters.binary_data`` on a requested output, or ``binary_data_output`` on the request).

Everything here is bounded by the request body (``MAX_UPLOAD_MB``): no shape is trusted before its
element count has been checked against the bytes that carry it.
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.core.jsonbody import strict_json
from app.core.limits import JSON_VALUES_SLACK, MAX_ECHOED_ID

HEADER_LENGTH = "inference-header-content-length"
BINARY_MEDIA_TYPE = "application/octet-stream"

DTYPES: dict[str, np.dtype | None] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"), "BYTES": None,
}


class V2Error(Exception):
    """An error answered as the protocol's ``{"error": "..."}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


# ---- the JSON documents (also the OpenAPI schemas of the /v2 routes) ----------------------------

class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any size along this axis")


class ModelMetadata(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "name": "digits", "versions": ["1.0.1"], "platform": "litert",
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 28, 28]},
                   {"name": "image", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
                    {"name": "label", "datatype": "BYTES", "shape": [-1]},
                    {"name": "confidence", "datatype": "FP32", "shape": [-1]}],
        "parameters": {"labels": [str(d) for d in range(10)], "max_batch_size": 256}}]})
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = Field(default_factory=dict)


class ServerMetadata(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "name": "ml-inference-service", "version": "1.0.0", "extensions": ["binary_tensor_data"]}]})
    name: str
    version: str
    extensions: list[str]


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Any = None


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferenceRequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "id": "my-request-1",
        "inputs": [{"name": "features", "shape": [2, 2], "datatype": "FP32", "data": [15, 39, 137, 83]}],
        "outputs": [{"name": "segment"}]}]})
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size for a binary output; "
                                              "absent otherwise")
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model_name": "clustering", "model_version": "1.0.0", "id": "my-request-1",
        "outputs": [{"name": "segment", "datatype": "BYTES", "shape": [2],
                     "data": ["low income, low spending", "high income, high spending"]}]}]})
    model_name: str
    model_version: str
    id: str
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


class ErrorBody(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"error": "unknown model 'nope'"}]})
    error: str


class Live(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"live": True}]})
    live: bool


class Ready(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"ready": True}]})
    ready: bool


class ModelReady(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "digits", "ready": True}]})
    name: str
    ready: bool


# ---- decoding a request ----------------------------------------------------------------------

@dataclass
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray  # BYTES: a 1-D object array of bytes (or str from JSON)
    from_json: bool


@dataclass
class InferenceRequest:
    id: str | None
    parameters: dict[str, Any]
    inputs: dict[str, Tensor]
    outputs: list[RequestOutput] | None
    binary_output: bool = False  # the request-level default
    extra: dict[str, Any] = field(default_factory=dict)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    try:
        n = int(header_length)
    except ValueError:
        raise V2Error(400, f"Inference-Header-Content-Length must be an integer; got {header_length!r}") from None
    if not 0 < n <= len(body):
        raise V2Error(400, f"Inference-Header-Content-Length is {n} but the body has {len(body)} bytes")
    return body[:n], memoryview(body)[n:]


MAX_DIMS = 8
JSON_MAX_OUTPUT_ELEMENTS = 1 << 20  # larger outputs (a 2048 x 2048 mask) must be asked for in binary


def _elements(shape: list[int], name: str, limit: int) -> int:
    """The element count of ``shape``, refused (400) past ``limit`` before it is ever multiplied out."""
    if len(shape) > MAX_DIMS:
        raise V2Error(400, f"input '{name}': {len(shape)} dimensions; at most {MAX_DIMS}")
    count = 1
    for d in shape:
        if d < 0:
            raise V2Error(400, f"input '{name}': a shape cannot have a negative dimension")
        count *= d
        if count > limit:
            raise V2Error(400, f"input '{name}': its shape has more elements than this model takes "
                               f"({limit:,} at most)")
    return count


def _bytes_elements(raw: memoryview, count: int, name: str) -> np.ndarray:
    if count * 4 > len(raw):  # each element has a 4-byte length: never allocate for a lying shape
        raise V2Error(400, f"input '{name}': shape claims {count} BYTES elements; {len(raw)} bytes "
                           "cannot hold them")
    out = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + 4 > len(raw):
            raise V2Error(400, f"input '{name}': binary BYTES data ends before element {i}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise V2Error(400, f"input '{name}': element {i} claims {length} bytes; fewer remain")
        out[i] = bytes(raw[offset:offset + length])
        offset += length
    if offset != len(raw):
        raise V2Error(400, f"input '{name}': {len(raw) - offset} bytes left over after {count} elements")
    return out


def _json_data(item: RequestInput, count: int) -> np.ndarray:
    if item.data is None:
        raise V2Error(400, f"input '{item.name}' has neither 'data' nor parameters.binary_data_size")
    dtype = DTYPES[item.datatype]
    try:
        if dtype is None:
            flat = np.asarray(item.data, dtype=object).reshape(-1)
            if not all(isinstance(v, str) for v in flat):
                raise ValueError("BYTES elements in JSON must be strings")
            array = flat
        else:
            array = np.asarray(item.data)
            if array.dtype == object or array.dtype.kind not in "biuf":
                raise ValueError(f"{item.datatype} data must be numbers")
            array = array.astype(dtype).reshape(-1)
    except (ValueError, TypeError, OverflowError) as exc:
        raise V2Error(400, f"input '{item.name}': {exc}") from None
    if array.size != count:
        raise V2Error(400, f"input '{item.name}': shape {item.shape} has {count} elements; data has {array.size}")
    return array


def header_size(body: bytes, header_length: str | None) -> int:
    """The size of the request's JSON part (the whole body without the binary extension)."""
    if header_length is not None and header_length.isdigit():
        return min(len(body), int(header_length))
    return len(body)


def parse_request(body: bytes, header_length: str | None, max_elements: dict[str, int],
                  max_json_bytes: int | None = None) -> InferenceRequest:
    """The request's tensors. ``max_elements`` names the inputs the model takes and the most
    elements each may have: anything else is refused before its data is decoded, and a JSON part
    holding more values than they add up to is refused before it is parsed."""
    header, binary = _split(body, header_length)
    if max_json_bytes is not None and len(header) > max_json_bytes:
        raise V2Error(413, f"json-too-large: the JSON part of a request is limited to "
                           f"{max_json_bytes / 1048576:g} MiB (MAX_JSON_MB); send tensors in binary")
    allowed = sum(max_elements.values()) + JSON_VALUES_SLACK
    if header.count(b",") + 1 > allowed:
        raise V2Error(413, f"too-many-values: the JSON part holds more values than this model takes "
                           f"({allowed:,} at most)")
    try:
        document = InferenceRequestBody.model_validate_json(header)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise V2Error(400, f"invalid inference request: {where}: {first['msg']}") from None
    except (RecursionError, ValueError):
        raise V2Error(400, "the inference request is not valid JSON") from None
    if document.id is not None and len(document.id) > MAX_ECHOED_ID:
        raise V2Error(400, f"invalid inference request: id: at most {MAX_ECHOED_ID} characters "
                           f"(got {len(document.id):,})")
    inputs: dict[str, Tensor] = {}
    offset = 0
    for item in document.inputs:
        if item.datatype not in DTYPES:
            raise V2Error(400, f"input '{item.name}': unknown datatype {item.datatype!r}")
        if item.name in inputs:
            raise V2Error(400, f"input '{item.name}' is given twice")
        if item.name not in max_elements:
            raise V2Error(400, f"unexpected input '{item.name}'; this model takes "
                               f"{' or '.join(max_elements)}")
        count = _elements(item.shape, item.name, max_elements[item.name])
        size = item.parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise V2Error(400, f"input '{item.name}': binary_data_size {size!r} does not fit the "
                                   f"{len(binary) - offset} binary bytes left")
            raw = binary[offset:offset + size]
            offset += size
            dtype = DTYPES[item.datatype]
            if dtype is None:
                array = _bytes_elements(raw, count, item.name)
            else:
                if size != count * dtype.itemsize:
                    raise V2Error(400, f"input '{item.name}': shape {item.shape} of {item.datatype} needs "
                                       f"{count * dtype.itemsize} bytes; binary_data_size is {size}")
                array = np.frombuffer(raw, dtype=dtype)
            from_json = False
        else:
            array = _json_data(item, count)
            from_json = True
        inputs[item.name] = Tensor(item.name, item.datatype, tuple(item.shape), array, from_json)
    if offset != len(binary):
        raise V2Error(400, f"{len(binary) - offset} bytes of binary data after the last input")
    return InferenceRequest(document.id, document.parameters, inputs, document.outputs,
                            bool(document.parameters.get("binary_data_output", False)))


def file_bytes(tensor: Tensor, index: int) -> bytes:
    """Element ``index`` of a BYTES tensor carrying an encoded file: raw in binary, base64 in JSON."""
    value = tensor.data[index]
    if isinstance(value, bytes):
        return value
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise V2Error(400, f"input '{tensor.name}' element {index}: in JSON, a file is sent as a "
                           "base64 string (or use the binary tensor extension)") from None


# ---- encoding a response ---------------------------------------------------------------------

@dataclass
class Output:
    name: str
    datatype: str
    array: np.ndarray  # BYTES: an object array of bytes or str


def _binary(output: Output) -> bytes:
    if output.datatype == "BYTES":
        parts = []
        for value in output.array.reshape(-1):
            raw = value if isinstance(value, bytes) else str(value).encode()
            parts += [struct.pack("<I", len(raw)), raw]
        return b"".join(parts)
    dtype = DTYPES[output.datatype]
    assert dtype is not None
    return np.ascontiguousarray(output.array, dtype=dtype).tobytes()


def _json_values(output: Output) -> list[Any]:
    flat = output.array.reshape(-1)
    if output.datatype == "BYTES":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    return flat.tolist()


def encode_response(response: InferenceResponse, outputs: list[Output],
                    binary: dict[str, bool]) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON, or JSON + binary when any output is binary."""
    chunks = []
    for output in outputs:
        item = ResponseOutput(name=output.name, datatype=output.datatype, shape=list(output.array.shape))
        if not binary.get(output.name) and output.array.size > JSON_MAX_OUTPUT_ELEMENTS:
            raise V2Error(400, f"output '{output.name}' has {output.array.size:,} elements, more than "
                               f"{JSON_MAX_OUTPUT_ELEMENTS:,} in JSON: ask for it with "
                               "parameters.binary_data = true")
        if binary.get(output.name):
            raw = _binary(output)
            item.parameters = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            item.data = _json_values(output)
        response.outputs.append(item)
    header = strict_json(response.model_dump(exclude_none=True))
    if not chunks:
        return header, {"content-type": "application/json"}
    return header + b"".join(chunks), {"content-type": BINARY_MEDIA_TYPE,
                                       HEADER_LENGTH: str(len(header))}
