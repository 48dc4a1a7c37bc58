"""The one place that touches CuPy: lazy import, array-module dispatch, device guard.

NumPy arrays run on the CPU reference path; CuPy arrays run the RawKernels on the
array's own device and the current CuPy stream. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import functools
from types import ModuleType
from typing import Any

import numpy as np

# The floating formats the kernels read and write. bfloat16 travels as its 16 raw bits
# (uint16), because NumPy and CuPy have no native bfloat16 dtype.
FLOAT_FORMATS = ("float32", "float16", "bfloat16")
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y (and z)


def is_cupy_array(a: Any) -> bool:
    """True for a ``cupy.ndarray`` (checked without importing CuPy)."""
    return type(a).__module__.startswith("cupy")


@functools.cache
def cupy() -> ModuleType:
    """Import CuPy on first use, with an error that says how to get it."""
    try:
        import cupy as cp
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("CuPy arrays need CuPy: pip install 'cupyquant[cuda12]' or 'cupyquant[cuda13]'") from exc
    return cp


@functools.cache
def gpu_available() -> bool:
    """True where CuPy imports and a CUDA device is usable (importing alone is no proof)."""
    try:
        import cupy as cp
    except ImportError:
        return False
    try:
        return bool(cp.cuda.is_available())
    except Exception:  # noqa: BLE001 - any driver/runtime failure means "no GPU"
        return False


def array_module(a: Any) -> ModuleType:
    """NumPy or CuPy, whichever holds ``a``."""
    if is_cupy_array(a):
        return cupy()
    if isinstance(a, np.ndarray):
        return np
    raise TypeError(f"expected a NumPy or CuPy array, got {type(a).__name__}")


def device_of(a: Any) -> contextlib.AbstractContextManager:
    """A context that makes ``a``'s device current (a no-op for NumPy arrays)."""
    if is_cupy_array(a):
        return a.device
    return contextlib.nullcontext()


def float_format(a: Any, what: str = "A") -> str:
    """The float format name of an array's dtype, or a ValueError naming the dtype."""
    name = np.dtype(a.dtype).name if a.dtype.name != "bfloat16" else "bfloat16"
    if name not in FLOAT_FORMATS:
        raise ValueError(f"{what} must be float32, float16 or bfloat16, got {a.dtype}")
    return name


def storage_view(a: Any) -> Any:
    """``a`` with bfloat16 reinterpreted as uint16 bits; other dtypes unchanged."""
    if a.dtype.name == "bfloat16":
        return a.view(np.uint16)
    return a


def storage_dtype(fmt: str) -> np.dtype:
    """The NumPy dtype that holds values of a float format (bfloat16 -> uint16 bits)."""
    return np.dtype(np.uint16) if fmt == "bfloat16" else np.dtype(fmt)


def bfloat16_dtype() -> np.dtype | None:
    """ml_dtypes' bfloat16 where it is installed (optional), else None."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


@functools.cache
def _device_attributes(device_id: int) -> dict[str, int]:
    return dict(cupy().cuda.Device(device_id).attributes)


def device_attribute(name: str, default: int | None = None) -> int:
    """A CUDA attribute of the current CuPy device (e.g. "MultiProcessorCount"), cached."""
    attrs = _device_attributes(cupy().cuda.Device().id)
    if default is None:
        return int(attrs[name])
    return int(attrs.get(name, default))


def aligned(a: Any, alignment: int) -> Any:
    """``a``, or a fresh (256-byte aligned) copy when its address is not ``alignment``-aligned:
    the kernels' vector loads need aligned addresses, and user views may not have them."""
    return a if a.data.ptr % alignment == 0 else a.copy()


def same_module(a: Any, b: Any, what_a: str, what_b: str) -> None:
    """Refuse mixing NumPy and CuPy arrays (or arrays on different GPUs)."""
    if is_cupy_array(a) != is_cupy_array(b):
        raise ValueError(
            f"{what_a} and {what_b} must both be NumPy or both be CuPy arrays, "
            f"got {type(a).__module__}.{type(a).__name__} and {type(b).__module__}.{type(b).__name__}"
        )
    if is_cupy_array(a) and a.device.id != b.device.id:
        raise ValueError(f"{what_a} is on GPU {a.device.id} but {what_b} is on GPU {b.device.id}")
