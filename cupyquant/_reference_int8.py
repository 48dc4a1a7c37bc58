"""LLM.int8 arithmetic in vectorised NumPy: the executable spec of ``rawkernels/int8.cu``.

Matrices arrive as 2-D arrays: activations ``(rows, K)`` already widened to float32
(see ``_reference.to_float32``), int8 codes, float32 statistics. Every float step is a
single float32 operation in the kernels' order, so the CUDA kernels reproduce these
results bit for bit.

Rounding facts (checked against bitsandbytes 0.50.2's CUDA kernels, see the fixtures):

- A row's scale is ``127 * RZ(1 / absmax)`` rounded to nearest: bitsandbytes computes
  ``__fdividef(127, absmax)``, a reciprocal approximation times 127. Its reciprocal
  lands below the exact one where the two differ on the fixtures; the truncated
  (round-toward-zero) reciprocal reproduces every fixture byte, the correctly rounded
  one misses where ``x / absmax`` is exactly ``-1/2``.
- Codes are ``round_half_even(x * scale)``; NaN (also ``0 * inf``) gives 0.
- ``threshold > 0``: values with ``|x| >= threshold`` are left out of their row's absmax
  (only those values, not their whole column), and every column holding one is zero in
  the int8 output. Both as bitsandbytes' kernel and its Python wrapper do it.
"""

from __future__ import annotations

import numpy as np

from ._reference import from_float32, to_float32

_F32 = np.float32
_F64 = np.float64

# bitsandbytes' float32 constants, bit for bit: 1/127 of int8_vectorwise_dequant and
# 1/127^2 of its int32 -> float16 dequantization kernel (MM_DEQUANT_CONST).
DEQUANT_SCALE = np.array(0x3C010204, dtype=np.uint32).view(np.float32)[()]  # 7.874015718698502e-3
MM_DEQUANT_SCALE = np.array(0x38820610, dtype=np.uint32).view(np.float32)[()]  # 6.200012e-05

# |int8 x int8| <= 128 * 128, so K up to this bound cannot overflow an int32 accumulator.
MAX_K = (2**31 - 1) // (128 * 128)


def reciprocal_rz(x: np.ndarray) -> np.ndarray:
    """``1 / x`` rounded toward zero to float32 (``__frcp_rz``), for float32 ``x``.

    The float64 quotient is within 2^-53 of the exact one, while an exact quotient that
    is not itself a float32 lies at least ~2^-48 (relative) from every float32, so
    truncating the float64 result gives the exact RZ value. 1/0 = inf, 1/inf = 0, and an
    overflow gives the largest finite float32, as the PTX instruction does.
    """
    with np.errstate(divide="ignore", over="ignore"):
        q = _F64(1.0) / x.astype(_F64)
        f = q.astype(_F32)
    away = np.abs(f.astype(_F64)) > np.abs(q)
    return np.where(away, np.nextafter(f, _F32(0)), f).astype(_F32)


def int8_scale(absmax: np.ndarray) -> np.ndarray:
    """Quantization scale per row / column: ``127 * RZ(1 / absmax)``, rounded to nearest."""
    return (_F32(127.0) * reciprocal_rz(absmax.astype(_F32, copy=False))).astype(_F32)


def fma32(a: np.ndarray, b: np.ndarray | np.float32, c: np.ndarray | np.float32) -> np.ndarray:
    """``fmaf(a, b, c)`` on float32 arrays: ``a * b + c`` with one rounding.

    The product is exact in float64; the float64 sum's rounding error is recovered
    exactly (TwoSum), and when it is not zero the float64 sum is moved one float64 ulp
    toward the exact value. That breaks the only case where rounding twice differs from
    rounding once (a float64 sum that sits exactly on a float32 midpoint).
    """
    p = np.asarray(a, dtype=_F64) * np.asarray(b, dtype=_F64)
    c64 = np.asarray(c, dtype=_F64)
    with np.errstate(invalid="ignore", over="ignore"):
        s = p + c64
        bb = s - p
        err = (p - (s - bb)) + (c64 - bb)
        nudge = np.isfinite(s) & (err != 0)
        toward = np.where(err > 0, np.inf, -np.inf)
        s = np.where(nudge, np.nextafter(s, toward), s)
        return s.astype(_F32)


def _quantize(x32: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``round_half_even(x * scale)`` with NaN -> 0, as int16 (the caller narrows)."""
    with np.errstate(invalid="ignore", over="ignore"):
        v = np.rint(x32 * scale)
    v[~np.isfinite(v)] = 0  # NaN, and outlier values (zeroed afterwards anyway)
    return np.clip(v, -128, 127).astype(np.int16)


def _outliers(x32: np.ndarray, threshold: float) -> np.ndarray | None:
    """Mask of values with ``|x| >= threshold`` (float32 compare), or None when threshold is 0."""
    if threshold <= 0.0:
        return None
    return np.abs(x32) >= _F32(threshold)


def quantize_rows(x32: np.ndarray, threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Row-wise int8 quantization of a ``(rows, K)`` float32 matrix.

    Returns ``(CA int8 (rows, K), SCA float32 (rows,), outlier columns bool (K,) or None)``.
    SCA is each row's absmax (NaN ignored; outlier values excluded).
    """
    big = _outliers(x32, threshold)
    a = np.abs(x32)
    if big is not None:
        a = np.where(big, _F32(0.0), a)
    absmax = np.fmax.reduce(a, axis=1, initial=_F32(0.0)).astype(_F32)
    q = _quantize(x32, int8_scale(absmax)[:, None])
    cols = None
    if big is not None:
        cols = big.any(axis=0)
        q[:, cols] = 0
    return q.astype(np.int8), absmax, cols


def quantize_columns(x32: np.ndarray, threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Column-wise int8 quantization of a ``(rows, K)`` float32 matrix (same layout out).

    Returns ``(CAt int8 (rows, K), SCAt float32 (K,))``: the row-wise arithmetic per
    column. With ``threshold > 0`` outlier values are left out of the column absmax and
    whole outlier columns are zero, as in :func:`quantize_rows`, so that the 16-bit part
    of a decomposed product carries those columns entirely.
    """
    big = _outliers(x32, threshold)
    a = np.abs(x32)
    if big is not None:
        a = np.where(big, _F32(0.0), a)
    colmax = np.fmax.reduce(a, axis=0, initial=_F32(0.0)).astype(_F32)
    q = _quantize(x32, int8_scale(colmax)[None, :])
    if big is not None:
        q[:, big.any(axis=0)] = 0
    return q.astype(np.int8), colmax


def dequantize_rows(ca: np.ndarray, sca: np.ndarray) -> np.ndarray:
    """``(CA * SCA) * (1/127)``, two float32 roundings; float32 (rows, K)."""
    with np.errstate(invalid="ignore", over="ignore"):  # 0 * inf of an all-inf row is NaN, as on the GPU
        return ((ca.astype(_F32) * sca.astype(_F32, copy=False)[:, None]) * DEQUANT_SCALE).astype(_F32)


def int8_matmul(ca: np.ndarray, cb: np.ndarray) -> np.ndarray:
    """``CA (M, K) @ CB (N, K)^T`` as int32 (M, N), exactly.

    Every partial sum is an integer below 2^53 (K <= MAX_K), so float64 BLAS is exact
    whatever order it sums in, and much faster than NumPy's integer matmul.
    """
    return (ca.astype(_F64) @ cb.astype(_F64).T).astype(np.int32)


def mm_dequant(
    acc: np.ndarray, row_stats: np.ndarray, col_stats: np.ndarray, bias32: np.ndarray | None, fmt: str
) -> np.ndarray:
    """``fmaf((acc * row) * col, 1/127^2, bias)`` in float32, rounded once to ``fmt``.

    ``acc`` int32 (M, N); ``bias32`` float32 (N,) or None. Returns the storage array
    (bfloat16 as uint16 bits) of shape (M, N).
    """
    v = acc.astype(_F32) * row_stats.astype(_F32, copy=False)[:, None]
    v = (v * col_stats.astype(_F32, copy=False)[None, :]).astype(_F32)
    c = _F32(0.0) if bias32 is None else bias32.astype(_F32, copy=False)[None, :]
    return from_float32(fma32(v, MM_DEQUANT_SCALE, c), fmt)


def outlier_weights(cb_cols: np.ndarray, scb: np.ndarray, fmt: str) -> np.ndarray:
    """The 16-bit weights of outlier columns: ``fmt((CB * SCB) * (1/127))`` widened to float32.

    ``cb_cols``: int8 (N, C), the weight's outlier columns; returns float32 (N, C).
    """
    w = (cb_cols.astype(_F32) * scb.astype(_F32, copy=False)[:, None]) * DEQUANT_SCALE
    return to_float32(from_float32(w.astype(_F32), fmt), fmt)


def add_outliers(
    out_bits: np.ndarray, x32: np.ndarray, cb: np.ndarray, scb: np.ndarray, cols: np.ndarray, fmt: str
) -> np.ndarray:
    """The 16-bit part of the decomposition: ``fmt(out + sum_j A[:, c_j] * W16[:, c_j])``.

    ``out_bits`` (M, N) storage of ``fmt`` (the rounded int8 part); ``cols`` ascending
    column indices. The sum runs over the columns in ascending order, one float32
    multiply and one add each, starting from 0; then one add to the widened output and
    one rounding (bitsandbytes rounds its int8 part to 16 bits and adds the outlier
    product with ``addmm`` the same way).
    """
    w = outlier_weights(cb[:, cols], scb, fmt)  # (N, C)
    a = x32[:, cols]  # (M, C)
    s = np.zeros(out_bits.shape, dtype=_F32)
    with np.errstate(invalid="ignore", over="ignore"):
        for j in range(cols.size):
            s = (s + (a[:, j : j + 1] * w[None, :, j])).astype(_F32)
        return from_float32((to_float32(out_bits, fmt) + s).astype(_F32), fmt)


def int8_linear(
    x32: np.ndarray,
    cb: np.ndarray,
    scb: np.ndarray,
    bias32: np.ndarray | None,
    threshold: float,
    fmt: str,
) -> np.ndarray:
    """LLM.int8 forward ``A (M, K) @ W (N, K)^T (+ bias)``; returns ``fmt`` storage (M, N).

    Row-wise quantization of A (outlier columns zeroed), exact int32 product with the
    int8 weight, dequantization with bias, then (when A has outlier columns) their 16-bit
    product added as in :func:`add_outliers`.
    """
    ca, sca, cols = quantize_rows(x32, threshold)
    out = mm_dequant(int8_matmul(ca, cb), sca, scb, bias32, fmt)
    if cols is not None and cols.any():
        out = add_outliers(out, x32, cb, scb, np.flatnonzero(cols), fmt)
    return out
