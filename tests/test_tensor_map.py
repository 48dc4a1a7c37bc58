"""The TMA tensor-map helper: argument checks (before any driver call) and the map's size."""

import numpy as np
import pytest

from cupyquant import _tensor_map


def test_zero_map_is_one_cutensormap_of_zeros():
    zero = _tensor_map.zero_map()
    assert zero.shape == (1,) and zero.nbytes == 128 and zero.tobytes() == bytes(128)


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
