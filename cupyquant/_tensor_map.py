"""TMA tensor maps (the driver's ``CUtensorMap``) for kernels that copy 2-D tiles with the
Tensor Memory Accelerator, passed to a kernel by value as a one-element NumPy array.

A map names a row-major matrix of 16-bit values in device memory, the box a copy moves and
the shared-memory swizzle it lands in; out-of-bounds elements arrive as zeros. Encoding is a
host call into the driver (no device work), so a map can be made per call and captured into
a CUDA graph with the launch that takes it (the launch copies its parameters).
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import numpy as np

_MAP_BYTES = 128  # sizeof(CUtensorMap); the driver wants it 64-byte aligned, the kernel 128
_U16 = 1  # CU_TENSOR_MAP_DATA_TYPE_UINT16
_INTERLEAVE_NONE = 0
_SWIZZLE_128B = 3
_L2_PROMOTION_256B = 3
_OOB_FILL_ZEROS = 0  # CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE: zeros
MAP_DTYPE = np.dtype((np.void, _MAP_BYTES))


@lru_cache(maxsize=1)
def _encode_tiled():
    """The driver's cuTensorMapEncodeTiled (loaded on first use: the CPU-only install has none)."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError as error:
        raise RuntimeError(f"TMA tensor maps need the CUDA driver (libcuda.so.1): {error}") from error
    fn = driver.cuTensorMapEncodeTiled
    fn.restype = ctypes.c_int
    fn.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                   ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64),
                   ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32),
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int)  # fmt: skip
    return fn


@lru_cache(maxsize=1)
def zero_map() -> np.ndarray:
    """A map-sized argument for kernel builds that take a map and do not read it (read-only)."""
    zero = np.zeros(1, dtype=MAP_DTYPE)
    zero.flags.writeable = False
    return zero


@lru_cache(maxsize=256)
def rows_map(address: int, rows: int, cols: int, box_rows: int, box_cols: int) -> np.ndarray:
    """The map of a row-major ``rows`` x ``cols`` matrix of 16-bit values at device ``address``,
    copied in boxes of ``box_rows`` x ``box_cols`` (``box_cols`` * 2 == 128: one 128-byte
    swizzle atom a row), landing with the 128-byte swizzle; zeros past the matrix. Read-only;
    a map depends on nothing but these numbers, so maps are kept for the addresses a model
    reuses call after call (a driver call costs more than the lookup)."""
    if box_cols * 2 != 128:
        raise ValueError(f"the 128-byte swizzle takes rows of 128 bytes: box_cols must be 64, got {box_cols}")
    if not 1 <= box_rows <= 256:
        raise ValueError(f"a TMA box has 1..256 rows, got {box_rows}")
    if address % 16 or (cols * 2) % 16:
        raise ValueError(f"TMA needs a 16-byte aligned matrix and row stride, got address {address:#x} and "
                         f"{cols} columns")  # fmt: skip
    raw = ctypes.create_string_buffer(2 * _MAP_BYTES)
    aligned = (ctypes.addressof(raw) + _MAP_BYTES - 1) // _MAP_BYTES * _MAP_BYTES
    dims = (ctypes.c_uint64 * 2)(cols, rows)  # innermost first
    strides = (ctypes.c_uint64 * 1)(cols * 2)  # bytes from one row to the next
    box = (ctypes.c_uint32 * 2)(box_cols, box_rows)
    steps = (ctypes.c_uint32 * 2)(1, 1)
    status = _encode_tiled()(aligned, _U16, 2, address, dims, strides, box, steps, _INTERLEAVE_NONE,
                             _SWIZZLE_128B, _L2_PROMOTION_256B, _OOB_FILL_ZEROS)  # fmt: skip
    if status != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUresult {status} for a {rows} x {cols} matrix, "
                           f"box {box_rows} x {box_cols}")  # fmt: skip
    out = np.zeros(1, dtype=MAP_DTYPE)
    ctypes.memmove(out.ctypes.data, aligned, _MAP_BYTES)
    out.flags.writeable = False
    return out
