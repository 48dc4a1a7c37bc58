"""Tensor versions of the array API, with bitsandbytes' names and defaults.

Every function takes and returns torch tensors (CPU or CUDA) and 4-bit / 8-bit states as
:class:`QuantState` of tensors. The work is done by the core (``cupyquant.blockwise``,
``cupyquant.matmul_4bit``) on zero-copy views of torch-allocated buffers, see
``_interop``.

Each op is also registered as a ``torch.library`` custom op (namespace ``cupyquant``)
with a fake implementation, so ``torch.compile(fullgraph=True)`` traces through it. In
eager mode the same kernels are called directly with the QuantState's cached array views:
the dispatcher round trip and re-wrapping every state tensor would cost more than the
M = 1 kernel itself.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import _reference
from .. import blockwise as _bw
from .. import codebooks as _codebooks
from ..quant_state import QuantState as _ArrayQuantState
from ._interop import (
    current_cupy_device,
    current_stream_ptr,
    float_format,
    format_of_dtype,
    kernel_context,
    storage,
    to_tensor,
    torch_dtype,
)

# The LLM.int8 ops live with the 8-bit layers; bitsandbytes users find them here.
from .int8 import (
    int8_double_quant,
    int8_linear_matmul,
    int8_mm_dequant,
    int8_vectorwise_dequant,
    int8_vectorwise_quant,
)

__all__ = [
    "QuantState",
    "create_dynamic_map",
    "dequantize_4bit",
    "dequantize_blockwise",
    "dequantize_fp4",
    "dequantize_nf4",
    "gemv_4bit",
    "get_4bit_type",
    "int8_double_quant",
    "int8_linear_matmul",
    "int8_mm_dequant",
    "int8_vectorwise_dequant",
    "int8_vectorwise_quant",
    "matmul_4bit",
    "quantize_4bit",
    "quantize_blockwise",
    "quantize_fp4",
    "quantize_nf4",
]

BLOCKSIZES_4BIT = _bw.BLOCKSIZES_4BIT
BLOCKSIZES_8BIT = _bw.BLOCKSIZES_8BIT
QUANT_TYPES = ("nf4", "fp4")
QUANT_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32)
NESTED_BLOCKSIZE = _reference.NESTED_BLOCKSIZE

# Activations with at most ``fused_max_m(fmt, N, K)`` rows take the core's fused matmul
# (GEMV / small-M GEMM); more rows dequantize the weight once into the compute dtype and
# use torch's GEMM (cuBLAS on CUDA). Without the core's measured switch point, only M = 1
# is fused. (``cupyquant.matmul_4bit`` the package attribute is the function, so the
# module is imported by name.)
_mm = importlib.import_module("..matmul_4bit", __package__)
_core_fused_max_m = getattr(_mm, "fused_max_m", None)


def fused_max_m(fmt: str, N: int, K: int, current_device: bool = True) -> int:
    """The largest number of activation rows that takes the fused kernels (``current_device``:
    as :func:`cupyquant.matmul_4bit.fused_max_m`)."""
    return 1 if _core_fused_max_m is None else _core_fused_max_m(fmt, N, K, current_device)


# ---------------------------------------------------------------------------------------
# QuantState of tensors
# ---------------------------------------------------------------------------------------
class QuantState(_ArrayQuantState):
    """bitsandbytes' ``QuantState`` holding torch tensors.

    Attributes (see ``cupyquant.QuantState``): ``absmax`` float32[blocks] (uint8[blocks]
    when nested), ``code`` float32[16] (4-bit) or float32[256] (8-bit), ``offset``
    float32 0-d tensor (nested only), ``state2`` the nested state, ``shape`` a tuple,
    ``dtype`` a torch dtype. Tensors live on the quantized tensor's device.

    ``as_dict(packed=True)`` gives bitsandbytes' checkpoint entries; ``from_dict`` reads
    them (tensors, NumPy or CuPy arrays). ``to(device)`` moves the tensors in place.

    ``tiled``: the packed bytes this state describes are in the tile order of
    :mod:`cupyquant.tiled_4bit` (set by a ``Linear4bit`` that keeps its weight tiled, the
    default on CUDA, or ``Params4bit.set_tile_order``; False for every state quantized or
    loaded by this module). The functions of this module read such bytes in place;
    checkpoints never hold them (``Linear4bit.state_dict`` writes the bitsandbytes layout).
    """

    _generation = 0
    tiled = False

    def __init__(
        self,
        absmax: Tensor,
        shape: tuple[int, ...] | torch.Size | None = None,
        code: Tensor | None = None,
        blocksize: int | None = None,
        quant_type: str | None = None,
        dtype: torch.dtype | str | None = None,
        offset: Tensor | None = None,
        state2: QuantState | None = None,
    ) -> None:
        object.__setattr__(self, "_kernel_views", {})
        super().__init__(
            absmax=absmax,
            shape=shape,
            code=code,
            blocksize=blocksize,
            quant_type=quant_type,
            dtype=None if dtype is None else torch_dtype(dtype),
            offset=offset,
            state2=state2,
        )

    def __setattr__(self, name: str, value: Any) -> None:
        # Any change of a field drops the cached array views built from the old fields.
        object.__setattr__(self, name, value)
        object.__setattr__(self, "_kernel_views", {})
        object.__setattr__(self, "_generation", self._generation + 1)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_kernel_views", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        object.__setattr__(self, "_kernel_views", {})

    # -- hooks of the array-level state ---------------------------------------------
    @classmethod
    def _move(cls, a: Any, device: Any) -> Tensor | None:
        if a is None:
            return None
        if not isinstance(a, Tensor):
            a = _as_tensor(a)
        return a if device is None else a.to(device)

    @classmethod
    def _make_dtype(cls, name: str) -> torch.dtype:
        return torch_dtype(name)

    @classmethod
    def _make_offset(cls, value: float, like: Tensor) -> Tensor:
        return torch.tensor(value, dtype=torch.float32, device=like.device)

    # -- the core's view -------------------------------------------------------------
    def kernel_state(self, fmt: str | None = None) -> _ArrayQuantState:
        """This state as zero-copy arrays for the core, with ``dtype`` set to ``fmt``
        (the format the kernels write; default this state's own dtype).

        Cached until a field of this state or of its nested state changes. On CUDA, call
        inside ``kernel_context`` of a tensor on the state's device.
        """
        fmt = fmt or (format_of_dtype(self.dtype, "quant_state.dtype") if self.dtype is not None else "float32")
        nested_generation = self.state2._generation if self.state2 is not None else 0
        cached = self._kernel_views.get(fmt)
        if cached is not None and cached[0] == nested_generation:
            return cached[1]
        state = _array_state(self, fmt)
        self._kernel_views[fmt] = (nested_generation, state)
        return state

    def packed_bytes(self, packed: Tensor) -> Any:
        """The packed codes this state describes as a flat uint8 array (zero-copy), cached."""
        return self._cached_view("packed", packed, _flat_bytes)

    def operand_view(self, t: Tensor) -> Any:
        """A tensor used with this state on every call (the bias) as a flat array, cached."""
        return self._cached_view("operand", t, _flat_storage)

    def _cached_view(self, slot: str, t: Tensor, make: Any) -> Any:
        # Keyed by the tensor's memory: the view aliases it, so in-place updates show;
        # and the cached view keeps that memory alive, so no other tensor can reuse the
        # address while the entry exists. Any field change of the state drops the cache.
        if not t.is_contiguous():
            return make(t)  # a contiguous copy: caching it would miss later in-place updates
        key = (t.data_ptr(), t.dtype, t.numel())
        cached = self._kernel_views.get(slot)
        if cached is not None and cached[0] == key:
            return cached[1]
        view = make(t)
        self._kernel_views[slot] = (key, view)
        return view

    def fused_launch(self, packed: Tensor, fmt: str, M: int, has_bias: bool, like: Tensor) -> Any:
        """The prepared fused-kernel launch for ``M`` rows of ``fmt`` (None where the fused
        kernels do not apply), built on first use and cached with the array views."""
        nested_generation = self.state2._generation if self.state2 is not None else 0
        key = ("launch", fmt, M, has_bias, packed.data_ptr(), nested_generation)
        cached = self._kernel_views.get(key)
        if cached is None:
            with kernel_context(like):
                packed_bytes, state = self.packed_bytes(packed), self.kernel_state(fmt)
                launch = _mm.prepare_fused(fmt, M, packed_bytes, state, has_bias, self.tiled)
            cached = self._kernel_views[key] = (launch,)
        return cached[0]

    def tensors(self) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """``(absmax, nested_absmax, nested_code, offset)``: what the custom ops take."""
        if self.state2 is None:
            return self.absmax, None, None, None
        return self.absmax, self.state2.absmax, self.state2.code, self.offset


def _as_tensor(a: Any) -> Tensor:
    """A NumPy array (shared), a CuPy or other DLPack array (shared, stream-synchronised
    by ``torch.from_dlpack``) or a number / list as a tensor."""
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a))
    if hasattr(a, "__dlpack__"):
        return torch.from_dlpack(a)
    return torch.as_tensor(a)


def _array_state(qs: QuantState, fmt: str) -> _ArrayQuantState:
    return _state_from_tensors(*qs.tensors(), qs.blocksize, qs.quant_type, qs.shape, fmt, code=qs.code)


class _OpState:
    """What the custom ops know of a state (its tensors and fields), with the methods of
    :class:`QuantState` the kernels use; rebuilt on every op call (nothing cached)."""

    __slots__ = ("args", "tiled")

    def __init__(self, *args: Any, tiled: bool = False) -> None:
        self.args = args
        self.tiled = tiled

    def kernel_state(self, fmt: str) -> _ArrayQuantState:
        return _state_from_tensors(*self.args, fmt)

    def packed_bytes(self, packed: Tensor) -> Any:
        return _flat_bytes(packed)

    def operand_view(self, t: Tensor) -> Any:
        return _flat_storage(t)


def _state_from_tensors(
    absmax: Tensor,
    nested_absmax: Tensor | None,
    nested_code: Tensor | None,
    offset: Tensor | None,
    blocksize: int,
    quant_type: str | None,
    shape: list[int] | tuple[int, ...] | None,
    fmt: str,
    code: Tensor | None = None,
) -> _ArrayQuantState:
    """The core's state (zero-copy arrays, ``dtype`` = ``fmt``) from a state's tensors and
    fields. Call inside ``kernel_context``."""
    state2 = None
    if nested_absmax is not None:
        if nested_code is None or offset is None:
            raise ValueError("a nested state needs nested_absmax, nested_code and offset together")
        state2 = _ArrayQuantState(
            absmax=storage(nested_absmax), code=storage(nested_code), blocksize=NESTED_BLOCKSIZE, dtype="float32"
        )
    return _ArrayQuantState(
        absmax=storage(absmax),
        shape=None if shape is None else tuple(shape),
        code=None if code is None else storage(code),
        blocksize=blocksize,
        quant_type=quant_type,
        dtype=fmt,
        offset=None if state2 is None else storage(offset),
        state2=state2,
    )


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------
def _check_tensor(t: Any, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """ValueError naming ``name``, the allowed values and ``value`` unless it is one of them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_state(quant_state: Any, name: str = "quant_state") -> None:
    """TypeError unless ``quant_state`` is a :class:`QuantState` of tensors."""
    if not isinstance(quant_state, QuantState):
        raise TypeError(f"{name} must be a cupyquant.torch.functional.QuantState, got {type(quant_state).__name__}")


def _check_same_device(a: Tensor, b: Tensor, what_a: str, what_b: str) -> None:
    if a.get_device() != b.get_device():
        raise ValueError(f"{what_a} is on {a.device} but {what_b} is on {b.device}")


def packed_elements(n: int, quant_storage: torch.dtype) -> int:
    """Elements of ``quant_storage`` that hold ``n`` 4-bit codes (two a byte, padded)."""
    return -(-((n + 1) // 2) // quant_storage.itemsize)


def _flat_storage(t: Tensor) -> Any:
    """:func:`storage` of ``t``, flattened."""
    return storage(t).reshape(-1)


def _flat_bytes(packed: Tensor) -> Any:
    """The packed codes as a flat uint8 array (any storage dtype)."""
    return storage(packed).reshape(-1).view(np.uint8)


def _check_out(out: Tensor, shape: tuple[int, ...], dtype: torch.dtype, like: Tensor) -> None:
    _check_tensor(out, "out")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"out must be a {tuple(shape)} tensor of {dtype}, got {tuple(out.shape)} of {out.dtype}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    _check_same_device(like, out, "A", "out")


# ---------------------------------------------------------------------------------------
# 4-bit quantization
# ---------------------------------------------------------------------------------------
@torch.library.custom_op("cupyquant::quantize_4bit", mutates_args=())
def _quantize_4bit_op(
    A: Tensor, blocksize: int, compress_statistics: bool, quant_type: str, packed_bytes: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(packed uint8[packed_bytes], absmax float32[blocks], nested codes uint8[blocks] or
    [0], nested_absmax float32[ceil(blocks / 256)] or [0], offset float32 0-d)``."""
    blocks = _reference.num_blocks(A.numel(), blocksize)
    packed = torch.empty(packed_bytes, dtype=torch.uint8, device=A.device)
    absmax = torch.empty(blocks, dtype=torch.float32, device=A.device)
    with kernel_context(A):
        _, state = _bw.quantize_4bit_bits(
            _flat_storage(A),
            float_format(A),
            tuple(A.shape),
            blocksize,
            compress_statistics,
            quant_type,
            packed_bytes=packed_bytes,
            absmax_out=storage(absmax),
            packed_out=storage(packed),
        )
        if not compress_statistics:
            empty = absmax.new_empty(0)
            return packed, absmax, empty.to(torch.uint8), empty, absmax.new_zeros(())
        return (
            packed,
            absmax,
            to_tensor(state.absmax, A.device),
            to_tensor(state.state2.absmax, A.device),
            to_tensor(state.offset, A.device).reshape(()),
        )


@_quantize_4bit_op.register_fake
def _(A, blocksize, compress_statistics, quant_type, packed_bytes):
    blocks = -(-A.numel() // blocksize)
    packed = A.new_empty(packed_bytes, dtype=torch.uint8)
    absmax = A.new_empty(blocks, dtype=torch.float32)
    if not compress_statistics:
        return (
            packed,
            absmax,
            A.new_empty(0, dtype=torch.uint8),
            A.new_empty(0, dtype=torch.float32),
            A.new_empty((), dtype=torch.float32),
        )
    nested_blocks = -(-blocks // NESTED_BLOCKSIZE)
    return (
        packed,
        absmax,
        A.new_empty(blocks, dtype=torch.uint8),
        A.new_empty(nested_blocks, dtype=torch.float32),
        A.new_empty((), dtype=torch.float32),
    )


def quantize_4bit(
    A: Tensor,
    absmax: Tensor | None = None,
    out: Tensor | None = None,
    blocksize: int = 64,
    compress_statistics: bool = False,
    quant_type: str = "fp4",
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[Tensor, QuantState]:
    """Quantize ``A`` to packed 4-bit codes, blockwise (bitsandbytes' ``quantize_4bit``).

    Args:
        A: float32 / float16 / bfloat16 tensor of any shape (CPU or CUDA).
        absmax: optional float32[ceil(A.numel() / blocksize)] tensor that receives the
            per-block absmax (before any nesting).
        out: optional ``(elements, 1)`` tensor of ``quant_storage`` for the packed codes.
        blocksize: one of 32, 64, ..., 4096.
        compress_statistics: also 8-bit quantize absmax (blocksize 256, offset = mean).
        quant_type: "nf4" or "fp4".
        quant_storage: dtype the packed bytes are viewed as (uint8, int8, float16,
            bfloat16, float32); only the view changes.

    Returns:
        ``(packed, QuantState)``: packed is ``((A.numel() + 1) // 2 // itemsize, 1)`` of
        ``quant_storage`` (rounded up), element 2j in the high nibble of byte j.
    """
    _check_tensor(A, "A")
    float_format(A)
    check_choice("blocksize", blocksize, BLOCKSIZES_4BIT)
    check_choice("quant_type", quant_type, QUANT_TYPES)
    check_choice("quant_storage", quant_storage, QUANT_STORAGE_DTYPES)
    elements = packed_elements(A.numel(), quant_storage)
    itemsize = quant_storage.itemsize
    if out is not None:
        _check_out(out, (elements, 1), quant_storage, A)
    if absmax is not None:
        _check_out(absmax, (_reference.num_blocks(A.numel(), blocksize),), torch.float32, A)
    packed_u8, block_absmax, q_absmax, nested_absmax, offset = torch.ops.cupyquant.quantize_4bit(
        A, blocksize, compress_statistics, quant_type, elements * itemsize
    )
    packed = packed_u8.view(quant_storage).reshape(elements, 1)
    if out is not None:
        packed = out.copy_(packed)
    if absmax is not None:
        block_absmax = absmax.copy_(block_absmax)
    code = get_4bit_type(quant_type, device=A.device)
    if compress_statistics:
        state2 = QuantState(
            absmax=nested_absmax,
            code=create_dynamic_map(device=A.device),
            blocksize=NESTED_BLOCKSIZE,
            dtype=torch.float32,
        )
        state = QuantState(
            absmax=q_absmax,
            shape=A.shape,
            code=code,
            blocksize=blocksize,
            quant_type=quant_type,
            dtype=A.dtype,
            offset=offset,
            state2=state2,
        )
    else:
        state = QuantState(
            absmax=block_absmax, shape=A.shape, code=code, blocksize=blocksize, quant_type=quant_type, dtype=A.dtype
        )
    return packed, state


def quantize_nf4(
    A: Tensor,
    absmax: Tensor | None = None,
    out: Tensor | None = None,
    blocksize: int = 64,
    compress_statistics: bool = False,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[Tensor, QuantState]:
    """:func:`quantize_4bit` with ``quant_type="nf4"``."""
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "nf4", quant_storage)


def quantize_fp4(
    A: Tensor,
    absmax: Tensor | None = None,
    out: Tensor | None = None,
    blocksize: int = 64,
    compress_statistics: bool = False,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[Tensor, QuantState]:
    """:func:`quantize_4bit` with ``quant_type="fp4"``."""
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "fp4", quant_storage)


# ---------------------------------------------------------------------------------------
# 4-bit dequantization
# ---------------------------------------------------------------------------------------
def _dequantize_4bit_into(packed: Any, state: _ArrayQuantState, out: Tensor, tiled: bool) -> Tensor:
    """Decode into ``out`` (a contiguous tensor of the state's format); ``tiled``: ``packed``
    in tile order. Inside kernel_context."""
    _bw.dequantize_4bit_bits(packed, state, _flat_storage(out), tiled)
    return out


@torch.library.custom_op("cupyquant::dequantize_4bit", mutates_args=())
def _dequantize_4bit_op(
    A: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor | None,
    nested_code: Tensor | None,
    offset: Tensor | None,
    blocksize: int,
    quant_type: str,
    shape: list[int],
    dtype: torch.dtype,
    tiled: bool = False,
) -> Tensor:
    """Packed codes (``tiled``: in tile order) -> a ``shape`` tensor of ``dtype``."""
    out = torch.empty(shape, dtype=dtype, device=A.device)
    with kernel_context(A):
        state = _state_from_tensors(
            absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape, float_format(out, "dtype")
        )
        return _dequantize_4bit_into(_flat_bytes(A), state, out, tiled)


@_dequantize_4bit_op.register_fake
def _(A, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape, dtype, tiled=False):
    return A.new_empty(shape, dtype=dtype)


def dequantize_4bit_as(A: Tensor, quant_state: QuantState, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """Decode packed codes into a ``quant_state.shape`` tensor of ``dtype``, which may
    differ from the state's own dtype (the float32 decode is rounded once to it).

    ``out``: optional contiguous tensor of that shape and dtype to write (unchecked).
    """
    if torch.compiler.is_compiling():
        result = torch.ops.cupyquant.dequantize_4bit(
            A, *quant_state.tensors(), quant_state.blocksize, quant_state.quant_type, list(quant_state.shape), dtype,
            quant_state.tiled,
        )  # fmt: skip
        return result if out is None else out.copy_(result)
    if out is None:
        out = torch.empty(quant_state.shape, dtype=dtype, device=A.device)
    with kernel_context(A):
        fmt = float_format(out, "dtype")
        return _dequantize_4bit_into(quant_state.packed_bytes(A), quant_state.kernel_state(fmt), out, quant_state.tiled)


def _check_state_4bit(quant_state: Any) -> None:
    check_state(quant_state)
    check_choice("quant_state.quant_type", quant_state.quant_type, QUANT_TYPES)
    if quant_state.shape is None:
        raise ValueError("quant_state.shape is None; a 4-bit state needs the original shape")
    format_of_dtype(quant_state.dtype, "quant_state.dtype")


def dequantize_4bit(
    A: Tensor,
    quant_state: QuantState | None = None,
    absmax: Tensor | None = None,
    out: Tensor | None = None,
    blocksize: int = 64,
    quant_type: str = "fp4",
) -> Tensor:
    """Decode packed 4-bit codes: ``code[q] * absmax[block]`` in float32, cast to the
    state's dtype (bitsandbytes' ``dequantize_4bit``).

    Args:
        A: the packed tensor from :func:`quantize_4bit` (any storage dtype), or its
            transpose (a ``(1, n)`` view, as ``Linear4bit.weight.t()``).
        quant_state: its QuantState. Without one, give ``absmax`` (float32[blocks]) and
            ``out`` (which sets shape and dtype), plus ``blocksize`` and ``quant_type``.
        out: optional contiguous output of the state's shape and dtype.

    Returns:
        The ``quant_state.shape`` tensor; transposed when ``A`` was the transposed
        ``(1, n)`` view of a 2-D weight, as bitsandbytes does.
    """
    _check_tensor(A, "A")
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("dequantize_4bit needs quant_state, or both absmax and out (out gives shape and dtype)")
        check_choice("blocksize", blocksize, BLOCKSIZES_4BIT)
        check_choice("quant_type", quant_type, QUANT_TYPES)
        quant_state = QuantState(
            absmax=absmax, shape=out.shape, blocksize=blocksize, quant_type=quant_type, dtype=out.dtype
        )
    _check_state_4bit(quant_state)
    _check_same_device(A, quant_state.absmax, "A", "quant_state.absmax")
    if out is not None:
        _check_out(out, quant_state.shape, quant_state.dtype, A)
    result = dequantize_4bit_as(A, quant_state, quant_state.dtype, out)
    transposed = A.dim() == 2 and A.shape[0] == 1 and A.shape[1] > 1 and result.dim() == 2
    return result.t() if transposed else result


def dequantize_nf4(
    A: Tensor,
    quant_state: QuantState | None = None,
    absmax: Tensor | None = None,
    out: Tensor | None = None,
    blocksize: int = 64,
) -> Tensor:
    """:func:`dequantize_4bit` with ``quant_type="nf4"``."""
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "nf4")


def dequantize_fp4(
    A: Tensor,
    quant_state: QuantState | None = None,
    absmax: Tensor | None = None,
    out: Tensor | None = None,
    blocksize: int = 64,
) -> Tensor:
    """:func:`dequantize_4bit` with ``quant_type="fp4"``."""
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "fp4")


# ---------------------------------------------------------------------------------------
# 4-bit matmul
# ---------------------------------------------------------------------------------------
def _matmul_4bit_kernels(
    A: Tensor, packed: Tensor, state: QuantState | _OpState, N: int, K: int, bias: Tensor | None
) -> Tensor:
    """``A @ W^T (+ bias)`` for ``A`` (..., K), W the (N, K) weight in ``packed``.

    Few rows: the core's fused matmul. Many rows: dequantize W once into the compute
    dtype and let torch's GEMM (cuBLAS on CUDA) do the product.
    """
    lead = A.shape[:-1]
    M = A.numel() // K if K else int(np.prod(lead, dtype=np.int64))
    fmt = float_format(A)
    if M == 0:
        return A.new_empty((*lead, N))
    if A.is_cuda:
        with kernel_context(A):  # the switch point of A's device (its own kernels)
            limit = fused_max_m(fmt, N, K)
    else:
        limit = fused_max_m(fmt, N, K, current_device=False)  # the same bits whatever GPU the host has
    if M > limit:
        weight = torch.empty((N, K), dtype=A.dtype, device=A.device)
        with kernel_context(A):
            _dequantize_4bit_into(state.packed_bytes(packed), state.kernel_state(fmt), weight, state.tiled)
        return torch.nn.functional.linear(A, weight, bias)
    if A.is_cuda and isinstance(state, QuantState):
        out = _matmul_4bit_prepared(A, packed, state, fmt, M, N, bias)
        if out is not None:
            return out
    out = torch.empty((*lead, N), dtype=A.dtype, device=A.device)
    with kernel_context(A):
        _mm.matmul_4bit_bits(
            _flat_storage(A),
            fmt,
            M,
            state.packed_bytes(packed),
            state.kernel_state(fmt),
            None if bias is None else state.operand_view(bias),
            _flat_storage(out),
            state.tiled,
        )
    return out


def _matmul_4bit_prepared(
    A: Tensor, packed: Tensor, state: QuantState, fmt: str, M: int, N: int, bias: Tensor | None
) -> Tensor | None:
    """The eager fast path: the fused kernel launched from a launch prepared once per
    (weight, format, M), with raw pointers on torch's current stream. None when it does
    not apply (another GPU is current, unaligned or strided operands): the general path
    then runs."""
    index = A.get_device()
    if index != current_cupy_device():
        return None
    if not A.is_contiguous() or (bias is not None and not bias.is_contiguous()):
        return None
    launch = state.fused_launch(packed, fmt, M, bias is not None, A)
    if launch is None or not launch.accepts(A.data_ptr()):
        return None
    out = torch.empty((*A.shape[:-1], N), dtype=A.dtype, device=A.device)
    launch(A.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(), current_stream_ptr(index))
    return out


@torch.library.custom_op("cupyquant::matmul_4bit", mutates_args=())
def _matmul_4bit_op(
    A: Tensor,
    B: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor | None,
    nested_code: Tensor | None,
    offset: Tensor | None,
    blocksize: int,
    quant_type: str,
    shape: list[int],
    bias: Tensor | None,
    tiled: bool = False,
) -> Tensor:
    """``A (..., K) @ W^T + bias`` where W is the (N, K) = ``shape`` weight packed in B
    (``tiled``: in tile order)."""
    state = _OpState(absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape, tiled=tiled)
    return _matmul_4bit_kernels(A, B, state, shape[0], shape[1], bias)


@_matmul_4bit_op.register_fake
def _(A, B, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape, bias, tiled=False):
    return A.new_empty((*A.shape[:-1], shape[0]))


def check_matmul_operands(A: Tensor, B: Tensor, quant_state: QuantState, bias: Tensor | None = None) -> None:
    """Validate the operands of :func:`matmul_4bit` (TypeError / ValueError naming the value)."""
    _check_tensor(A, "A")
    _check_tensor(B, "B")
    check_state(quant_state)
    float_format(A)
    if quant_state.shape is None or len(quant_state.shape) != 2:
        raise ValueError(f"B must be a quantized 2-D (N, K) weight, got quant_state.shape {quant_state.shape}")
    N, K = quant_state.shape
    if A.dim() < 1 or A.shape[-1] != K:
        raise ValueError(f"A's last dimension must equal the weight's K = {K}, got A of shape {tuple(A.shape)}")
    _check_same_device(A, B, "A", "B")
    if quant_state.absmax.device != B.device:
        raise ValueError(f"quant_state is on {quant_state.absmax.device} but B is on {B.device}")
    if bias is not None:
        _check_tensor(bias, "bias")
        if bias.numel() != N or bias.dtype != A.dtype:
            raise ValueError(f"bias must be ({N},) of {A.dtype}, got {tuple(bias.shape)} of {bias.dtype}")
        _check_same_device(A, bias, "A", "bias")


def matmul_4bit(
    A: Tensor, B: Tensor, quant_state: QuantState, out: Tensor | None = None, bias: Tensor | None = None
) -> Tensor:
    """``A @ dequantize(B)^T (+ bias)``, without autograd (see ``cupyquant.torch.matmul_4bit``).

    Args:
        A: (..., K) float32 / float16 / bfloat16 activations.
        B: the packed weight of an (N, K) matrix (``Linear4bit.weight`` or its ``.t()``).
        quant_state: B's QuantState, ``shape == (N, K)``.
        out: optional contiguous (..., N) tensor of A's dtype.
        bias: optional (N,) tensor of A's dtype.

    Returns:
        (..., N) tensor of A's dtype.
    """
    check_matmul_operands(A, B, quant_state, bias)
    if out is not None:
        _check_out(out, (*A.shape[:-1], quant_state.shape[0]), A.dtype, A)
    result = matmul_4bit_unchecked(A, B, quant_state, bias)
    return result if out is None else out.copy_(result)


def matmul_4bit_unchecked(A: Tensor, B: Tensor, quant_state: QuantState, bias: Tensor | None) -> Tensor:
    """The unchecked product: the custom op while compiling, the kernels directly in eager."""
    if torch.compiler.is_compiling():
        return torch.ops.cupyquant.matmul_4bit(
            A, B, *quant_state.tensors(), quant_state.blocksize, quant_state.quant_type, list(quant_state.shape), bias,
            quant_state.tiled,
        )  # fmt: skip
    N, K = quant_state.shape
    return _matmul_4bit_kernels(A, B, quant_state, N, K, bias)


def gemv_4bit(
    A: Tensor,
    B: Tensor,
    out: Tensor | None = None,
    transposed_A: bool = False,
    transposed_B: bool = False,
    state: QuantState | None = None,
) -> Tensor:
    """bitsandbytes' ``gemv_4bit``: :func:`matmul_4bit` for one row of activations.

    ``A`` holds exactly one row (M = 1), shape (..., K); ``B`` the packed (N, K) weight;
    ``state`` its QuantState. ``transposed_A`` / ``transposed_B`` are accepted for
    signature compatibility; the packed layout does not depend on them.
    """
    if state is None:
        raise ValueError("state cannot be None: gemv_4bit needs the QuantState from quantize_4bit")
    _check_tensor(A, "A")
    rows = A.numel() // A.shape[-1] if A.dim() and A.shape[-1] else 0
    if rows != 1:
        raise ValueError(f"gemv_4bit needs exactly one row of activations (M = 1), got A of shape {tuple(A.shape)}")
    return matmul_4bit(A, B, state, out=out)


# ---------------------------------------------------------------------------------------
# 8-bit blockwise
# ---------------------------------------------------------------------------------------
@torch.library.custom_op("cupyquant::quantize_blockwise", mutates_args=())
def _quantize_blockwise_op(
    A: Tensor, code: Tensor, blocksize: int, nested: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(codes uint8 A.shape, absmax float32[blocks] or nested uint8[blocks],
    nested_absmax float32 or [0], offset float32 0-d)``."""
    q = torch.empty(A.shape, dtype=torch.uint8, device=A.device)
    absmax = torch.empty(_reference.num_blocks(A.numel(), blocksize), dtype=torch.float32, device=A.device)
    with kernel_context(A):
        _, state = _bw.quantize_blockwise_bits(
            _flat_storage(A),
            float_format(A),
            tuple(A.shape),
            _flat_storage(code),
            blocksize,
            nested,
            q_out=_flat_storage(q),
            absmax_out=storage(absmax),
        )
        if not nested:
            return q, absmax, absmax.new_empty(0), absmax.new_zeros(())
        return (
            q,
            to_tensor(state.absmax, A.device),
            to_tensor(state.state2.absmax, A.device),
            to_tensor(state.offset, A.device).reshape(()),
        )


@_quantize_blockwise_op.register_fake
def _(A, code, blocksize, nested):
    blocks = -(-A.numel() // blocksize)
    q = A.new_empty(A.shape, dtype=torch.uint8)
    if not nested:
        return (
            q,
            A.new_empty(blocks, dtype=torch.float32),
            A.new_empty(0, dtype=torch.float32),
            A.new_empty((), dtype=torch.float32),
        )
    return (
        q,
        A.new_empty(blocks, dtype=torch.uint8),
        A.new_empty(-(-blocks // NESTED_BLOCKSIZE), dtype=torch.float32),
        A.new_empty((), dtype=torch.float32),
    )


def quantize_blockwise(
    A: Tensor,
    code: Tensor | None = None,
    absmax: Tensor | None = None,
    out: Tensor | None = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> tuple[Tensor, QuantState]:
    """Quantize ``A`` to 8-bit codes, blockwise: nearest entry of ``code`` to ``x / absmax``.

    Args:
        A: float32 / float16 / bfloat16 tensor of any shape.
        code: sorted float32[256] codebook on A's device; default the signed dynamic map.
        absmax: optional float32[blocks] tensor that receives the per-block absmax
            (non-nested only; with ``nested`` the state holds the compressed form).
        out: optional uint8 tensor of A's shape for the codes.
        blocksize: one of 64, 128, ..., 4096.
        nested: also 8-bit quantize absmax (blocksize 256, offset = mean).

    Returns:
        ``(uint8 tensor of A's shape, QuantState)``.
    """
    _check_tensor(A, "A")
    float_format(A)
    check_choice("blocksize", blocksize, BLOCKSIZES_8BIT)
    if code is None:
        code = create_dynamic_map(device=A.device)
    else:
        _check_tensor(code, "code")
        if code.numel() != 256 or code.dtype != torch.float32:
            raise ValueError(f"code must be float32[256], got {code.dtype}[{code.numel()}]")
        _check_same_device(A, code, "A", "code")
    if out is not None:
        _check_out(out, tuple(A.shape), torch.uint8, A)
    if absmax is not None:
        _check_out(absmax, (_reference.num_blocks(A.numel(), blocksize),), torch.float32, A)
    q, qabsmax, nested_absmax, offset = torch.ops.cupyquant.quantize_blockwise(A, code, blocksize, nested)
    if out is not None:
        q = out.copy_(q)
    if absmax is not None and not nested:
        qabsmax = absmax.copy_(qabsmax)
    if nested:
        state2 = QuantState(
            absmax=nested_absmax,
            code=create_dynamic_map(device=A.device),
            blocksize=NESTED_BLOCKSIZE,
            dtype=torch.float32,
        )
        return q, QuantState(
            absmax=qabsmax, shape=A.shape, code=code, blocksize=blocksize, dtype=A.dtype, offset=offset, state2=state2
        )
    return q, QuantState(absmax=qabsmax, shape=A.shape, code=code, blocksize=blocksize, dtype=A.dtype)


@torch.library.custom_op("cupyquant::dequantize_blockwise", mutates_args=())
def _dequantize_blockwise_op(
    A: Tensor,
    absmax: Tensor,
    code: Tensor,
    nested_absmax: Tensor | None,
    nested_code: Tensor | None,
    offset: Tensor | None,
    blocksize: int,
    dtype: torch.dtype,
) -> Tensor:
    """uint8 codes -> a tensor of A's shape and ``dtype``."""
    out = torch.empty(A.shape, dtype=dtype, device=A.device)
    with kernel_context(A):
        state = _state_from_tensors(
            absmax,
            nested_absmax,
            nested_code,
            offset,
            blocksize,
            None,
            list(A.shape),
            float_format(out, "dtype"),
            code=code,
        )
        _bw.dequantize_blockwise_bits(_flat_storage(A), state, _flat_storage(out))
    return out


@_dequantize_blockwise_op.register_fake
def _(A, absmax, code, nested_absmax, nested_code, offset, blocksize, dtype):
    return A.new_empty(A.shape, dtype=dtype)


def dequantize_blockwise(
    A: Tensor,
    quant_state: QuantState | None = None,
    absmax: Tensor | None = None,
    code: Tensor | None = None,
    out: Tensor | None = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> Tensor:
    """Decode 8-bit codes: ``code[q] * absmax[block]`` in float32, cast to the state's dtype.

    Args:
        A: uint8 codes of any shape (the output keeps it).
        quant_state: the QuantState from :func:`quantize_blockwise`. Without one, give
            ``absmax`` (float32[blocks]); ``code`` defaults to the dynamic map and the
            output is float32 unless ``out`` says otherwise.
        out: optional contiguous output of A's shape and the state's dtype.
    """
    _check_tensor(A, "A")
    if A.dtype != torch.uint8:
        raise ValueError(f"A must be uint8 codes, got {A.dtype}")
    if quant_state is None:
        if absmax is None:
            raise ValueError("dequantize_blockwise needs quant_state or absmax")
        if nested:
            raise ValueError("nested=True needs the quant_state that holds the nested absmax")
        check_choice("blocksize", blocksize, BLOCKSIZES_8BIT)
        quant_state = QuantState(
            absmax=absmax,
            code=create_dynamic_map(device=A.device) if code is None else code,
            blocksize=blocksize,
            dtype=out.dtype if out is not None else torch.float32,
        )
    check_state(quant_state)
    _check_same_device(A, quant_state.absmax, "A", "quant_state.absmax")
    dtype = quant_state.dtype if quant_state.dtype is not None else torch.float32
    format_of_dtype(dtype, "quant_state.dtype")
    if out is not None:
        _check_out(out, tuple(A.shape), dtype, A)
    absmax_t, nested_absmax, nested_code, offset = quant_state.tensors()
    result = torch.ops.cupyquant.dequantize_blockwise(
        A, absmax_t, quant_state.code, nested_absmax, nested_code, offset, quant_state.blocksize, dtype
    )
    return result if out is None else out.copy_(result)


# ---------------------------------------------------------------------------------------
# codebooks as tensors
# ---------------------------------------------------------------------------------------
_CODE_CACHE: dict[tuple[str, torch.device], Tensor] = {}


def _cached_code(name: str, make: Any, device: torch.device | str | None) -> Tensor:
    """A fresh tensor of the codebook ``make()`` on ``device``, cloned from one cached per
    device, so building a state copies host memory to the GPU only the first time."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    key = (name, device)
    cached = _CODE_CACHE.get(key)
    if cached is None:
        cached = _CODE_CACHE[key] = torch.from_numpy(np.array(make(), dtype=np.float32)).to(device)
    return cached.clone()


def get_4bit_type(typename: str, device: torch.device | str | None = None, blocksize: int = 64) -> Tensor:
    """The 16-value float32 codebook of ``"nf4"`` or ``"fp4"`` as a tensor on ``device``.

    ``blocksize`` is accepted for bitsandbytes compatibility; the codebook does not depend on it.
    """
    check_choice("typename", typename, QUANT_TYPES)
    return _cached_code(typename, lambda: _codebooks.get_4bit_type(typename), device)


def create_dynamic_map(
    signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8, device: torch.device | str | None = None
) -> Tensor:
    """The dynamic 8-bit map (float32[256], sorted) as a tensor on ``device``."""
    name = f"dynamic-{signed}-{max_exponent_bits}-{total_bits}"
    return _cached_code(name, lambda: _codebooks.create_dynamic_map(signed, max_exponent_bits, total_bits), device)
