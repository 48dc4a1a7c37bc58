"""The TMA tensor-map helper: argument checks (before any driver call), the driver call's
arguments (a stand-in for the driver), the maps kept per matrix, and the map's size."""

import ctypes

import numpy as np
import pytest

from cupyquant import _tensor_map


def test_zero_map_is_one_cutensormap_of_zeros():
    zero = _tensor_map.zero_map()
    assert zero.shape == (1,) and zero.nbytes == 128 and zero.tobytes() == bytes(128) and not zero.flags.writeable


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0x1000, 256, 4096, 256, 32), "box_cols must be 64, got 32"),
        ((0x1000, 256, 4096, 0, 64), "1..256 rows, got 0"),
        ((0x1000, 256, 4096, 512, 64), "1..256 rows, got 512"),
        ((0x1008, 256, 4096, 256, 64), "16-byte aligned matrix and row stride, got address 0x1008"),
        ((0x1000, 256, 4100, 256, 64), "and 4100 columns"),
    ],
)
def test_rows_map_refuses_what_tma_cannot_copy(args, message):
    with pytest.raises(ValueError, match=message):
        _tensor_map.rows_map(*args)


def test_map_dtype_is_passed_by_value():
    # A one-element array of the map's dtype: CuPy passes such an argument by value.
    assert _tensor_map.MAP_DTYPE.itemsize == 128 and np.zeros(1, _tensor_map.MAP_DTYPE).size == 1


def test_rows_map_encodes_once_per_matrix(monkeypatch):
    # The driver call gets the matrix, its row stride, the box, the swizzle and zero fill;
    # its 128 bytes are the map, kept for the same numbers and encoded again for others.
    calls = []

    def encode(out, dtype, rank, address, dims, strides, box, steps, interleave, swizzle, promotion, fill):
        calls.append((dtype, rank, address, dims[0], dims[1], strides[0], box[0], box[1], swizzle, fill))
        ctypes.memset(out, len(calls), 128)
        return 0

    monkeypatch.setattr(_tensor_map, "_encode_tiled", lambda: encode)
    _tensor_map.rows_map.cache_clear()
    first = _tensor_map.rows_map(0x10000, 300, 4096, 256, 64)
    assert calls == [(1, 2, 0x10000, 4096, 300, 8192, 64, 256, 3, 0)]
    assert first.tobytes() == bytes([1]) * 128 and not first.flags.writeable
    assert _tensor_map.rows_map(0x10000, 300, 4096, 256, 64) is first and len(calls) == 1
    assert _tensor_map.rows_map(0x20000, 300, 4096, 256, 64).tobytes() == bytes([2]) * 128
    _tensor_map.rows_map.cache_clear()


def test_rows_map_names_a_driver_failure(monkeypatch):
    monkeypatch.setattr(_tensor_map, "_encode_tiled", lambda: lambda *args: 1)
    _tensor_map.rows_map.cache_clear()
    with pytest.raises(RuntimeError, match="CUresult 1 for a 300 x 4096 matrix, box 256 x 64"):
        _tensor_map.rows_map(0x10000, 300, 4096, 256, 64)
