"""The voice encoder's weights are read from PyTorch's legacy checkpoint format without PyTorch:
a checkpoint written here the way ``torch.save`` wrote it comes back with every tensor, views
(offsets, strides) included."""

from __future__ import annotations

import collections
import io
import pickle
import struct
import sys
import types

import numpy as np
import pytest

from training.voice_encoder import read_legacy_checkpoint


class _Storage:
    def __init__(self, key: str, values: np.ndarray):
        self.key, self.values = key, values


def legacy_checkpoint(monkeypatch, storages: dict[str, np.ndarray], tensors: dict) -> bytes:
    """``tensors``: name -> (storage key, offset, shape, strides in elements)."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called here")

    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    torch.FloatStorage, utils._rebuild_tensor_v2, torch._utils = FloatStorage, _rebuild_tensor_v2, utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)

    class Tensor:
        def __init__(self, key, offset, shape, stride):
            self.args = (_Storage(key, storages[key]), offset, shape, stride, False, collections.OrderedDict())

        def __reduce__(self):
            return _rebuild_tensor_v2, self.args

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                return ("storage", FloatStorage, obj.key, "cpu", obj.values.size, None)
            return None

    handle = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        pickle.dump(header, handle, protocol=2)
    state = collections.OrderedDict((name, Tensor(*spec)) for name, spec in tensors.items())
    Pickler(handle, protocol=2).dump({"step": 7, "model_state": state})
    keys = list(storages)
    pickle.dump(keys, handle, protocol=2)
    for key in keys:
        handle.write(struct.pack("<q", storages[key].size))
        handle.write(storages[key].astype(np.float32).tobytes())
    return handle.getvalue()


def test_a_legacy_checkpoint_is_read_with_its_views(monkeypatch):
    flat = np.arange(30, dtype=np.float32)
    other = np.linspace(-1, 1, 8, dtype=np.float32)
    data = legacy_checkpoint(monkeypatch, {"0": flat, "1": other}, {
        "weight": ("0", 0, (5, 4), (4, 1)),
        "transposed": ("0", 0, (4, 5), (1, 4)),   # a view of the same storage
        "tail": ("0", 20, (2, 5), (5, 1)),        # an offset into it
        "bias": ("1", 0, (8,), (1,)),
    })
    monkeypatch.delitem(sys.modules, "torch")  # read without any torch module around
    monkeypatch.delitem(sys.modules, "torch._utils")
    checkpoint = read_legacy_checkpoint(data)
    state = checkpoint["model_state"]
    assert checkpoint["step"] == 7 and list(state) == ["weight", "transposed", "tail", "bias"]
    np.testing.assert_array_equal(state["weight"], flat[:20].reshape(5, 4))
    np.testing.assert_array_equal(state["transposed"], flat[:20].reshape(5, 4).T)
    np.testing.assert_array_equal(state["tail"], flat[20:30].reshape(2, 5))
    np.testing.assert_array_equal(state["bias"], other)
    assert state["weight"].dtype == np.float32 and state["weight"].flags.writeable


def test_a_checkpoint_naming_other_code_is_refused(monkeypatch):
    handle = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {}):
        pickle.dump(header, handle, protocol=2)
    pickle.dump(collections.Counter("ab"), handle, protocol=2)  # any class outside the tensor format
    with pytest.raises(pickle.UnpicklingError, match="collections.Counter"):
        read_legacy_checkpoint(handle.getvalue())
