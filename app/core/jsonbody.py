"""Answers as compact JSON bytes, written by orjson on the request path."""

from __future__ import annotations

import json
from typing import Any

import orjson


def strict_json(document: Any) -> bytes:
    """``document`` as compact JSON, never with NaN or infinity (a bug, answered as a 500).

    orjson writes both as ``null``, so a document with a ``null`` in it is written again by the
    standard library's encoder, which refuses them; one without (a digit, a segment: the common
    answers) is orjson's, a tenth of the cost on a request path that is ~1 ms in all."""
    try:
        encoded = orjson.dumps(document, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:  # an integer past 64 bits, a type orjson does not know: the encoder decides
        encoded = b"null"
    if b"null" not in encoded:
        return encoded
    return json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
