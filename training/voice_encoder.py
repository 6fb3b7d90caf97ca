"""A pretrained voice encoder as the emotion model's front end.

The encoder is Resemblyzer's GE2E speaker encoder (Wan et al., "Generalized End-to-End Loss for
Speaker Verification", ICASSP 2018): three LSTM layers of 256 units over a 40-band mel power
spectrogram (25 ms windows, 10 ms hop, 16 kHz, the clip at -30 dBFS), trained by Resemblyzer's
authors on tens of thousands of speakers of read and interview English speech (LibriSpeech,
VoxCeleb 1 and 2). Its weights ship inside the ``resemblyzer`` wheel on PyPI (Apache 2.0);
``make`` downloads that wheel once (``ENCODER_WHEEL``, checked against ``WHEEL_SHA256``) and
training reads ``resemblyzer/pretrained.pt`` from it without PyTorch (:func:`load_weights`).

The emotion model keeps the first ``LAYERS`` layers, frozen: the statistics (mean and standard
deviation over time) of the second layer's outputs separated emotions across speakers and corpora
better than the first layer, the third or the speaker embedding itself in speaker-grouped
cross-validation on the development speakers. Serving runs them as LiteRT's fused LSTM
(``tf_keras``: Keras 3's LSTM does not convert to it), batch 1, the second layer's weights int8
(:func:`to_tflite`).
"""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

from training.common import REPO_ROOT, checked_wheel_member, sha256_file

WHEEL_NAME = "Resemblyzer-0.1.4-py3-none-any.whl"
WHEEL_SHA256 = "8f12eb2f1a9982d32e8db7856de754709b59c93a77bcf0ff536584b619a9dd1f"
ENCODER_WHEEL = REPO_ROOT / "var" / WHEEL_NAME
WEIGHTS_MEMBER = "resemblyzer/pretrained.pt"
UNITS = 256
LAYERS = 2
LICENCE = ("voice encoder: Resemblyzer 0.1.4 (Apache 2.0), trained by its authors on LibriSpeech "
           "and VoxCeleb 1 and 2")

_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "LongStorage": np.int64,
           "IntStorage": np.int32, "HalfStorage": np.float16, "ByteStorage": np.uint8,
           "BoolStorage": np.bool_}


class _Tensor:
    """A tensor seen while unpickling: its storage key and view, filled in once the storages are read."""

    def __init__(self, storage: tuple[str, str], offset: int, size: tuple, stride: tuple, *_: Any):
        self.key, self.offset, self.size, self.stride = storage[1], offset, tuple(size), tuple(stride)


def _rebuild_parameter(tensor: _Tensor, *_: Any) -> _Tensor:
    return tensor


class _Unpickler(pickle.Unpickler):
    """PyTorch's legacy (pre-1.6, non-zip) checkpoint pickle, with tensors as placeholders."""

    def __init__(self, handle: io.BytesIO, storages: dict[str, str]):
        super().__init__(handle)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _Tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in _DTYPES:
            return name
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        raise pickle.UnpicklingError(f"unexpected class {module}.{name} in the checkpoint")

    def persistent_load(self, pid: Any) -> tuple[str, str]:
        kind, storage_type, key = pid[0], pid[1], pid[2]
        if kind != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {kind!r}")
        self.storages[key] = storage_type
        return ("storage", key)


def read_legacy_checkpoint(data: bytes) -> dict[str, Any]:
    """A ``torch.save`` file of the legacy format -> the saved object with numpy arrays for tensors."""
    handle = io.BytesIO(data)
    for _ in range(3):  # magic number, protocol version, system info
        pickle.load(handle)
    storages: dict[str, str] = {}
    saved = _Unpickler(handle, storages).load()
    arrays = {}
    for key in pickle.load(handle):
        count = struct.unpack("<q", handle.read(8))[0]
        dtype = np.dtype(_DTYPES[storages[key]])
        arrays[key] = np.frombuffer(handle.read(count * dtype.itemsize), dtype=dtype)

    def resolve(value: Any) -> Any:
        if isinstance(value, _Tensor):
            flat = arrays[value.key]
            strides = [s * flat.itemsize for s in value.stride]
            return np.lib.stride_tricks.as_strided(flat[value.offset:], value.size, strides).copy()
        if isinstance(value, dict):
            return type(value)((k, resolve(v)) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return type(value)(resolve(v) for v in value)
        return value

    return resolve(saved)


def load_weights(wheel: Path = ENCODER_WHEEL) -> dict[str, np.ndarray]:
    """The encoder's state dict (``lstm.weight_ih_l0`` ...) from the checked wheel."""
    checkpoint = read_legacy_checkpoint(checked_wheel_member(wheel, WHEEL_SHA256, WEIGHTS_MEMBER))
    return dict(checkpoint["model_state"])


def lstm_layers(weights: dict[str, np.ndarray], layers: int = LAYERS) -> list:
    """The first ``layers`` LSTM layers as tf_keras layers (PyTorch's gate order i, f, g, o is
    Keras's i, f, c, o; the two biases add), frozen, returning every step."""
    import tf_keras

    out = []
    for index in range(layers):
        layer = tf_keras.layers.LSTM(UNITS, return_sequences=True, trainable=False,
                                     name=f"encoder_lstm{index + 1}")
        n_in = weights[f"lstm.weight_ih_l{index}"].shape[1]
        layer.build((1, None, n_in))
        layer.set_weights([weights[f"lstm.weight_ih_l{index}"].T,
                           weights[f"lstm.weight_hh_l{index}"].T,
                           weights[f"lstm.bias_ih_l{index}"] + weights[f"lstm.bias_hh_l{index}"]])
        out.append(layer)
    return out


def pooled(sequence: Any) -> Any:
    """Mean and standard deviation over time of ``(batch, time, units)`` -> ``(batch, 2 units)``."""
    import tensorflow as tf

    mean = tf.reduce_mean(sequence, axis=1)
    std = tf.sqrt(tf.maximum(tf.reduce_mean(tf.square(sequence - mean[:, None, :]), axis=1), 1e-8))
    return tf.concat([mean, std], axis=-1)


def encoder_graph(weights: dict[str, np.ndarray], input_shape: tuple[int, int], head=None):
    """A tf_keras model for batch 1: mel windows -> the pooled layer outputs, then ``head``
    (a function of the pooled tensor) if given."""
    import tf_keras

    inputs = tf_keras.Input(input_shape, batch_size=1, name="mel")
    x = inputs
    for layer in lstm_layers(weights):
        x = layer(x)
    x = tf_keras.layers.Lambda(pooled, name="pooling")(x)
    if head is not None:
        x = head(x)
    return tf_keras.Model(inputs, x)


def to_tflite(model: Any, path: Path) -> dict[str, Any]:
    """LiteRT's fused LSTMs, the first in float32, the second with int8 weights.

    The converter's dynamic-range option would quantise both, and the hybrid kernel quantises each
    step's input to int8 as well: the first layer's input, mel power spanning 60 dB within a
    frame, loses its quiet bands. The second layer's input, the first layer's outputs in [-1, 1],
    does not: its weights are quantised here (symmetric, per tensor, as the converter does), which
    keeps the features close to float32's in less time."""
    import tensorflow as tf
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    flat = flatbuffer_utils.read_model(str(path))
    graph = flat.subgraphs[0]
    lstms = [op for op in graph.operators
             if flatbuffer_utils.opcode_to_name(flat, op.opcodeIndex) == "UNIDIRECTIONAL_SEQUENCE_LSTM"]
    if len(lstms) != LAYERS:
        raise RuntimeError(f"expected {LAYERS} fused LSTMs, found {len(lstms)}")
    for slot in range(1, 9):  # input-to-gate and recurrent-to-gate weights (i, f, c, o)
        tensor = graph.tensors[lstms[1].inputs[slot]]
        buffer = flat.buffers[tensor.buffer]
        weights = np.frombuffer(bytes(buffer.data), dtype=np.float32)
        scale = float(np.abs(weights).max()) / 127.0
        buffer.data = np.frombuffer(np.clip(np.round(weights / scale), -127, 127).astype(np.int8).tobytes(),
                                    dtype=np.uint8)
        tensor.type = schema.TensorType.INT8
        tensor.quantization = schema.QuantizationParametersT()
        tensor.quantization.scale, tensor.quantization.zeroPoint = [scale], [0]
    flatbuffer_utils.write_model(flat, str(path))
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
