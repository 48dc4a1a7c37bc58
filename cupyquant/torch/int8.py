"""LLM.int8 for torch: the 8-bit parameter, layers, autograd and the outlier tracer.

- Tensor versions of the int8 ops (``int8_vectorwise_quant``, ``int8_vectorwise_dequant``,
  ``int8_double_quant``, ``int8_linear_matmul``, ``int8_mm_dequant``, ``int8_linear``),
  working on zero-copy views of torch tensors (``_interop``), on the CPU too; each is
  also a ``torch.library`` custom op (``torch.ops.cupyquant.int8_*``) with a fake
  implementation, so ``torch.compile(fullgraph=True)`` traces the layers and
  :func:`matmul`'s forward and backward.
- :class:`Int8Params`: a weight that quantizes itself row-wise to int8 on its move to a
  device. It owns its codes (``CB`` is its data) and scales (``SCB``).
- :class:`MatmulLtState`, :func:`matmul` (``A @ B^T`` through int8 with its backward),
  :func:`matmul_mixed` (weight gradient in 16-bit).
- :class:`Linear8bitLt`, :class:`SwitchBackLinearBnb`: bitsandbytes' layers.
- :class:`OutlierTracer`, :func:`find_outlier_dims`, :class:`OutlierAwareLinear`.

Arithmetic is ``cupyquant.int8``'s (bit-equal on CPU and GPU). Differences from
bitsandbytes 0.50.2, each on purpose: activations are quantized in their own dtype (it
casts them to float16; weights are still cast to float16 before quantization, as it does,
so checkpoints match); a layer's bias is cast per call, never rewritten; in the backward,
outlier columns are carried wholly by the 16-bit part (it counts their inlier values
twice); ``load_state_dict`` works on a freshly built layer.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .. import int8 as _i8
from ._interop import float_format, format_of_dtype, kernel_context, storage, to_tensor
from .parameters import QuantizingMoves

__all__ = [
    "Int8Params",
    "Linear8bitLt",
    "MatMul8bitLt",
    "MatmulLtState",
    "OutlierAwareLinear",
    "OutlierTracer",
    "OutlierTracerNotInitializedError",
    "SwitchBackBnb",
    "SwitchBackLinearBnb",
    "find_outlier_dims",
    "int8_double_quant",
    "int8_linear",
    "int8_linear_matmul",
    "int8_mm_dequant",
    "int8_vectorwise_dequant",
    "int8_vectorwise_quant",
    "matmul",
    "matmul_mixed",
]

# bitsandbytes' weight_format codes; only row-major int8 weights exist any more.
WEIGHT_FORMATS = {"row": 0, "col32": 1, "col_turing": 2, "col_ampere": 3}
_ROW_FORMAT = WEIGHT_FORMATS["row"]
_INV_127 = 1.0 / 127.0


# ---------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------
def _check_tensor(t: Any, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_dtype(t: Tensor, name: str, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {t.dtype}")


def _check_same_device(a: Tensor, b: Tensor, what_a: str, what_b: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{what_a} is on {a.device} but {what_b} is on {b.device}")


def _rows_k(t: Tensor, name: str) -> tuple[int, int]:
    if t.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (..., K), got a 0-d tensor")
    return math.prod(t.shape[:-1]), int(t.shape[-1])


def _flat(t: Tensor) -> Any:
    """The flat zero-copy array view of a tensor (call inside ``kernel_context``)."""
    return storage(t).reshape(-1)


def _check_threshold(threshold: Any) -> float:
    return _i8._check_threshold(threshold)


# ---------------------------------------------------------------------------------------
# tensor versions of the int8 ops
#
# Each op is a ``torch.library`` custom op (namespace ``cupyquant``) with a fake
# implementation, so torch.compile(fullgraph=True) traces through it. The public
# functions validate, then launch the kernels directly in eager mode and call the op
# only while compiling (``torch.compiler.is_compiling()``, as the 4-bit ops do): a
# custom op adds about 20 us of Python dispatch per call, the check about 50 ns, and
# the kernels run are the same either way.
#
# Op results have shapes known before the kernels run: the outlier columns leave the
# ops as a uint8[K] mask, turned into indices (a data-dependent size) by the callers.
# The kernel helpers take the sizes and formats the public functions have worked out
# while validating: recomputing them would cost about a microsecond per eager call.
# ---------------------------------------------------------------------------------------
def _row_quant(A: Tensor, bits: Any, fmt: str, rows: int, K: int, threshold: float) -> tuple[Tensor, Tensor, Any]:
    """``(CA, SCA, flags)`` of A's flat storage ``bits``; flags is the core's uint8[K]
    array, None when ``threshold == 0``. Unchecked; call inside ``kernel_context(A)``."""
    ca = torch.empty(A.shape, dtype=torch.int8, device=A.device)
    sca = torch.empty(rows, dtype=torch.float32, device=A.device)
    _, _, flags = _i8.int8_vectorwise_quant_bits(bits, fmt, rows, K, threshold, _flat(ca), storage(sca))
    return ca, sca, flags


def _flag_mask(flags: Any, A: Tensor) -> Tensor:
    """The core's outlier flags as a uint8[K] tensor, all zero when there are none (inside ``kernel_context(A)``)."""
    if flags is None:
        return torch.zeros(A.shape[-1], dtype=torch.uint8, device=A.device)
    return to_tensor(flags, A.device)


def _outlier_columns(flags: Any, device: torch.device) -> Tensor | None:
    """int64 indices of the flagged columns (uint8[K] array from the core), or None."""
    if flags is None:
        return None
    return torch.nonzero(to_tensor(flags, device)).reshape(-1)


def _row_quant_fake(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    rows = math.prod(A.shape[:-1])
    return (
        A.new_empty(A.shape, dtype=torch.int8),
        A.new_empty(rows, dtype=torch.float32),
        A.new_empty(A.shape[-1], dtype=torch.uint8),
    )


@torch.library.custom_op("cupyquant::int8_vectorwise_quant", mutates_args=())
def _int8_vectorwise_quant_op(A: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(CA int8 A.shape, SCA float32[rows], outlier mask uint8[K])``."""
    rows, K = _rows_k(A, "A")
    with kernel_context(A):
        ca, sca, flags = _row_quant(A, _flat(A), float_format(A), rows, K, threshold)
        return ca, sca, _flag_mask(flags, A)


@_int8_vectorwise_quant_op.register_fake
def _(A, threshold):
    return _row_quant_fake(A)


def int8_vectorwise_quant(A: Tensor, threshold: float = 0.0) -> tuple[Tensor, Tensor, Tensor | None]:
    """Row-wise int8 quantization (see ``cupyquant.int8.int8_vectorwise_quant``).

    Args:
        A: float32 / float16 / bfloat16 tensor (..., K); rows = prod(A.shape[:-1]).
        threshold: >= 0; when > 0, values with ``|a| >= threshold`` stay out of the row
            absmax and their columns are zero in the codes.

    Returns:
        ``(CA int8 of A's shape, SCA float32 (rows,), outlier_cols int64 (n,) or None)``;
        ``outlier_cols`` is None when ``threshold == 0`` (finding them waits for the GPU;
        under torch.compile their count is a data-dependent size, which some torch
        releases keep in the graph only with
        ``torch._dynamo.config.capture_dynamic_output_shape_ops = True``).
    """
    _check_tensor(A, "A")
    fmt = float_format(A)
    threshold = _check_threshold(threshold)
    rows, K = _rows_k(A, "A")
    if torch.compiler.is_compiling():
        ca, sca, mask = torch.ops.cupyquant.int8_vectorwise_quant(A, threshold)
        return ca, sca, None if threshold == 0.0 else torch.nonzero(mask).reshape(-1)
    with kernel_context(A):
        ca, sca, flags = _row_quant(A, _flat(A), fmt, rows, K, threshold)
        return ca, sca, _outlier_columns(flags, A.device)


def _vectorwise_dequant(A: Tensor, stats: Tensor, rows: int, K: int) -> Tensor:
    out = torch.empty(A.shape, dtype=torch.float32, device=A.device)
    with kernel_context(A):
        _i8.int8_vectorwise_dequant_bits(_flat(A), _flat(stats), rows, K, _flat(out))
    return out


@torch.library.custom_op("cupyquant::int8_vectorwise_dequant", mutates_args=())
def _int8_vectorwise_dequant_op(A: Tensor, stats: Tensor) -> Tensor:
    """float32 of A's shape."""
    return _vectorwise_dequant(A, stats, *_rows_k(A, "A"))


@_int8_vectorwise_dequant_op.register_fake
def _(A, stats):
    return A.new_empty(A.shape, dtype=torch.float32)


def int8_vectorwise_dequant(A: Tensor, stats: Tensor) -> Tensor:
    """``(A * stats[row]) * (1/127)`` in float32. A: int8 (..., K); stats: float32 (rows,)."""
    _check_tensor(A, "A")
    _check_tensor(stats, "stats")
    _check_dtype(A, "A", torch.int8)
    _check_dtype(stats, "stats", torch.float32)
    _check_same_device(A, stats, "A", "stats")
    rows, K = _rows_k(A, "A")
    if stats.numel() != rows:
        raise ValueError(f"stats must have {rows} elements (one per row of A), got {stats.numel()}")
    if torch.compiler.is_compiling():
        return torch.ops.cupyquant.int8_vectorwise_dequant(A, stats)
    return _vectorwise_dequant(A, stats, rows, K)


def _double_quant(
    A: Tensor, fmt: str, rows: int, K: int, threshold: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Any]:
    """``(CA, CAt, SCA, SCAt, flags)`` as :func:`_row_quant`. Call inside ``kernel_context(A)``."""
    bits = _flat(A)
    ca, sca, flags = _row_quant(A, bits, fmt, rows, K, threshold)
    cat = torch.empty(A.shape, dtype=torch.int8, device=A.device)
    scat = torch.empty(K, dtype=torch.float32, device=A.device)
    _i8.int8_col_quant_bits(bits, fmt, rows, K, threshold, flags, _flat(cat), storage(scat))
    return ca, cat, sca, scat, flags


@torch.library.custom_op("cupyquant::int8_double_quant", mutates_args=())
def _int8_double_quant_op(A: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(CA, CAt int8 A.shape, SCA float32[rows], SCAt float32[K], outlier mask uint8[K])``."""
    rows, K = _rows_k(A, "A")
    with kernel_context(A):
        ca, cat, sca, scat, flags = _double_quant(A, float_format(A), rows, K, threshold)
        return ca, cat, sca, scat, _flag_mask(flags, A)


@_int8_double_quant_op.register_fake
def _(A, threshold):
    ca, sca, mask = _row_quant_fake(A)
    return ca, torch.empty_like(ca), sca, A.new_empty(A.shape[-1], dtype=torch.float32), mask


def int8_double_quant(
    A: Tensor,
    col_stats: Tensor | None = None,
    row_stats: Tensor | None = None,
    out_col: Tensor | None = None,
    out_row: Tensor | None = None,
    threshold: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Row-wise and column-wise int8 quantization (see ``cupyquant.int8.int8_double_quant``).

    Returns ``(CA, CAt, SCA, SCAt, outlier_cols)``: CA and CAt int8 of A's shape (CAt is
    scaled per column, not transposed), SCA float32 (rows,), SCAt float32 (K,).
    ``col_stats``, ``row_stats``, ``out_col``, ``out_row`` must be None. Under
    torch.compile the outlier columns are a data-dependent size, as in
    :func:`int8_vectorwise_quant`.
    """
    for name, value in (("col_stats", col_stats), ("row_stats", row_stats), ("out_col", out_col),
                        ("out_row", out_row)):  # fmt: skip
        if value is not None:
            raise ValueError(
                f"{name} must be None: int8_double_quant allocates its outputs, got {type(value).__name__}"
            )
    _check_tensor(A, "A")
    fmt = float_format(A)
    threshold = _check_threshold(threshold)
    rows, K = _rows_k(A, "A")
    if torch.compiler.is_compiling():
        ca, cat, sca, scat, mask = torch.ops.cupyquant.int8_double_quant(A, threshold)
        return ca, cat, sca, scat, None if threshold == 0.0 else torch.nonzero(mask).reshape(-1)
    with kernel_context(A):
        ca, cat, sca, scat, flags = _double_quant(A, fmt, rows, K, threshold)
        return ca, cat, sca, scat, _outlier_columns(flags, A.device)


def _linear_matmul_into(A: Tensor, B: Tensor, M: int, N: int, K: int, result: Tensor) -> Tensor:
    with kernel_context(A):
        _i8.int8_linear_matmul_bits(_flat(A), _flat(B), M, N, K, _flat(result))
    return result


@torch.library.custom_op("cupyquant::int8_linear_matmul", mutates_args=())
def _int8_linear_matmul_op(A: Tensor, B: Tensor) -> Tensor:
    """int32 ``A (..., K) @ B (N, K)^T``: (..., N)."""
    M, K = _rows_k(A, "A")
    N = int(B.shape[0])
    return _linear_matmul_into(A, B, M, N, K, torch.empty((*A.shape[:-1], N), dtype=torch.int32, device=A.device))


@_int8_linear_matmul_op.register_fake
def _(A, B):
    return A.new_empty((*A.shape[:-1], B.shape[0]), dtype=torch.int32)


def int8_linear_matmul(A: Tensor, B: Tensor, out: Tensor | None = None, dtype: torch.dtype = torch.int32) -> Tensor:
    """Exact ``A @ B^T`` of int8 tensors in int32. A: (..., K); B: (N, K); returns (..., N)."""
    _check_tensor(A, "A")
    _check_tensor(B, "B")
    if dtype != torch.int32:
        raise ValueError(f"dtype must be torch.int32 (the only accumulator), got {dtype}")
    _check_dtype(A, "A", torch.int8)
    _check_dtype(B, "B", torch.int8)
    _check_same_device(A, B, "A", "B")
    M, K = _rows_k(A, "A")
    if B.dim() != 2 or B.shape[1] != K:
        raise ValueError(f"B must be 2-D (N, K) with K = A.shape[-1] = {K}, got shape {tuple(B.shape)}")
    N = int(B.shape[0])
    shape = (*A.shape[:-1], N)
    if out is not None:
        _check_tensor(out, "out")
        if tuple(out.shape) != shape or out.dtype != torch.int32 or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {shape} int32 tensor, got {tuple(out.shape)} of {out.dtype}")
        _check_same_device(A, out, "A", "out")
    if torch.compiler.is_compiling():
        result = torch.ops.cupyquant.int8_linear_matmul(A, B)
        return result if out is None else out.copy_(result)
    result = out if out is not None else torch.empty(shape, dtype=torch.int32, device=A.device)
    return _linear_matmul_into(A, B, M, N, K, result)


def _bias_format(bias: Tensor | None) -> str | None:
    return None if bias is None else float_format(bias, "bias")


def _mm_dequant_into(
    A: Tensor, row_stats: Tensor, col_stats: Tensor, M: int, N: int, fmt: str, bias: Tensor | None,
    bias_fmt: str | None, result: Tensor,
) -> Tensor:  # fmt: skip
    with kernel_context(A):
        _i8.int8_mm_dequant_bits(
            _flat(A), _flat(row_stats), _flat(col_stats), M, N, fmt,
            None if bias is None else _flat(bias), bias_fmt, _flat(result),
        )  # fmt: skip
    return result


@torch.library.custom_op("cupyquant::int8_mm_dequant", mutates_args=())
def _int8_mm_dequant_op(
    A: Tensor, row_stats: Tensor, col_stats: Tensor, bias: Tensor | None, dtype: torch.dtype
) -> Tensor:
    """The int32 product A dequantized to ``dtype``, A's shape."""
    M, N = _rows_k(A, "A")
    result = torch.empty(A.shape, dtype=dtype, device=A.device)
    return _mm_dequant_into(A, row_stats, col_stats, M, N, format_of_dtype(dtype), bias, _bias_format(bias), result)


@_int8_mm_dequant_op.register_fake
def _(A, row_stats, col_stats, bias, dtype):
    return A.new_empty(A.shape, dtype=dtype)


def int8_mm_dequant(
    A: Tensor,
    row_stats: Tensor,
    col_stats: Tensor,
    out: Tensor | None = None,
    bias: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``fmaf((A * row) * col, 1/127^2, bias)`` rounded once; float16 unless ``dtype`` / ``out`` say otherwise.

    Args:
        A: int32 (..., N); row_stats: float32 (M,), M = prod(A.shape[:-1]); col_stats:
            float32 (N,); bias: optional (N,) float tensor (any of the three dtypes).
        out: optional contiguous tensor of A's shape (float16, bfloat16 or float32).
        dtype: output dtype (default float16, as bitsandbytes; or out's dtype).
    """
    for t, name in ((A, "A"), (row_stats, "row_stats"), (col_stats, "col_stats")):
        _check_tensor(t, name)
    _check_dtype(A, "A", torch.int32)
    _check_dtype(row_stats, "row_stats", torch.float32)
    _check_dtype(col_stats, "col_stats", torch.float32)
    _check_same_device(A, row_stats, "A", "row_stats")
    _check_same_device(A, col_stats, "A", "col_stats")
    M, N = _rows_k(A, "A")
    if row_stats.numel() != M:
        raise ValueError(f"row_stats must have {M} elements (one per row of A), got {row_stats.numel()}")
    if col_stats.numel() != N:
        raise ValueError(f"col_stats must have {N} elements (one per column of A), got {col_stats.numel()}")
    if dtype is None:
        dtype = out.dtype if out is not None else torch.float16
    fmt = format_of_dtype(dtype, "dtype")
    if out is not None:
        _check_tensor(out, "out")
        if tuple(out.shape) != tuple(A.shape) or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {tuple(A.shape)} tensor of {dtype}, got "
                             f"{tuple(out.shape)} of {out.dtype}")  # fmt: skip
        _check_same_device(A, out, "A", "out")
    bias_fmt = None
    if bias is not None:
        _check_tensor(bias, "bias")
        bias_fmt = float_format(bias, "bias")
        if bias.numel() != N:
            raise ValueError(f"bias must have {N} elements (one per column of A), got {bias.numel()}")
        _check_same_device(A, bias, "A", "bias")
    if torch.compiler.is_compiling():
        result = torch.ops.cupyquant.int8_mm_dequant(A, row_stats, col_stats, bias, dtype)
        return result if out is None else out.copy_(result)
    result = out if out is not None else torch.empty(A.shape, dtype=dtype, device=A.device)
    return _mm_dequant_into(A, row_stats, col_stats, M, N, fmt, bias, bias_fmt, result)


def _linear_into(
    A: Tensor, fmt: str, M: int, K: int, CB: Tensor, SCB: Tensor, N: int, bias: Tensor | None,
    bias_fmt: str | None, threshold: float, result: Tensor,
) -> Tensor:  # fmt: skip
    with kernel_context(A):
        _i8.int8_linear_bits(
            _flat(A), fmt, M, K, _flat(CB), _flat(SCB), N,
            None if bias is None else _flat(bias), bias_fmt, threshold, _flat(result),
        )  # fmt: skip
    return result


# The whole LLM.int8 forward is one op: its outlier decomposition then never leaves the
# kernels, so the traced graph holds no data-dependent shape.
@torch.library.custom_op("cupyquant::int8_linear", mutates_args=())
def _int8_linear_op(A: Tensor, CB: Tensor, SCB: Tensor, bias: Tensor | None, threshold: float) -> Tensor:
    """``A (..., K) @ W^T (+ bias)`` in A's dtype, W the (N, K) int8 rows CB with absmax SCB."""
    M, K = _rows_k(A, "A")
    N = int(CB.shape[0])
    result = torch.empty((*A.shape[:-1], N), dtype=A.dtype, device=A.device)
    return _linear_into(A, float_format(A), M, K, CB, SCB, N, bias, _bias_format(bias), threshold, result)


@_int8_linear_op.register_fake
def _(A, CB, SCB, bias, threshold):
    return A.new_empty((*A.shape[:-1], CB.shape[0]))


def int8_linear(
    A: Tensor, CB: Tensor, SCB: Tensor, bias: Tensor | None = None, threshold: float = 0.0, out: Tensor | None = None
) -> Tensor:
    """LLM.int8 forward ``A @ W^T (+ bias)`` with W given as int8 rows CB (N, K) and their
    absmax SCB (N,), outlier decomposition when ``threshold > 0`` (see
    ``cupyquant.int8.int8_linear``). Returns (..., N) of A's dtype; never waits for the GPU.
    """
    _check_tensor(A, "A")
    _check_tensor(CB, "CB")
    _check_tensor(SCB, "SCB")
    fmt = float_format(A)
    threshold = _check_threshold(threshold)
    M, K = _rows_k(A, "A")
    _check_dtype(CB, "CB", torch.int8)
    _check_dtype(SCB, "SCB", torch.float32)
    if CB.dim() != 2 or CB.shape[1] != K:
        raise ValueError(f"CB must be 2-D (N, K) with K = A.shape[-1] = {K}, got shape {tuple(CB.shape)}")
    N = int(CB.shape[0])
    if SCB.numel() != N:
        raise ValueError(f"SCB must have {N} elements (one per row of CB), got {SCB.numel()}")
    _check_same_device(A, CB, "A", "CB")
    _check_same_device(A, SCB, "A", "SCB")
    bias_fmt = None
    if bias is not None:
        _check_tensor(bias, "bias")
        bias_fmt = float_format(bias, "bias")
        if bias.numel() != N:
            raise ValueError(f"bias must have {N} elements (one per output feature), got {bias.numel()}")
        _check_same_device(A, bias, "A", "bias")
    shape = (*A.shape[:-1], N)
    if out is not None:
        _check_tensor(out, "out")
        if tuple(out.shape) != shape or out.dtype != A.dtype or not out.is_contiguous():
            raise ValueError(
                f"out must be a contiguous {shape} tensor of {A.dtype}, got {tuple(out.shape)} of {out.dtype}"
            )
        _check_same_device(A, out, "A", "out")
    if torch.compiler.is_compiling():
        result = torch.ops.cupyquant.int8_linear(A, CB, SCB, bias, threshold)
        return result if out is None else out.copy_(result)
    result = out if out is not None else torch.empty(shape, dtype=A.dtype, device=A.device)
    return _linear_into(A, fmt, M, K, CB, SCB, N, bias, bias_fmt, threshold, result)


def _col_quant(A2: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Column-wise codes (A2's layout) and column absmax of a 2-D float tensor."""
    rows, K = A2.shape
    cat = torch.empty((rows, K), dtype=torch.int8, device=A2.device)
    scat = torch.empty(K, dtype=torch.float32, device=A2.device)
    with kernel_context(A2):
        _i8.int8_col_quant_bits(_flat(A2), float_format(A2), rows, K, threshold, None, _flat(cat), storage(scat))
    return cat, scat


def _int8_weight_grad_kernels(G: Tensor, A2: Tensor, threshold: float, dtype: torch.dtype) -> Tensor:
    """int8 weight gradient ``G^T @ A`` (N, K) of G (M, N) and A2 (M, K): both quantized
    per column (over tokens), exact int32 product, dequantized to ``dtype``; A's outlier
    columns added in 16-bit."""
    cgt, scgt = _col_quant(G, 0.0)
    cat, scat = _col_quant(A2, threshold)
    acc = int8_linear_matmul(cgt.t().contiguous(), cat.t().contiguous())
    grad_B = int8_mm_dequant(acc, scgt, scat, dtype=dtype)
    if threshold > 0:
        _, _, cols = int8_vectorwise_quant(A2, threshold)
        if cols.numel():
            grad_B[:, cols] += (G.t() @ A2[:, cols].to(G.dtype)).to(grad_B.dtype)
    return grad_B


# One op for the whole weight gradient, as for the forward: the outlier columns are
# gathered by index inside it, so the traced backward keeps fixed shapes and computes
# exactly what eager mode does.
@torch.library.custom_op("cupyquant::int8_weight_grad", mutates_args=())
def _int8_weight_grad_op(G: Tensor, A: Tensor, threshold: float, dtype: torch.dtype) -> Tensor:
    """``G (M, N)^T @ A (M, K)`` through int8: (N, K) of ``dtype``."""
    return _int8_weight_grad_kernels(G, A, threshold, dtype)


@_int8_weight_grad_op.register_fake
def _(G, A, threshold, dtype):
    return G.new_empty((G.shape[1], A.shape[1]), dtype=dtype)


# ---------------------------------------------------------------------------------------
# Int8Params
# ---------------------------------------------------------------------------------------
def _quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(CB int8 (N, K), SCB float32 (N,)) of a float weight, rounded to float16 first as
    bitsandbytes does, so its checkpoints and ours hold the same bytes."""
    ca, sca, _ = int8_vectorwise_quant(weight.detach().contiguous().to(torch.float16))
    return ca, sca


class Int8Params(QuantizingMoves, torch.nn.Parameter):
    """An int8 weight with per-row scales (bitsandbytes' ``Int8Params``).

    While ``has_fp16_weights`` is False, the first move to a cpu/cuda device
    (``.to(device)``, ``.cuda()``, ``.cpu()``, or the layer's) quantizes the float data
    row-wise: ``data`` becomes the int8 codes (``CB`` is ``data`` itself, one copy) and
    ``SCB`` the float32 row absmax. Later moves carry both; dtype conversions leave the
    codes alone. With ``has_fp16_weights`` True it stays a trainable float weight.

    Args:
        data: float weight (N, K), or int8 codes when ``CB``/``SCB`` describe a quantized one.
        requires_grad: must be False for int8 codes.
        has_fp16_weights: keep float weights (training) instead of quantizing.
        CB: int8 codes (N, K); becomes ``data``.
        SCB: float32 (N,) row absmax of ``CB``.
    """

    def __new__(
        cls,
        data: Tensor | None = None,
        requires_grad: bool = True,
        has_fp16_weights: bool = False,
        CB: Tensor | None = None,
        SCB: Tensor | None = None,
    ) -> Int8Params:
        if CB is not None:
            _check_tensor(CB, "CB")
            data = CB
        if data is None:
            data = torch.empty(0)
        _check_tensor(data, "data")
        if requires_grad and not data.is_floating_point():
            raise ValueError(f"requires_grad must be False for {data.dtype} data (int8 codes get no gradient)")
        if SCB is not None:
            _check_tensor(SCB, "SCB")
            if data.dtype != torch.int8:
                raise ValueError(f"SCB describes int8 codes, but data is {data.dtype}")
            if data.dim() != 2 or SCB.numel() != data.shape[0]:
                raise ValueError(f"SCB must have one float32 per row of the (N, K) codes, got {SCB.numel()} for "
                                 f"shape {tuple(data.shape)}")  # fmt: skip
        self = torch.Tensor._make_subclass(cls, data.detach(), requires_grad)
        self.has_fp16_weights = has_fp16_weights
        if SCB is not None and (SCB.dtype != torch.float32 or SCB.requires_grad):
            SCB = SCB.detach().to(torch.float32)
        self.SCB = SCB  # shared, not copied: parameters made by moves keep the same scales
        return self

    @property
    def CB(self) -> Tensor | None:
        """The int8 codes: ``data`` itself once quantized, else None."""
        return self.data if self.data.dtype == torch.int8 else None

    @CB.setter
    def CB(self, value: Tensor | None) -> None:
        # The codes live in ``data`` only. bitsandbytes' layers set CB = None when they
        # hand the codes to their MatmulLtState; here nothing moves, so None changes nothing.
        if value is None:
            return
        _check_tensor(value, "CB")
        _check_dtype(value, "CB", torch.int8)
        self.requires_grad_(False)
        self.data = value

    @property
    def bnb_quantized(self) -> bool:
        """True when ``data`` holds int8 codes and ``SCB`` their scales."""
        return self.data.dtype == torch.int8 and self.SCB is not None

    def _quantize(self, device: torch.device) -> Int8Params:
        """Quantize the float data row-wise on ``device``, in place; returns self."""
        if not self.data.is_floating_point() or self.data.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"Int8Params can quantize float32, float16 or bfloat16 data, got {self.data.dtype}")
        if self.data.dim() != 2:
            raise ValueError(f"Int8Params quantizes 2-D (N, K) weights, got shape {tuple(self.data.shape)}")
        CB, SCB = _quantize_weight(self.data.to(device))
        self.requires_grad_(False)
        self.data = CB
        self.SCB = SCB
        return self

    def _copy_with(self, data: Tensor) -> Int8Params:
        quantized = data.dtype == torch.int8
        return type(self)(
            data,
            requires_grad=self.requires_grad and not quantized,
            has_fp16_weights=self.has_fp16_weights,
            SCB=self.SCB if quantized else None,
        )

    def to(self, *args: Any, **kwargs: Any) -> Int8Params:
        """Like ``Tensor.to``; the first move of float data to a cpu/cuda device quantizes
        it (unless ``has_fp16_weights``). Quantized codes move with their SCB and keep int8."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if self.data.dtype == torch.int8:
            if device is not None and self.SCB is not None:
                # Moved in place too: nn.Module.to keeps this object and only swaps its data.
                self.SCB = self.SCB.to(device, non_blocking=non_blocking)
            return self._copy_with(super().to(device=device, non_blocking=non_blocking))
        if not self.has_fp16_weights and device is not None and device.type in ("cpu", "cuda"):
            if dtype is not None and dtype.is_floating_point:
                self.data = self.data.to(dtype=dtype)
            return self._quantize(device)
        return self._copy_with(super().to(device=device, dtype=dtype, non_blocking=non_blocking))

    def _holds_codes(self) -> bool:
        return self.data.dtype == torch.int8

    # -- copies and pickling --------------------------------------------------------------
    def __deepcopy__(self, memo: dict[int, Any]) -> Int8Params:
        if id(self) in memo:
            return memo[id(self)]
        new = type(self)(
            self.data.clone(memory_format=torch.preserve_format),
            requires_grad=self.requires_grad,
            has_fp16_weights=self.has_fp16_weights,
            SCB=copy.deepcopy(self.SCB, memo),
        )
        memo[id(self)] = new
        return new

    def __copy__(self) -> Int8Params:
        return self._copy_with(self.data)

    def __reduce_ex__(self, protocol: int) -> tuple:
        # nn.Parameter pickles as a plain Parameter; rebuild this class with its fields.
        return (_rebuild_int8params, (self.data, self.requires_grad, self.has_fp16_weights, self.SCB))


def _rebuild_int8params(data: Tensor, requires_grad: bool, has_fp16_weights: bool, SCB: Tensor | None) -> Int8Params:
    return Int8Params(data, requires_grad=requires_grad, has_fp16_weights=has_fp16_weights, SCB=SCB)


# ---------------------------------------------------------------------------------------
# MatmulLtState and the autograd functions
# ---------------------------------------------------------------------------------------
class MatmulLtState:
    """Settings and int8 weight of an LLM.int8 product (bitsandbytes' ``MatmulLtState``).

    ``threshold`` (outlier threshold, 0 = none), ``has_fp16_weights`` (the weight is a
    float tensor, quantized per forward), ``is_training``. ``CB``/``SCB``: the int8 weight
    codes and scales. A state bound to an :class:`Int8Params` (as a layer's is) reads and
    writes them on that parameter, so they exist in one place; an unbound state holds the
    codes of the last float weight it quantized. The remaining attributes exist for
    bitsandbytes compatibility and are unused.
    """

    def __init__(
        self,
        CB: Tensor | None = None,
        SCB: Tensor | None = None,
        threshold: float = 0.0,
        has_fp16_weights: bool = True,
        is_training: bool = True,
    ) -> None:
        self._weight: Int8Params | None = None
        self._CB = CB
        self._SCB = SCB
        self.threshold = threshold
        self.has_fp16_weights = has_fp16_weights
        self.is_training = is_training
        self.idx: Tensor | None = None
        self.force_no_igemmlt = False
        self.CxB = self.SB = self.CxBt = self.SBt = self.CBt = self.subB = None
        self.outlier_pool = None
        self.has_accumulated_gradients = False
        self.use_pool = False
        self.memory_efficient_backward = False
        self.formatB = "row"

    def bind(self, weight: Tensor | None) -> None:
        """Read CB/SCB from ``weight`` (an :class:`Int8Params`) while it holds int8 codes."""
        self._weight = weight if isinstance(weight, Int8Params) else None

    def _owner(self) -> Int8Params | None:
        w = self._weight
        return w if w is not None and w.data.dtype == torch.int8 else None

    @property
    def CB(self) -> Tensor | None:
        w = self._owner()
        return w.CB if w is not None else self._CB

    @CB.setter
    def CB(self, value: Tensor | None) -> None:
        w = self._owner()
        if w is not None:
            w.CB = value
        else:
            self._CB = value

    @property
    def SCB(self) -> Tensor | None:
        w = self._owner()
        return w.SCB if w is not None else self._SCB

    @SCB.setter
    def SCB(self, value: Tensor | None) -> None:
        w = self._owner()
        if w is not None:
            if value is not None:
                w.SCB = value
        else:
            self._SCB = value

    def reset_grads(self) -> None:
        """Forget the cached codes of a float weight (a bound parameter keeps its own)."""
        self._CB = self._SCB = None
        self.CxB = self.SB = self.CxBt = self.SBt = self.CBt = None

    @property
    def tile_indices(self) -> None:
        raise ValueError("tile_indices is no longer supported: int8 weights are stored row-major")

    def __repr__(self) -> str:
        return (f"MatmulLtState(threshold={self.threshold}, has_fp16_weights={self.has_fp16_weights}, "
                f"is_training={self.is_training}, quantized={self.CB is not None})")  # fmt: skip


def _weight_codes(B: Tensor, state: MatmulLtState) -> tuple[Tensor, Tensor]:
    """The int8 codes and scales of the weight ``B`` for this product."""
    if isinstance(B, Int8Params) and B.bnb_quantized:
        return B.data, B.SCB
    if B.dtype == torch.int8:
        scb = B.SCB if isinstance(B, Int8Params) and B.SCB is not None else state.SCB
        if scb is None:
            raise ValueError("B holds int8 codes but neither B.SCB nor state.SCB gives their scales")
        return B, scb
    if state.has_fp16_weights or state.CB is None or state.SCB is None:
        # A float weight: quantized now (it may have changed since the last call).
        state.CB, state.SCB = _quantize_weight(B)
    return state.CB, state.SCB


def _check_operands(A: Tensor, B: Tensor, bias: Tensor | None) -> None:
    _check_tensor(A, "A")
    _check_tensor(B, "B")
    float_format(A)
    if B.dim() != 2:
        raise ValueError(f"B must be a 2-D (N, K) weight, got shape {tuple(B.shape)}")
    if A.dim() < 1 or A.shape[-1] != B.shape[1]:
        raise ValueError(f"A's last dimension must equal B's K = {B.shape[1]}, got A of shape {tuple(A.shape)}")
    _check_same_device(A, B, "A", "B")
    if bias is not None:
        _check_tensor(bias, "bias")
        if bias.numel() != B.shape[0]:
            raise ValueError(f"bias must have {B.shape[0]} elements (one per output feature), got {bias.numel()}")


def _dequantized_weight(CB: Tensor, SCB: Tensor, dtype: torch.dtype) -> Tensor:
    """``CB * SCB / 127`` in ``dtype``: the weight the input gradient flows through."""
    return (CB.to(torch.float32) * (SCB.to(torch.float32) * _INV_127).unsqueeze(1)).to(dtype)


def _forward(ctx: Any, A: Tensor, B: Tensor, bias: Tensor | None, state: MatmulLtState) -> Tensor:
    threshold = _check_threshold(state.threshold)
    CB, SCB = _weight_codes(B, state)
    out = int8_linear(A, CB, SCB, bias, threshold)
    need_A, need_B = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    ctx.A_shape, ctx.A_dtype, ctx.B_dtype = A.shape, A.dtype, B.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.threshold = threshold
    saved = [CB, SCB] if need_A else [None, None]
    saved.append(A if need_B else None)
    ctx.save_for_backward(*saved)
    return out


def _backward(
    ctx: Any, grad_output: Tensor, weight_grad: Callable[[Any, Tensor, Tensor], Tensor]
) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
    need_A, need_B, need_bias, _ = ctx.needs_input_grad
    CB, SCB, A = ctx.saved_tensors
    G = grad_output.reshape(-1, grad_output.shape[-1])
    grad_A = grad_B = grad_bias = None
    if need_bias:
        grad_bias = G.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    if need_A:
        weight = _dequantized_weight(CB, SCB, ctx.A_dtype)
        grad_A = torch.matmul(G.to(ctx.A_dtype), weight).reshape(ctx.A_shape)
    if need_B:
        grad_B = weight_grad(ctx, G.contiguous(), A.reshape(-1, A.shape[-1]).contiguous())
    return grad_A, grad_B, grad_bias, None


def _int8_weight_grad(ctx: Any, G: Tensor, A2: Tensor) -> Tensor:
    """int8 weight gradient ``G^T @ A`` (N, K) in the weight's float dtype (A's for int8 codes)."""
    dtype = ctx.B_dtype if ctx.B_dtype in (torch.float32, torch.float16, torch.bfloat16) else A2.dtype
    if torch.compiler.is_compiling():
        return torch.ops.cupyquant.int8_weight_grad(G, A2, ctx.threshold, dtype)
    return _int8_weight_grad_kernels(G, A2, ctx.threshold, dtype)


def _float_weight_grad(ctx: Any, G: Tensor, A2: Tensor) -> Tensor:
    """16-bit weight gradient ``G^T @ A`` in A's dtype (SwitchBack)."""
    return torch.matmul(G.t().to(A2.dtype), A2).to(ctx.B_dtype)


class MatMul8bitLt(torch.autograd.Function):
    """``A @ W^T + bias`` through LLM.int8, W an int8 weight (or a float one quantized per call).

    Backward: the input gradient flows through the dequantized int8 weight; a float
    weight's gradient is the int8 product of the column-quantized gradient and
    activations, A's outlier columns in 16-bit; the bias gradient is a plain sum.
    """

    @staticmethod
    def forward(ctx: Any, A: Tensor, B: Tensor, bias: Tensor | None, state: MatmulLtState) -> Tensor:
        return _forward(ctx, A, B, bias, state)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        return _backward(ctx, grad_output, _int8_weight_grad)


class SwitchBackBnb(torch.autograd.Function):
    """:class:`MatMul8bitLt` with the weight gradient in 16-bit: ``G^T @ A`` in A's dtype."""

    @staticmethod
    def forward(ctx: Any, A: Tensor, B: Tensor, bias: Tensor | None, state: MatmulLtState) -> Tensor:
        return _forward(ctx, A, B, bias, state)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        return _backward(ctx, grad_output, _float_weight_grad)


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _matmul(fn: type[torch.autograd.Function], A: Tensor, B: Tensor, out: Tensor | None, state: MatmulLtState | None,
            threshold: float, bias: Tensor | None) -> Tensor:  # fmt: skip
    state = state if state is not None else MatmulLtState()
    threshold = _check_threshold(threshold)
    if threshold > 0.0:
        state.threshold = threshold
    _check_operands(A, B, bias)
    if _needs_grad(A, B, bias):
        if out is not None:
            raise ValueError("out= is not supported when gradients are recorded (A, B or bias requires grad)")
        return fn.apply(A, B, bias, state)
    # Inference: no autograd node, straight to the fused kernel.
    CB, SCB = _weight_codes(B, state)
    return int8_linear(A, CB, SCB, bias, _check_threshold(state.threshold), out=out)


def matmul(
    A: Tensor,
    B: Tensor,
    out: Tensor | None = None,
    state: MatmulLtState | None = None,
    threshold: float = 0.0,
    bias: Tensor | None = None,
) -> Tensor:
    """``A @ B^T (+ bias)`` through LLM.int8 (bitsandbytes' ``bnb.matmul``), differentiable.

    Args:
        A: (..., K) float32 / float16 / bfloat16 activations.
        B: (N, K) weight: an :class:`Int8Params` (quantized or float), an int8 tensor
            (scales from ``state.SCB``), or a float tensor (quantized per call).
        out: optional (..., N) tensor of A's dtype (inference only).
        state: a :class:`MatmulLtState`; a fresh one when None.
        threshold: when > 0, sets ``state.threshold`` (outlier decomposition).
        bias: optional (N,) tensor.

    Returns:
        (..., N) tensor of A's dtype.
    """
    return _matmul(MatMul8bitLt, A, B, out, state, threshold, bias)


def matmul_mixed(
    A: Tensor,
    B: Tensor,
    out: Tensor | None = None,
    state: MatmulLtState | None = None,
    threshold: float = 0.0,
    bias: Tensor | None = None,
) -> Tensor:
    """:func:`matmul` whose weight gradient is computed in 16-bit (SwitchBack): int8
    forward, input gradient through the int8 weight, ``grad_B = G^T @ A`` in A's dtype."""
    return _matmul(SwitchBackBnb, A, B, out, state, threshold, bias)


# ---------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------
def _weight_format_code(value: Any) -> int | str:
    if isinstance(value, Tensor):
        value = value.item()
    if isinstance(value, str):
        return WEIGHT_FORMATS.get(value, value)
    return int(value)


class _Int8LinearBase(nn.Linear):
    """Shared construction, state binding and checkpoint handling of the int8 linear layers."""

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        has_fp16_weights: bool = True,
        memory_efficient_backward: bool = False,
        threshold: float = 0.0,
        index: Any = None,
        device: torch.device | str | None = None,
    ) -> None:
        threshold = _check_threshold(threshold)
        if memory_efficient_backward:
            warnings.warn(
                "memory_efficient_backward is deprecated and has no effect: the backward always keeps only "
                "the int8 weight",
                FutureWarning,
                stacklevel=3,
            )
        super().__init__(input_features, output_features, bias, device)
        self._state = MatmulLtState(threshold=threshold, has_fp16_weights=has_fp16_weights)
        self._state.memory_efficient_backward = memory_efficient_backward
        if threshold > 0.0 and not has_fp16_weights:
            self._state.use_pool = True
        self.index = index
        self.weight = Int8Params(self.weight.data, has_fp16_weights=has_fp16_weights, requires_grad=has_fp16_weights)

    @property
    def state(self) -> MatmulLtState:
        """The layer's :class:`MatmulLtState`, reading CB/SCB from the current weight."""
        st = self.__dict__["_state"]
        st.bind(self._parameters.get("weight"))
        return st

    @state.setter
    def state(self, value: MatmulLtState) -> None:
        if not isinstance(value, MatmulLtState):
            raise TypeError(f"state must be a MatmulLtState, got {type(value).__name__}")
        self.__dict__["_state"] = value

    def _ready_weight(self) -> Int8Params:
        """The weight, quantized in place on its device first if it should be and is not yet."""
        w = self.weight
        if not self.state.has_fp16_weights and isinstance(w, Int8Params) and not w.bnb_quantized:
            w._quantize(w.device)
        return w

    def _bias_for(self, x: Tensor) -> Tensor | None:
        # Cast per call (differentiably); store the bias in the compute dtype to skip it.
        b = self.bias
        return b if b is None or b.dtype == x.dtype else b.to(x.dtype)

    # -- checkpoints ----------------------------------------------------------------------
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        w = self.weight
        if not self.state.has_fp16_weights and isinstance(w, Int8Params) and w.bnb_quantized:
            destination[prefix + "SCB"] = w.SCB if keep_vars else w.SCB.detach()
            destination[prefix + "weight_format"] = torch.tensor(_ROW_FORMAT, dtype=torch.uint8)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        wkey, skey, fkey = prefix + "weight", prefix + "SCB", prefix + "weight_format"
        current = self._parameters["weight"]
        # nn.Module's loader would shape- and dtype-check the weight against the float
        # layout; it is loaded below instead, so the loader sees no weight.
        self._parameters["weight"] = None
        reported = len(unexpected_keys)
        try:
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
        finally:
            self._parameters["weight"] = current
        unexpected_keys[reported:] = [k for k in unexpected_keys[reported:] if k not in (wkey, skey, fkey)]
        if fkey in state_dict and _weight_format_code(state_dict[fkey]) != _ROW_FORMAT:
            error_msgs.append(f"While loading {wkey}: only the row-major int8 weight format (weight_format "
                              f"{_ROW_FORMAT}) is supported, got {state_dict[fkey]!r}")  # fmt: skip
            return
        if wkey not in state_dict:
            if strict:
                missing_keys.append(wkey)
            return
        try:
            self._load_weight(current, state_dict[wkey], state_dict.get(skey), local_metadata, wkey)
        except (ValueError, TypeError) as exc:
            error_msgs.append(f"While loading {wkey}: {exc}")

    def _load_weight(self, current: Int8Params, data: Tensor, scb: Tensor | None, local_metadata: dict[str, Any],
                     key: str) -> None:  # fmt: skip
        shape = (self.out_features, self.in_features)
        if not isinstance(data, Tensor):
            raise TypeError(f"the checkpoint's {key} must be a tensor, got {type(data).__name__}")
        if tuple(data.shape) != shape:
            raise ValueError(
                f"size mismatch: the checkpoint holds a {tuple(data.shape)} weight, the module needs {shape}"
            )
        assign = bool(local_metadata.get("assign_to_params_buffers", False))
        device = data.device if assign or current.device.type == "meta" else current.device
        has_fp16 = self.state.has_fp16_weights
        with torch.no_grad():
            if data.dtype == torch.int8:
                if has_fp16:
                    raise ValueError("the checkpoint holds int8 codes but the layer has has_fp16_weights=True; "
                                     "build it with has_fp16_weights=False to load them")  # fmt: skip
                if scb is None:
                    raise ValueError(
                        "an int8 weight needs its SCB entry (float32 row absmax), none is in the checkpoint"
                    )
                if not isinstance(scb, Tensor) or scb.numel() != shape[0] or not scb.is_floating_point():
                    raise ValueError(f"SCB must be a float tensor of {shape[0]} elements, got {scb!r}")
                current.requires_grad_(False)
                current.data = data.to(device, copy=True)
                current.SCB = scb.to(device=device, dtype=torch.float32, copy=True)
                return
            if data.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise ValueError(f"a float weight must be float32, float16 or bfloat16, got {data.dtype}")
            if has_fp16:
                if current.data.dtype == data.dtype and current.device == device:
                    current.copy_(data)
                else:
                    current.data = data.to(device=device, dtype=current.dtype, copy=True)
            elif current.bnb_quantized:
                # A float checkpoint into a quantized layer: quantize it where the layer is.
                current.data = data.to(device, copy=True)
                current.SCB = None
                current._quantize(device)
            else:
                dtype = current.dtype if current.is_floating_point() else data.dtype
                current.data = data.to(device=device, dtype=dtype, copy=True)


class Linear8bitLt(_Int8LinearBase):
    """``y = x @ W^T + b`` through LLM.int8 (bitsandbytes' ``Linear8bitLt``).

    With ``has_fp16_weights=False`` the weight is an :class:`Int8Params` quantized on
    the layer's first move to a device (or its first forward); ``threshold > 0`` adds the
    outlier decomposition. With ``has_fp16_weights=True`` (default) the weight stays a
    trainable float tensor, quantized per forward, with gradients for weight and input.

    ``state_dict`` of a quantized layer: ``weight`` (int8), ``SCB`` (float32),
    ``weight_format`` (uint8 0 = row major), and ``bias``; ``load_state_dict`` takes them
    into any layer built with ``has_fp16_weights=False``, quantized yet or not.

    Args:
        input_features: K.
        output_features: N.
        bias: whether there is a bias (cast to the input's dtype per call).
        has_fp16_weights: keep a float, trainable weight.
        memory_efficient_backward: deprecated, accepted with a FutureWarning, no effect.
        threshold: outlier threshold (>= 0; 6.0 is LLM.int8's choice).
        index: kept for bitsandbytes compatibility.
        device: where the float weight is created.
    """

    def forward(self, x: Tensor) -> Tensor:
        state = self.state
        state.is_training = self.training
        return matmul(x, self._ready_weight(), bias=self._bias_for(x), state=state)


class SwitchBackLinearBnb(_Int8LinearBase):
    """SwitchBack linear: int8 forward and input gradient, 16-bit weight gradient.

    Same constructor and checkpoint layout as :class:`Linear8bitLt`; ``forward`` runs
    :func:`matmul_mixed` and adds the bias afterwards, as bitsandbytes' layer means to.
    """

    def forward(self, x: Tensor) -> Tensor:
        state = self.state
        state.is_training = self.training
        out = matmul_mixed(x, self._ready_weight(), state=state)
        bias = self._bias_for(x)
        return out if bias is None else out + bias


# ---------------------------------------------------------------------------------------
# outlier tracing
# ---------------------------------------------------------------------------------------
class OutlierTracerNotInitializedError(RuntimeError):
    """Raised when outliers are asked for before ``OutlierTracer.get_instance().initialize(model)``."""


def find_outlier_dims(
    weight: Tensor, reduction_dim: int = 0, zscore: float = 4.0, topk: int | None = None, rdm: bool = False
) -> Tensor:
    """Columns whose standard deviation (over ``reduction_dim``) is an outlier.

    Returns the int64 indices with z-score of the std above ``zscore``, or the ``topk``
    largest stds when ``topk`` is given, or ``topk`` random columns with ``rdm``.
    """
    if rdm:
        if topk is None:
            raise ValueError("rdm=True needs topk (how many random dimensions), got None")
        return torch.randint(0, weight.shape[1], size=(topk,), device=weight.device).long()
    w = weight.detach().float()
    std = w.std(reduction_dim)
    zstd = (std - std.mean()) / std.std()
    if topk is not None:
        _, idx = torch.topk(std.abs(), k=topk, dim=0)
        return idx
    return torch.where(zstd > zscore)[0]


def _outlier_hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
    """Forward pre-hook: record the outlier input dimensions of a linear layer, once."""
    tracer = OutlierTracer.get_instance()
    hvalue = tracer.get_hvalue(module.weight)
    if hvalue in tracer.hvalue2outlier_idx:
        # Second pass over a traced layer: the tracing forward is done.
        tracer.remove_hooks()
        return
    if tracer.outliers:
        # Later layers: outlier columns of the weight itself.
        outlier_idx = find_outlier_dims(module.weight)
    else:
        # The first layer's weight is not a reliable guide: z-score of the input's std
        # over tokens, plus any input dimension holding a magnitude above 6.
        x = inputs[0].detach()
        merged = x.reshape(-1, x.shape[-1]).float()
        by_std = find_outlier_dims(merged, reduction_dim=1, zscore=3)
        by_size = torch.where((merged.abs() > 6).sum(0) > 0)[0]
        outlier_idx = torch.cat([by_std, by_size]).unique()
    tracer.outliers.append(outlier_idx)
    tracer.hvalues.append(hvalue)
    tracer.hvalue2outlier_idx[hvalue] = outlier_idx


class OutlierTracer:
    """Finds each linear layer's outlier input dimensions during one forward pass
    (bitsandbytes' ``OutlierTracer``), through forward pre-hooks on the model's
    ``nn.Linear`` layers. A process-wide singleton: use :meth:`get_instance`.
    """

    _instance: OutlierTracer | None = None

    def __init__(self) -> None:
        raise RuntimeError("OutlierTracer is a singleton: call OutlierTracer.get_instance()")

    @classmethod
    def get_instance(cls) -> OutlierTracer:
        if cls._instance is None:
            inst = cls.__new__(cls)
            inst.initialized = False
            inst.hooks = []
            inst.hvalues = []
            inst.outliers = []
            inst.hvalue2outlier_idx = {}
            cls._instance = inst
        return cls._instance

    def initialize(self, model: nn.Module) -> None:
        """Hook every ``nn.Linear`` of ``model``; run a forward pass next to trace."""
        self.remove_hooks()
        self.last_w = None
        self.current_outlier_dims = None
        self.hvalues = []
        self.outliers = []
        self.hvalue2outlier_idx = {}
        self.initialized = True
        for module in model.modules():
            if isinstance(module, nn.Linear):
                self.hooks.append(module.register_forward_pre_hook(_outlier_hook))

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def is_initialized(self) -> bool:
        return bool(getattr(self, "initialized", False))

    def get_hvalue(self, weight: Tensor) -> int:
        """The key of a weight: the address of its storage."""
        return weight.data.untyped_storage().data_ptr()

    def get_outliers(self, weight: Tensor) -> Tensor | None:
        """The traced outlier input dimensions of ``weight``'s layer, or None if it was not traced.

        Raises:
            OutlierTracerNotInitializedError: :meth:`initialize` has not run.
        """
        if not self.is_initialized():
            raise OutlierTracerNotInitializedError(
                "OutlierTracer is not initialized: call OutlierTracer.get_instance().initialize(model) and run a "
                "forward pass first"
            )
        return self.hvalue2outlier_idx.get(self.get_hvalue(weight))


class OutlierAwareLinear(nn.Linear):
    """A linear layer that quantizes its weight knowing its outlier input dimensions.

    Subclasses implement :meth:`quantize_weight` (returns the weight to store) and
    :meth:`forward_with_outliers`. The first forward asks the :class:`OutlierTracer` for
    this layer's outlier dimensions (raising :class:`OutlierTracerNotInitializedError`
    when it was never initialized), quantizes the weight once, then runs
    ``forward_with_outliers``.
    """

    def __init__(
        self, input_features: int, output_features: int, bias: bool = True, device: torch.device | str | None = None
    ) -> None:
        super().__init__(input_features, output_features, bias, device)
        self.outlier_dim: Tensor | None = None
        self.is_quantized = False

    def forward_with_outliers(self, x: Tensor, outlier_idx: Tensor | None) -> Tensor:
        raise NotImplementedError("override forward_with_outliers(self, x, outlier_idx) in a subclass")

    def quantize_weight(self, w: Tensor, outlier_idx: Tensor | None) -> Tensor:
        raise NotImplementedError("override quantize_weight(self, w, outlier_idx) in a subclass")

    def forward(self, x: Tensor) -> Tensor:
        if self.outlier_dim is None:
            tracer = OutlierTracer.get_instance()
            if not tracer.is_initialized():
                raise OutlierTracerNotInitializedError(
                    "OutlierAwareLinear needs OutlierTracer.get_instance().initialize(model) and a forward pass "
                    "before its first use"
                )
            self.outlier_dim = tracer.get_outliers(self.weight)
        if not self.is_quantized:
            w = self.quantize_weight(self.weight, self.outlier_dim)
            with torch.no_grad():
                self.weight.data.copy_(w)
            self.is_quantized = True
        return self.forward_with_outliers(x, self.outlier_dim)
