"""Bucket lookup tables that let the quantize kernels find a code in O(1).

A kernel maps the scaled value x to a bucket with two integer-exact float operations,
then reads one table entry ``(threshold, lo, hi)`` and returns ``hi if x > threshold
else lo``. The table is built here so that every bucket holds at most one decision
boundary (with a safety margin far above any rounding), which makes the lookup equal to
the reference search in ``_reference`` for every float32 input; the tests check that on
dense sweeps around every boundary.

Entry layout: uint32 pairs ``(threshold bits, lo | hi << 8)``.

Bucket functions (the kernels compute exactly these):
  NF4   c = fmaxf(x, -1): idx = bits(fma(c, 64, 1.5 * 2**23 + 64)) & 0xFF
  FP4   c = fmaxf(|x|, 0): idx = bits(fma(c, 128, 1.5 * 2**23)) & 0xFF
fmaxf turns NaN into the clamp value, whose entry has lo = 0, and NaN > threshold is
false: NaN gets code 0 whatever its payload.
  8-bit (sign, exponent, top 6 mantissa bits) of x, see ``exponent_bucket``.
x * 64 and x * 128 are exact, so the fused multiply-add rounds once, as NumPy does.
"""

from __future__ import annotations

import functools

import numpy as np

from .codebooks import FP4_MAGNITUDE_INDEX, FP4_THRESHOLDS, NF4_THRESHOLDS, dynamic_map

MAGIC = np.float32(1.5 * 2**23)  # adding it leaves round(v) in the low mantissa bits
LINEAR_TABLE_SIZE = 256
# Linear bucket ranges are widened by this much before counting boundaries: orders of
# magnitude above the ~1e-7 rounding of the bucket arithmetic, far below the boundary gaps.
MARGIN = 1e-4

# 8-bit exponent buckets: 64 per binade for exponents E_MIN..127 (|x| < 2**(E_MIN-127) is
# one bucket), per sign, plus one entry for NaN.
E_MIN = 104
BUCKETS_PER_BINADE = 64
BUCKETS_PER_SIGN = 1 + (127 - E_MIN + 1) * BUCKETS_PER_BINADE
EXPONENT_TABLE_SIZE = 2 * BUCKETS_PER_SIGN + 1
EXPONENT_NAN_ENTRY = EXPONENT_TABLE_SIZE - 1


def _entry(threshold: float, lo: int, hi: int) -> tuple[int, int]:
    return int(np.float32(threshold).view(np.uint32)), int(lo) | (int(hi) << 8)


def _table_from_buckets(
    ranges: np.ndarray, boundaries: np.ndarray, code_at: np.ndarray, size: int, margin: float
) -> np.ndarray | None:
    """Entries for buckets covering ``ranges[i] = (lo, hi)``.

    ``boundaries`` are sorted float32 values b_j: the code is ``code_at[j]`` for x in
    (b_{j-1}, b_j] (``x > b`` steps past b). Returns None when a bucket holds two boundaries.
    """
    table = np.zeros((size, 2), dtype=np.uint32)
    table[:] = _entry(np.inf, 0, 0)  # unused entries and NaN: code 0
    b64 = boundaries.astype(np.float64)
    for i, (lo, hi) in enumerate(ranges):
        below = int(np.searchsorted(b64, lo - margin, side="left"))
        inside = int(np.searchsorted(b64, hi + margin, side="right")) - below
        if inside > 1:
            return None
        if inside == 1:
            table[i] = _entry(boundaries[below], code_at[below], code_at[below + 1])
        else:
            table[i] = _entry(np.inf, code_at[below], code_at[below])
    return table


@functools.cache
def nf4_table() -> np.ndarray:
    """uint32[256, 2]: NF4 code = count of thresholds x exceeds, by bucket of x."""
    idx = np.arange(LINEAR_TABLE_SIZE)
    ranges = np.stack([(idx - 64.5) / 64, (idx - 63.5) / 64], axis=1)
    table = _table_from_buckets(ranges, NF4_THRESHOLDS, np.arange(16), LINEAR_TABLE_SIZE, MARGIN)
    if table is None:  # pragma: no cover - fixed thresholds, checked by the tests
        raise RuntimeError("NF4 thresholds are closer than a bucket")
    return table


@functools.cache
def fp4_table() -> np.ndarray:
    """uint32[256, 2]: FP4 magnitude index of |x| (the kernel adds the sign bit)."""
    idx = np.arange(LINEAR_TABLE_SIZE)
    ranges = np.stack([(idx - 0.5) / 128, (idx + 0.5) / 128], axis=1)
    table = _table_from_buckets(ranges, FP4_THRESHOLDS, FP4_MAGNITUDE_INDEX, LINEAR_TABLE_SIZE, MARGIN)
    if table is None:  # pragma: no cover
        raise RuntimeError("FP4 thresholds are closer than a bucket")
    return table


def _midpoint_boundaries(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decision boundaries of the 8-bit nearest-code search as ``x > b`` steps.

    With m_i = (code[i] + code[i+1]) * 0.5 in float32, the search returns
    #{even i: x > m_i} + #{odd i: x >= m_i}; ``x >= m`` is ``x > nextafter(m, -inf)``.
    """
    code = code.astype(np.float32)
    mids = ((code[:-1] + code[1:]) * np.float32(0.5)).astype(np.float32)
    odd = np.arange(mids.size) % 2 == 1
    mids[odd] = np.nextafter(mids[odd], np.float32(-np.inf))
    return mids, np.arange(256)


def exponent_bucket(x: np.ndarray) -> np.ndarray:
    """The 8-bit kernel's bucket of float32 x (NumPy twin of the CUDA code).

    Per sign: bucket 0 holds |x| < 2**(E_MIN - 127); then 64 buckets per binade, cut by
    the top 6 mantissa bits; |x| >= 2 (Inf too) clamps to the last bucket. NaN has its own.
    """
    bits = x.astype(np.float32).view(np.uint32)
    sign = (bits >> 31).astype(np.int64)
    mag = bits & np.uint32(0x7FFFFFFF)
    e = (mag >> 23).astype(np.int64)
    top = ((mag >> 17) & 63).astype(np.int64)
    within = np.where(e < E_MIN, 0, np.minimum(1 + (e - E_MIN) * BUCKETS_PER_BINADE + top, BUCKETS_PER_SIGN - 1))
    return np.where(mag > 0x7F800000, EXPONENT_NAN_ENTRY, sign * BUCKETS_PER_SIGN + within)


def _exponent_ranges() -> np.ndarray:
    """(lo, hi) of x for every exponent bucket, in the table's order."""
    ranges = np.zeros((EXPONENT_TABLE_SIZE - 1, 2))
    tiny = 2.0 ** (E_MIN - 127)
    for sign in (0, 1):
        base = sign * BUCKETS_PER_SIGN
        mags = [(0.0, tiny)]
        for e in range(E_MIN, 128):
            scale = 2.0 ** (e - 127)
            for t in range(BUCKETS_PER_BINADE):
                mags.append((scale * (1 + t / 64), scale * (1 + (t + 1) / 64)))
        mags = np.array(mags)
        ranges[base : base + BUCKETS_PER_SIGN] = mags if sign == 0 else -mags[:, ::-1]
    return ranges


def code8_table(code: np.ndarray) -> np.ndarray | None:
    """uint32[EXPONENT_TABLE_SIZE, 2] for a sorted, distinct 256-value code, or None when
    two of its boundaries share a bucket (the kernels then use the binary search)."""
    code = np.asarray(code, dtype=np.float32)
    if code.size != 256 or np.any(np.diff(code) <= 0):
        return None
    boundaries, code_at = _midpoint_boundaries(code)
    # exponent buckets are cut from the bits exactly: no margin needed
    return _table_from_buckets(_exponent_ranges(), boundaries, code_at, EXPONENT_TABLE_SIZE, 0.0)


@functools.cache
def dynamic_table() -> np.ndarray:
    table = code8_table(dynamic_map())
    if table is None:  # pragma: no cover
        raise RuntimeError("the dynamic map does not fit the exponent buckets")
    return table


# ---------------------------------------------------------------------------------------
# NumPy evaluation of the tables (what the kernels compute), for the tests
# ---------------------------------------------------------------------------------------
def _apply(table: np.ndarray, idx: np.ndarray, x: np.ndarray) -> np.ndarray:
    entry = table[idx]
    threshold = entry[:, 0].view(np.float32)
    lo, hi = entry[:, 1] & 0xFF, entry[:, 1] >> 8
    return np.where(x > threshold, hi, lo).astype(np.uint8)


def _linear_bucket(x: np.ndarray, scale: float, offset: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        t = (x.astype(np.float32) * np.float32(scale) + np.float32(MAGIC + offset)).astype(np.float32)
    return (t.view(np.uint32) & np.uint32(0xFF)).astype(np.int64)


def nf4_codes_by_table(x: np.ndarray) -> np.ndarray:
    return _apply(nf4_table(), _linear_bucket(np.fmax(x, np.float32(-1)), 64, 64), x)


def fp4_codes_by_table(x: np.ndarray) -> np.ndarray:
    a = np.abs(x)
    sign = np.where(x < 0, np.uint8(8), np.uint8(0))
    return _apply(fp4_table(), _linear_bucket(np.fmax(a, np.float32(0)), 128, 0), a) | sign


def code8_by_table(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    return _apply(table, exponent_bucket(x), x)
