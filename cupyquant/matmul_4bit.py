"""4-bit matrix products: ``out = A @ dequantize(B)^T (+ bias)`` on packed NF4/FP4 weights.

``B`` is the packed weight of an (N, K) matrix quantized with :func:`quantize_4bit`
(``quant_state.shape == (N, K)``); ``A`` is (..., K). This module holds the reference
semantics: dequantize to float32 and multiply in float32 (NumPy), or dequantize to the
activation dtype and multiply with cuBLAS (CuPy).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _reference as ref
from . import _xp
from .blockwise import _check_array, check_state_4bit, dequantize_4bit_bits
from .quant_state import QuantState

__all__ = ["matmul_4bit", "gemv_4bit", "matmul_4bit_bits"]


def _check_operands(a_fmt: str, K: int, quant_state: QuantState) -> tuple[int, int]:
    fmt, _, _ = check_state_4bit(quant_state)
    if len(quant_state.shape) != 2:
        raise ValueError(f"B must be a quantized 2-D (N, K) weight, got shape {quant_state.shape}")
    N, K_w = quant_state.shape
    if K != K_w:
        raise ValueError(f"A's last dimension ({K}) must equal the weight's K ({K_w}); weight shape is {(N, K_w)}")
    return N, K_w


def matmul_4bit_bits(a_bits: Any, fmt: str, M: int, packed: Any, quant_state: QuantState,
                     bias_bits: Any = None, out_bits: Any = None) -> Any:  # fmt: skip
    """``out[M, N] = A[M, K] @ W[N, K]^T (+ bias[N])`` on flat storage arrays (bf16 as uint16 bits).

    ``a_bits``: (M*K) values of ``fmt``; ``packed``: flat uint8 codes of W; ``bias_bits``:
    N values of ``fmt`` or None; ``out_bits``: M*N values of ``fmt`` written in place
    (allocated when None). Accumulation is float32, the result is rounded to ``fmt`` once.
    Call inside the arrays' device context. Returns ``out_bits``.
    """
    K = a_bits.size // M if M else quant_state.shape[1]
    N, K = _check_operands(fmt, K, quant_state)
    xp = _xp.array_module(a_bits)
    if out_bits is None:
        out_bits = xp.empty(M * N, dtype=_xp.storage_dtype(fmt))
    w_fmt = "float32"
    weight = xp.empty(N * K, dtype=np.float32)
    state32 = QuantState(
        absmax=quant_state.absmax, shape=quant_state.shape, code=quant_state.code, blocksize=quant_state.blocksize,
        quant_type=quant_state.quant_type, dtype=w_fmt, offset=quant_state.offset, state2=quant_state.state2,
    )  # fmt: skip
    dequantize_4bit_bits(packed, state32, weight)
    a32 = ref.to_float32(a_bits, fmt) if xp is np else _to_float32_gpu(a_bits, fmt)
    acc = a32.reshape(M, K) @ weight.reshape(N, K).T
    if bias_bits is not None:
        acc += (ref.to_float32(bias_bits, fmt) if xp is np else _to_float32_gpu(bias_bits, fmt))[None, :]
    out_bits[...] = (ref.from_float32(acc, fmt) if xp is np else _from_float32_gpu(acc, fmt)).reshape(-1)
    return out_bits


def _to_float32_gpu(bits: Any, fmt: str) -> Any:
    cp = _xp.cupy()
    if fmt == "bfloat16":
        return (bits.astype(cp.uint32) << 16).view(cp.float32)
    return bits.astype(cp.float32)


def _from_float32_gpu(x: Any, fmt: str) -> Any:
    cp = _xp.cupy()
    if fmt == "float32":
        return x
    if fmt == "float16":
        return x.astype(cp.float16)
    u = x.view(cp.uint32)
    rounded = (u + cp.uint32(0x7FFF) + ((u >> 16) & cp.uint32(1))) >> 16
    return cp.where(cp.isnan(x), cp.uint32(0x7FFF), rounded).astype(cp.uint16)


def matmul_4bit(A: Any, B: Any, quant_state: QuantState, out: Any = None, bias: Any = None) -> Any:
    """``A @ dequantize(B, quant_state)^T (+ bias)``.

    Args:
        A: (..., K) float32 / float16 / bfloat16 activations (NumPy or CuPy).
        B: the packed weight from ``quantize_4bit`` of an (N, K) matrix.
        quant_state: B's QuantState.
        out: optional (..., N) output of A's dtype.
        bias: optional (N,) of A's dtype.

    Returns:
        (..., N) array of A's dtype.
    """
    _check_array(A, "A")
    _check_array(B, "B")
    fmt = _xp.float_format(A)
    if A.ndim < 1:
        raise ValueError("A must have at least one dimension (..., K)")
    K = A.shape[-1]
    N, _ = _check_operands(fmt, K, quant_state)
    _xp.same_module(A, B, "A", "B")
    xp = _xp.array_module(A)
    lead = A.shape[:-1]
    M = int(np.prod(lead, dtype=np.int64))
    if bias is not None:
        _check_array(bias, "bias")
        if bias.size != N or _xp.float_format(bias, "bias") != fmt:
            raise ValueError(f"bias must be ({N},) of {fmt}, got {bias.shape} of {bias.dtype}")
    if out is not None:
        _check_array(out, "out")
        if out.shape != (*lead, N) or _xp.float_format(out, "out") != fmt or not out.flags.c_contiguous:
            raise ValueError(f"out must be a contiguous {(*lead, N)} array of {fmt}, got {out.shape} of {out.dtype}")
    if not B.flags.c_contiguous:
        raise ValueError("B (packed codes) must be C-contiguous")
    with _xp.device_of(A):
        result = out if out is not None else xp.empty((*lead, N), dtype=A.dtype)
        a_bits = xp.ascontiguousarray(_xp.storage_view(A)).reshape(-1)
        bias_bits = None if bias is None else xp.ascontiguousarray(_xp.storage_view(bias)).reshape(-1)
        matmul_4bit_bits(a_bits, fmt, M, B.reshape(-1).view(xp.uint8), quant_state, bias_bits,
                         _xp.storage_view(result).reshape(-1))  # fmt: skip
    return result


def gemv_4bit(A: Any, B: Any, quant_state: QuantState, out: Any = None, bias: Any = None) -> Any:
    """:func:`matmul_4bit` for a single row of activations (A has M = 1 rows)."""
    _check_array(A, "A")
    rows = int(np.prod(A.shape[:-1], dtype=np.int64)) if A.ndim else 0
    if rows != 1:
        raise ValueError(f"gemv_4bit needs exactly one row of activations (M = 1), got A of shape {A.shape}")
    return matmul_4bit(A, B, quant_state, out=out, bias=bias)


