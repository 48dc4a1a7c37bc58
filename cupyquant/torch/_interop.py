"""Where torch tensors cross into the array API: zero-copy views, device, stream, allocator.

Every call from ``cupyquant.torch`` into the core goes through this module:

- :func:`storage` views a tensor as a NumPy (CPU) or CuPy (CUDA) array without copying;
  bfloat16 / float16 travel as 16-bit integer views (DLPack and CuPy have no bfloat16).
- :func:`kernel_context` makes the tensor's GPU current for CuPy, makes torch's *current*
  stream (read at each call, so CUDA-graph capture and user streams are honoured) CuPy's
  current stream, and routes CuPy's temporary allocations through torch's caching
  allocator (scoped and thread-local; CuPy's global allocator is never replaced).
- :func:`to_tensor` wraps an array the core allocated back into a tensor, zero-copy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._xp import cupy

__all__ = [
    "FLOAT_DTYPES",
    "float_format",
    "format_of_dtype",
    "current_cupy_device",
    "current_stream_ptr",
    "kernel_context",
    "storage",
    "to_tensor",
    "torch_dtype",
]

# torch dtype -> the core's float format name
FLOAT_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
_TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "uint8": torch.uint8,
    "int8": torch.int8,
}


def float_format(t: torch.Tensor, what: str = "A") -> str:
    """The core's format name of a float tensor: 'float32', 'float16' or 'bfloat16'.

    Raises ValueError naming the dtype for any other dtype.
    """
    return format_of_dtype(t.dtype, what)


def format_of_dtype(dtype: torch.dtype, what: str = "dtype") -> str:
    """:func:`float_format` of a torch dtype."""
    fmt = FLOAT_DTYPES.get(dtype)
    if fmt is None:
        raise ValueError(f"{what} must be float32, float16 or bfloat16, got {dtype}")
    return fmt


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """``torch.float16`` for 'float16' (or a torch dtype, returned as is)."""
    if isinstance(name, torch.dtype):
        return name
    dtype = _TORCH_DTYPES.get(name)
    if dtype is None:
        raise ValueError(f"dtype must be one of {tuple(_TORCH_DTYPES)}, got {name!r}")
    return dtype


def storage(t: torch.Tensor) -> Any:
    """A zero-copy NumPy (CPU) or CuPy (CUDA) array over ``t``'s memory, same shape.

    bfloat16 tensors come back as uint16 arrays of their bits (pass the format name from
    :func:`float_format` alongside), the form the core takes; float16 stays float16,
    which DLPack, NumPy and CuPy all carry. Tensors that require grad are
    detached for the crossing; a non-contiguous tensor is made contiguous first (a
    copy, since the kernels ignore strides). On CUDA, call inside
    :func:`kernel_context` so the array is used on torch's current stream.
    """
    if t.requires_grad:
        t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    bits = t.dtype == torch.bfloat16
    if bits:
        t = t.view(torch.int16)
    if t.is_cuda:
        # The capsule is handed over directly (stream -1: no cross-stream sync): the
        # kernels run on torch's current stream, so the event torch's __dlpack__ would
        # record per tensor is never needed, and its cost would be paid on every call.
        array = cupy().from_dlpack(torch.utils.dlpack.to_dlpack(t))
    elif t.is_cpu:
        array = t.numpy()
    else:
        raise ValueError(f"tensors must be on a cpu or cuda device, got {t.device}")
    return array.view(np.uint16) if bits else array


def to_tensor(array: Any, device: torch.device) -> torch.Tensor:
    """A tensor of an array the core allocated itself (any NumPy dtype torch has).

    A NumPy array is wrapped without a copy; a CuPy array is copied once into a tensor
    torch allocates on ``device`` (call inside :func:`kernel_context`), so the result
    lives in torch's memory like every other tensor of the adapter.
    """
    if isinstance(array, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(array))
    dtype = torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype
    out = torch.empty(tuple(array.shape), dtype=dtype, device=device)
    storage(out)[...] = array
    return out


# ---------------------------------------------------------------------------------------
# device, stream and allocator for CuPy
# ---------------------------------------------------------------------------------------
class _StreamHandle:
    """A raw stream pointer in the CUDA stream protocol, for ``cupy.cuda.Stream.from_external``."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


# (stream pointer, device) -> CuPy stream. Streams are few and long-lived; the wrapper
# is cheap to keep and expensive enough to build that a per-call construction shows up.
_STREAMS: dict[tuple[int, int], Any] = {}
_STREAM_CACHE_LIMIT = 256
_ALLOCATORS: dict[int, Any] = {}


def _cupy_stream(ptr: int, index: int) -> Any:
    stream = _STREAMS.get((ptr, index))
    if stream is None:
        if len(_STREAMS) >= _STREAM_CACHE_LIMIT:
            _STREAMS.clear()
        cuda = cupy().cuda
        if hasattr(cuda.Stream, "from_external"):
            stream = cuda.Stream.from_external(_StreamHandle(ptr))
        else:  # CuPy < 14
            stream = cuda.ExternalStream(ptr, index)
        _STREAMS[(ptr, index)] = stream
    return stream


def _current_stream_ptr(index: int) -> int:
    """torch's current stream on GPU ``index``, as a raw pointer (read every call)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(index)
    return torch.cuda.current_stream(index).cuda_stream


def _torch_allocator(index: int) -> Any:
    """A CuPy allocator drawing from torch's caching allocator on GPU ``index``.

    Temporaries the core allocates then come from the same pool as torch's tensors, on
    the current stream, and from the graph's private pool during CUDA-graph capture
    (CuPy's own pool would hand the captured addresses to later work).
    """
    alloc = _ALLOCATORS.get(index)
    if alloc is None:
        cuda = cupy().cuda
        device = torch.device("cuda", index)

        def alloc(nbytes: int) -> Any:
            buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
            return cuda.MemoryPointer(cuda.UnownedMemory(buf.data_ptr(), nbytes, buf, index), 0)

        _ALLOCATORS[index] = alloc
    return alloc


def _swap_allocator(allocator: Any) -> Any:
    """Make ``allocator`` CuPy's allocator on this thread; returns the one it replaces.

    These are the two calls ``cupy.cuda.using_allocator`` makes; calling them directly
    saves a generator-based context manager on every kernel call.
    """
    memory = cupy().cuda.memory
    previous = memory._get_thread_local_allocator()
    memory._set_thread_local_allocator(allocator)
    return previous


class _CudaKernelContext:
    """CuPy device + torch's current stream + torch's allocator, for one GPU."""

    __slots__ = ("index", "_device", "_stream", "_previous_alloc")

    def __init__(self, index: int) -> None:
        self.index = index

    def __enter__(self) -> _CudaKernelContext:
        cuda = cupy().cuda
        self._device = cuda.Device(self.index)
        self._device.__enter__()
        self._stream = _cupy_stream(_current_stream_ptr(self.index), self.index)
        self._stream.__enter__()
        self._previous_alloc = _swap_allocator(_torch_allocator(self.index))
        return self

    def __exit__(self, *exc: object) -> None:
        _swap_allocator(self._previous_alloc)
        self._stream.__exit__(*exc)
        self._device.__exit__(*exc)


class _NoKernelContext:
    __slots__ = ()

    def __enter__(self) -> _NoKernelContext:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


_CPU_CONTEXT = _NoKernelContext()


def current_cupy_device() -> int:
    """The GPU current for CuPy (and the CUDA runtime) on this thread."""
    return cupy().cuda.runtime.getDevice()


def current_stream_ptr(index: int) -> int:
    """torch's current stream on GPU ``index`` as a raw pointer (read at every call)."""
    return _current_stream_ptr(index)


def kernel_context(t: torch.Tensor) -> _CudaKernelContext | _NoKernelContext:
    """The context in which the core runs on ``t``'s device.

    For a CUDA tensor: its GPU (``cupy.cuda.Device(t.device.index)``), torch's current
    stream on that GPU as CuPy's current stream, and torch's caching allocator for CuPy's
    temporaries. A no-op for CPU tensors.
    """
    if t.is_cuda:
        return _CudaKernelContext(t.get_device())
    return _CPU_CONTEXT
