"""LLM.int8 on NumPy and CuPy arrays: row-wise int8 quantization with outlier columns,
exact int8 products and their dequantization.

Names, arguments and results follow ``bitsandbytes.functional`` (0.50.2). NumPy arrays
take the reference path (``_reference_int8``), CuPy arrays the CUDA kernels on the
array's device and the current stream; int8 codes, statistics and int32 products are
bit-equal between the two, and so are the float outputs (the kernels round exactly as
the reference does).

Arithmetic, for a matrix A viewed as (rows, K) with rows = prod(A.shape[:-1]):

- ``SCA[i] = max_k |A[i, k]|`` (float32; NaN ignored), ``CA = round_half_even(A * s_i)``
  with ``s_i = 127 * RZ(1 / SCA[i])``, which reproduces bitsandbytes' CUDA bytes.
- ``threshold > 0``: values with ``|a| >= threshold`` stay out of their row's absmax, and
  every column holding one (an outlier column) is zero in CA.
- ``int8_mm_dequant``: ``fmaf((acc * row) * col, 1/127^2, bias)``, rounded once.

Unlike bitsandbytes, float32 and bfloat16 activations are quantized as they are (it casts
to float16 first), and dequantized outputs are rounded straight to the requested format.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _reference as ref
from . import _reference_int8 as ref8
from . import _xp
from .blockwise import _check_array, _storage_dtype_for

__all__ = [
    "int8_vectorwise_quant",
    "int8_vectorwise_dequant",
    "int8_double_quant",
    "int8_linear_matmul",
    "int8_mm_dequant",
    "int8_linear",
    "outlier_columns",
    "set_int8_gemm_backend",
    "get_int8_gemm_backend",
    "INT8_MAX_K",
]

INT8_MAX_K = ref8.MAX_K


# ---------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------
def _check_threshold(threshold: Any) -> float:
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise TypeError(f"threshold must be a number, got {type(threshold).__name__}") from None
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    return value


def _matrix_shape(A: Any, name: str) -> tuple[int, int]:
    """(rows, K) of an array seen as (prod(shape[:-1]), shape[-1])."""
    if A.ndim < 1:
        raise ValueError(f"{name} must have at least one dimension (..., K), got a 0-d array")
    K = int(A.shape[-1])
    rows = int(np.prod(A.shape[:-1], dtype=np.int64))
    return rows, K


def _check_dtype(a: Any, name: str, dtype: str) -> None:
    if a.dtype.name != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {a.dtype}")


def _check_size(a: Any, name: str, size: int, what: str) -> None:
    if a.size != size:
        raise ValueError(f"{name} must have {size} elements ({what}), got {a.size} (shape {a.shape})")


def _check_k(K: int) -> None:
    if K > INT8_MAX_K:
        raise ValueError(f"K must be <= {INT8_MAX_K} so int32 accumulation cannot overflow, got {K}")


def _flat(a: Any) -> Any:
    xp = _xp.array_module(a)
    return xp.ascontiguousarray(a).reshape(-1)


def _storage(a: Any) -> Any:
    """Flat contiguous storage view (bfloat16 as uint16 bits)."""
    return _flat(_xp.storage_view(a))


def _format_name(dtype: Any) -> str:
    if isinstance(dtype, str):
        name = dtype
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype)
    name = name.replace("torch.", "")
    if name not in _xp.FLOAT_FORMATS:
        raise ValueError(f"dtype must be one of {_xp.FLOAT_FORMATS}, got {dtype!r}")
    return name


def _check_out_format(out: Any, fmt: str) -> None:
    """``out`` holds ``fmt`` values: its own float dtype, or any 2-byte dtype for bfloat16."""
    if fmt == "bfloat16":
        if out.dtype.itemsize != 2 or out.dtype.name == "float16":
            raise ValueError(f"out must hold bfloat16 values (bfloat16 or a 2-byte integer view), got {out.dtype}")
    elif out.dtype.name != fmt:
        raise ValueError(f"out must have dtype {fmt}, got {out.dtype}")


def _check_out(out: Any, like: Any, shape: tuple[int, ...], what: str) -> None:
    _check_array(out, "out")
    _xp.same_module(like, out, "A", "out")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out must have shape {tuple(shape)} ({what}), got {tuple(out.shape)}")
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")


def _gpu():
    from . import _gpu_int8

    return _gpu_int8


# ---------------------------------------------------------------------------------------
# GEMM backend
# ---------------------------------------------------------------------------------------
def set_int8_gemm_backend(name: str) -> None:
    """Choose the int8 GEMM used past the small-M kernel's rows on the GPU (4 under "auto",
    8 otherwise).

    ``"auto"`` (default): cuBLAS from 17 rows (where it measured faster; capturable in a
    CUDA graph, through ctypes, wherever the process's libcublas is found); from 5 rows below
    that, and up to 64 rows where cuBLAS is not usable, a kernel that reads the int8 weight
    once (rows quantized by a separate pass, weight rows through the tensor cores); the
    fused kernel otherwise. ``"mma"``: this
    package's tensor-core kernel with the dequantization fused into its epilogue.
    ``"cublas"``: cuBLAS' int8 GEMM to int32, then a dequantization kernel (used where
    its shape rules allow: M > 16, K % 16 == 0, N % 8 == 0). All give identical results.
    """
    from ._gpu_int8 import set_gemm_backend

    set_gemm_backend(name)


def get_int8_gemm_backend() -> str:
    """The int8 GEMM backend setting: ``"auto"``, ``"mma"`` or ``"cublas"``."""
    from ._gpu_int8 import gemm_backend

    return gemm_backend()


# ---------------------------------------------------------------------------------------
# row-wise quantization
# ---------------------------------------------------------------------------------------
def int8_vectorwise_quant_bits(
    bits: Any, fmt: str, rows: int, K: int, threshold: float = 0.0, ca_out: Any = None, sca_out: Any = None
) -> tuple[Any, Any, Any]:
    """:func:`int8_vectorwise_quant` on a flat storage array (bfloat16 as uint16 bits).

    ``bits``: rows*K values of ``fmt``; ``ca_out`` (int8[rows*K]) and ``sca_out``
    (float32[rows]) are written in place when given. Returns ``(ca, sca, flags)`` where
    ``flags`` is uint8[K] (1 = outlier column) when ``threshold > 0``, else None; it stays
    on the device (see :func:`outlier_columns`). Call inside the array's device context.
    """
    threshold = _check_threshold(threshold)
    xp = _xp.array_module(bits)
    ca = ca_out if ca_out is not None else xp.empty(rows * K, dtype=xp.int8)
    sca = sca_out if sca_out is not None else xp.empty(rows, dtype=xp.float32)
    if xp is np:
        q, absmax, cols = ref8.quantize_rows(ref.to_float32(bits, fmt).reshape(rows, K), threshold)
        ca[...] = q.reshape(-1)
        sca[...] = absmax
        flags = None if cols is None else cols.astype(np.uint8)
    else:
        flags = _gpu().row_quant(bits, fmt, rows, K, threshold, ca, sca)
    return ca, sca, flags


def outlier_columns(flags: Any) -> Any:
    """Indices (int64, ascending) of the flagged columns of a uint8[K] flags array.

    For CuPy this waits for the device (the count decides the result's size).
    """
    xp = _xp.array_module(flags)
    return xp.flatnonzero(flags).astype(xp.int64)


def int8_vectorwise_quant(A: Any, threshold: float = 0.0) -> tuple[Any, Any, Any]:
    """Quantize each row of ``A`` to int8 with its own absmax (LLM.int8 activations and weights).

    Args:
        A: float32 / float16 / bfloat16 array (..., K) (NumPy or CuPy); rows =
            prod(A.shape[:-1]).
        threshold: >= 0. When > 0, values with ``|a| >= threshold`` stay out of the row
            absmax and their columns (outlier columns) are zero in the output.

    Returns:
        ``(CA, SCA, outlier_cols)``: int8 of A's shape, float32 (rows,) row absmax, and
        int64 (n,) ascending outlier column indices when ``threshold > 0`` (possibly
        empty) or None when ``threshold == 0``. For CuPy with ``threshold > 0`` finding
        the columns waits for the device.
    """
    _check_array(A, "A")
    fmt = _xp.float_format(A)
    threshold = _check_threshold(threshold)
    rows, K = _matrix_shape(A, "A")
    xp = _xp.array_module(A)
    with _xp.device_of(A):
        ca = xp.empty(A.shape, dtype=xp.int8)
        sca = xp.empty(rows, dtype=xp.float32)
        _, _, flags = int8_vectorwise_quant_bits(_storage(A), fmt, rows, K, threshold, ca.reshape(-1), sca)
        cols = None if flags is None else outlier_columns(flags)
    return ca, sca, cols


def int8_vectorwise_dequant_bits(ca: Any, sca: Any, rows: int, K: int, out: Any = None) -> Any:
    """:func:`int8_vectorwise_dequant` on flat arrays: ``out`` float32[rows*K] (allocated when None)."""
    xp = _xp.array_module(ca)
    out = out if out is not None else xp.empty(rows * K, dtype=xp.float32)
    if xp is np:
        out[...] = ref8.dequantize_rows(ca.reshape(rows, K), sca).reshape(-1)
    else:
        _gpu().vectorwise_dequant(ca, sca, rows, K, out)
    return out


def int8_vectorwise_dequant(A: Any, stats: Any) -> Any:
    """Undo :func:`int8_vectorwise_quant`: ``(A * stats[row]) * (1/127)`` in float32.

    Args:
        A: int8 array (..., K).
        stats: float32 (rows,) row absmax, rows = prod(A.shape[:-1]).

    Returns:
        float32 array of A's shape.
    """
    _check_array(A, "A")
    _check_array(stats, "stats")
    _xp.same_module(A, stats, "A", "stats")
    _check_dtype(A, "A", "int8")
    _check_dtype(stats, "stats", "float32")
    rows, K = _matrix_shape(A, "A")
    _check_size(stats, "stats", rows, "one per row of A")
    xp = _xp.array_module(A)
    with _xp.device_of(A):
        out = xp.empty(A.shape, dtype=xp.float32)
        int8_vectorwise_dequant_bits(_flat(A), _flat(stats), rows, K, out.reshape(-1))
    return out


def int8_col_quant_bits(
    bits: Any,
    fmt: str,
    rows: int,
    K: int,
    threshold: float = 0.0,
    flags: Any = None,
    cat_out: Any = None,
    scat_out: Any = None,
) -> tuple[Any, Any]:
    """Column-wise half of :func:`int8_double_quant` on a flat storage array.

    Returns ``(cat int8[rows*K] in A's layout, scat float32[K])``, written into
    ``cat_out`` / ``scat_out`` when given. With ``threshold > 0`` pass the row-wise
    call's ``flags`` (uint8[K]) when at hand, else they are recomputed. Call inside the
    array's device context.
    """
    threshold = _check_threshold(threshold)
    xp = _xp.array_module(bits)
    cat = cat_out if cat_out is not None else xp.empty(rows * K, dtype=xp.int8)
    scat = scat_out if scat_out is not None else xp.empty(K, dtype=xp.float32)
    if xp is np:
        q, colmax = ref8.quantize_columns(ref.to_float32(bits, fmt).reshape(rows, K), threshold)
        cat[...] = q.reshape(-1)
        scat[...] = colmax
        return cat, scat
    gpu = _gpu()
    if threshold > 0 and flags is None:
        flags = gpu.outlier_flags(bits, fmt, rows, K, threshold)
    gpu.col_quant(bits, fmt, rows, K, threshold, flags, cat, scat)
    return cat, scat


def int8_double_quant_bits(bits: Any, fmt: str, rows: int, K: int, threshold: float = 0.0) -> tuple[Any, ...]:
    """:func:`int8_double_quant` on a flat storage array.

    Returns ``(ca int8[rows*K], cat int8[rows*K], sca float32[rows], scat float32[K],
    flags uint8[K] or None)``. Call inside the array's device context.
    """
    ca, sca, flags = int8_vectorwise_quant_bits(bits, fmt, rows, K, threshold)
    cat, scat = int8_col_quant_bits(bits, fmt, rows, K, threshold, flags)
    return ca, cat, sca, scat, flags


def int8_double_quant(
    A: Any,
    col_stats: Any = None,
    row_stats: Any = None,
    out_col: Any = None,
    out_row: Any = None,
    threshold: float = 0.0,
) -> tuple[Any, Any, Any, Any, Any]:
    """Row-wise and column-wise int8 quantization of ``A`` (the LLM.int8 backward pass).

    Args:
        A: float32 / float16 / bfloat16 array (..., K), seen as (rows, K).
        col_stats, row_stats, out_col, out_row: must be None (bitsandbytes' signature;
            preallocated outputs are not supported there either).
        threshold: as in :func:`int8_vectorwise_quant`.

    Returns:
        ``(CA, CAt, SCA, SCAt, outlier_cols)``: CA int8 (A's shape) quantized per row;
        CAt int8 (A's shape, *not* transposed) quantized per column; SCA float32 (rows,);
        SCAt float32 (K,); outlier_cols as in :func:`int8_vectorwise_quant`. With a
        threshold, outlier columns are zero in CA and CAt (bitsandbytes keeps their
        non-outlier values in CAt, which its backward then counts twice).
    """
    for name, value in (("col_stats", col_stats), ("row_stats", row_stats), ("out_col", out_col),
                        ("out_row", out_row)):  # fmt: skip
        if value is not None:
            raise ValueError(
                f"{name} must be None: int8_double_quant allocates its outputs, got {type(value).__name__}"
            )
    _check_array(A, "A")
    fmt = _xp.float_format(A)
    threshold = _check_threshold(threshold)
    rows, K = _matrix_shape(A, "A")
    with _xp.device_of(A):
        ca, cat, sca, scat, flags = int8_double_quant_bits(_storage(A), fmt, rows, K, threshold)
        cols = None if flags is None else outlier_columns(flags)
    return ca.reshape(A.shape), cat.reshape(A.shape), sca, scat, cols


# ---------------------------------------------------------------------------------------
# products
# ---------------------------------------------------------------------------------------
def int8_linear_matmul_bits(ca: Any, cb: Any, M: int, N: int, K: int, out: Any = None) -> Any:
    """``CA (int8[M*K]) @ CB (int8[N*K])^T`` into ``out`` int32[M*N] (allocated when None)."""
    _check_k(K)
    xp = _xp.array_module(ca)
    out = out if out is not None else xp.empty(M * N, dtype=xp.int32)
    if xp is np:
        out[...] = ref8.int8_matmul(ca.reshape(M, K), cb.reshape(N, K)).reshape(-1)
    else:
        _gpu().gemm_int32(ca, cb, M, N, K, out)
    return out


def int8_linear_matmul(A: Any, B: Any, out: Any = None) -> Any:
    """Exact int8 product ``A @ B^T`` accumulated in int32.

    Args:
        A: int8 (..., K).
        B: int8 (N, K), e.g. a quantized weight.
        out: optional int32 (..., N), C-contiguous.

    Returns:
        int32 (..., N).
    """
    _check_array(A, "A")
    _check_array(B, "B")
    _xp.same_module(A, B, "A", "B")
    _check_dtype(A, "A", "int8")
    _check_dtype(B, "B", "int8")
    M, K = _matrix_shape(A, "A")
    if B.ndim != 2:
        raise ValueError(f"B must be 2-D (N, K), got shape {tuple(B.shape)}")
    N = int(B.shape[0])
    if B.shape[1] != K:
        raise ValueError(f"A's last dimension ({K}) must equal B's second dimension ({B.shape[1]})")
    _check_k(K)
    shape = (*A.shape[:-1], N)
    if out is not None:
        _check_out(out, A, shape, "A.shape[:-1] + (N,)")
        _check_dtype(out, "out", "int32")
    xp = _xp.array_module(A)
    with _xp.device_of(A):
        result = out if out is not None else xp.empty(shape, dtype=xp.int32)
        int8_linear_matmul_bits(_flat(A), _flat(B), M, N, K, result.reshape(-1))
    return result


def int8_mm_dequant_bits(
    acc: Any,
    row_stats: Any,
    col_stats: Any,
    M: int,
    N: int,
    fmt: str,
    bias_bits: Any = None,
    bias_fmt: str | None = None,
    out: Any = None,
) -> Any:
    """:func:`int8_mm_dequant` on flat arrays: ``out`` (storage of ``fmt``, M*N values)."""
    xp = _xp.array_module(acc)
    out = out if out is not None else xp.empty(M * N, dtype=_xp.storage_dtype(fmt))
    if xp is np:
        bias32 = None if bias_bits is None else ref.to_float32(bias_bits, bias_fmt)
        out[...] = ref8.mm_dequant(acc.reshape(M, N), row_stats, col_stats, bias32, fmt).reshape(-1)
    else:
        _gpu().mm_dequant(acc, row_stats, col_stats, M, N, fmt, out, bias_bits, bias_fmt)
    return out


def int8_mm_dequant(
    A: Any, row_stats: Any, col_stats: Any, out: Any = None, bias: Any = None, dtype: Any = None
) -> Any:
    """Dequantize an int32 product of row-quantized operands: ``fmaf((A * row) * col, 1/127^2, bias)``.

    Args:
        A: int32 (..., N), e.g. from :func:`int8_linear_matmul`.
        row_stats: float32 (M,), M = prod(A.shape[:-1]) (the activations' SCA).
        col_stats: float32 (N,) (the weight's SCB).
        out: optional (..., N) output; its dtype picks the format (float16, float32, or
            bfloat16 / any 2-byte dtype with ``dtype="bfloat16"``).
        bias: optional (N,) float32 / float16 / bfloat16, added inside the fma.
        dtype: output format ("float16" (default, as bitsandbytes), "bfloat16", "float32").

    Returns:
        (..., N) array of the output format, rounded once from float32.
    """
    _check_array(A, "A")
    _check_array(row_stats, "row_stats")
    _check_array(col_stats, "col_stats")
    _xp.same_module(A, row_stats, "A", "row_stats")
    _xp.same_module(A, col_stats, "A", "col_stats")
    _check_dtype(A, "A", "int32")
    _check_dtype(row_stats, "row_stats", "float32")
    _check_dtype(col_stats, "col_stats", "float32")
    M, N = _matrix_shape(A, "A")
    _check_size(row_stats, "row_stats", M, "one per row of A")
    _check_size(col_stats, "col_stats", N, "one per column of A")
    if dtype is not None:
        fmt = _format_name(dtype)
    elif out is not None:
        fmt = _xp.float_format(out, "out")
    else:
        fmt = "float16"
    shape = tuple(A.shape)
    if out is not None:
        _check_out(out, A, shape, "A's shape")
        _check_out_format(out, fmt)
    bias_fmt = None
    if bias is not None:
        _check_array(bias, "bias")
        _xp.same_module(A, bias, "A", "bias")
        bias_fmt = _xp.float_format(bias, "bias")
        _check_size(bias, "bias", N, "one per column of A")
    xp = _xp.array_module(A)
    with _xp.device_of(A):
        result = out if out is not None else xp.empty(shape, dtype=_storage_dtype_for(fmt, xp))
        int8_mm_dequant_bits(
            _flat(A), _flat(row_stats), _flat(col_stats), M, N, fmt,
            None if bias is None else _storage(bias), bias_fmt, _xp.storage_view(result).reshape(-1),
        )  # fmt: skip
    return result


def int8_linear_bits(
    a_bits: Any,
    fmt: str,
    M: int,
    K: int,
    cb: Any,
    scb: Any,
    N: int,
    bias_bits: Any = None,
    bias_fmt: str | None = None,
    threshold: float = 0.0,
    out: Any = None,
) -> Any:
    """:func:`int8_linear` on flat arrays: A (fmt[M*K]), CB int8[N*K], SCB float32[N],
    bias (bias_fmt[N]); ``out`` fmt storage [M*N] (allocated when None). No host
    synchronisation on the GPU. Call inside the arrays' device context."""
    threshold = _check_threshold(threshold)
    _check_k(K)
    xp = _xp.array_module(a_bits)
    out = out if out is not None else xp.empty(M * N, dtype=_xp.storage_dtype(fmt))
    if xp is np:
        bias32 = None if bias_bits is None else ref.to_float32(bias_bits, bias_fmt)
        x32 = ref.to_float32(a_bits, fmt).reshape(M, K)
        out[...] = ref8.int8_linear(x32, cb.reshape(N, K), scb, bias32, threshold, fmt).reshape(-1)
    else:
        _gpu().linear(a_bits, fmt, M, K, cb, scb, N, bias_bits, bias_fmt, threshold, out)
    return out


def int8_linear(A: Any, CB: Any, SCB: Any, bias: Any = None, threshold: float = 0.0, out: Any = None) -> Any:
    """LLM.int8 linear layer: ``A @ W^T (+ bias)`` with W given as int8 rows and their absmax.

    A is quantized per row (:func:`int8_vectorwise_quant`), multiplied exactly with CB,
    dequantized with bias (:func:`int8_mm_dequant`); with ``threshold > 0`` the outlier
    columns of A are left out of that product and added in A's format instead, as
    ``A[:, cols] @ W16[:, cols]^T`` with ``W16 = (CB * SCB) / 127`` rounded to A's format
    (bitsandbytes' decomposition, rounding the int8 part first as it does).

    Args:
        A: float32 / float16 / bfloat16 activations (..., K).
        CB: int8 (N, K) weight codes (row-wise quantized).
        SCB: float32 (N,) weight row absmax.
        bias: optional (N,) float array (any of the three formats).
        threshold: >= 0, the outlier threshold.
        out: optional (..., N) output of A's dtype, C-contiguous.

    Returns:
        (..., N) array of A's dtype. On the GPU this never waits for the device.
    """
    _check_array(A, "A")
    _check_array(CB, "CB")
    _check_array(SCB, "SCB")
    _xp.same_module(A, CB, "A", "CB")
    _xp.same_module(A, SCB, "A", "SCB")
    fmt = _xp.float_format(A)
    threshold = _check_threshold(threshold)
    M, K = _matrix_shape(A, "A")
    _check_dtype(CB, "CB", "int8")
    _check_dtype(SCB, "SCB", "float32")
    if CB.ndim != 2 or CB.shape[1] != K:
        raise ValueError(f"CB must be 2-D (N, K) with K = A.shape[-1] = {K}, got shape {tuple(CB.shape)}")
    N = int(CB.shape[0])
    _check_size(SCB, "SCB", N, "one per row of CB")
    _check_k(K)
    bias_fmt = None
    if bias is not None:
        _check_array(bias, "bias")
        _xp.same_module(A, bias, "A", "bias")
        bias_fmt = _xp.float_format(bias, "bias")
        _check_size(bias, "bias", N, "one per output feature")
    shape = (*A.shape[:-1], N)
    if out is not None:
        _check_out(out, A, shape, "A.shape[:-1] + (N,)")
        if out.dtype != A.dtype:
            raise ValueError(f"out must have A's dtype {A.dtype}, got {out.dtype}")
    xp = _xp.array_module(A)
    with _xp.device_of(A):
        result = out if out is not None else xp.empty(shape, dtype=A.dtype)
        int8_linear_bits(
            _storage(A), fmt, M, K, _flat(CB), _flat(SCB), N,
            None if bias is None else _storage(bias), bias_fmt, threshold, _xp.storage_view(result).reshape(-1),
        )  # fmt: skip
    return result
