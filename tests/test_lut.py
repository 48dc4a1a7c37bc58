"""The quantize kernels' bucket tables give exactly the reference codes, for every kind
of float32 input: dense random sweeps, a few ulps around every boundary and bucket edge,
zeros, NaN and values just beyond [-1, 1]."""

from __future__ import annotations

import numpy as np

from cupyquant import _lut
from cupyquant import _reference as ref
from cupyquant.codebooks import FP4_THRESHOLDS, NF4_THRESHOLDS, create_fp8_map, create_linear_map, dynamic_map


def around(points, ulps: int = 4) -> np.ndarray:
    """Each point and its ``ulps`` float32 neighbours on both sides."""
    out = []
    for p in np.asarray(points, dtype=np.float32):
        lo = hi = p
        out.append(p)
        for _ in range(ulps):
            lo, hi = np.nextafter(lo, np.float32(-np.inf)), np.nextafter(hi, np.float32(np.inf))
            out += [lo, hi]
    return np.array(out, dtype=np.float32)


SPECIALS = np.array([0.0, -0.0, 1.0, -1.0, 1.0000001, -1.0000001, np.nan, -np.nan, 1e-30, -1e-30, 1e-45], np.float32)


def sweep(boundaries) -> np.ndarray:
    """Inputs up to |x| = 1.5: the kernels look up x * (1 / absmax), which never exceeds
    1 + 2**-22 in magnitude, and the linear tables are valid well beyond that."""
    rng = np.random.default_rng(0)
    edges = np.concatenate([np.arange(-96, 97) / 64, np.arange(-192, 193) / 128])
    log_spread = rng.uniform(-1, 1, 200_000) * 10.0 ** rng.uniform(-9, 0, 200_000)
    return np.concatenate(
        [
            rng.uniform(-1.05, 1.05, 400_000).astype(np.float32),
            log_spread.astype(np.float32),
            around(boundaries),
            around(edges),
            SPECIALS,
        ]  # fmt: skip
    )


def test_nf4_table_equals_reference():
    x = sweep(NF4_THRESHOLDS)
    np.testing.assert_array_equal(_lut.nf4_codes_by_table(x), ref.codes_nf4(x))


def test_fp4_table_equals_reference():
    x = sweep(np.concatenate([FP4_THRESHOLDS, -FP4_THRESHOLDS]))
    np.testing.assert_array_equal(_lut.fp4_codes_by_table(x), ref.codes_fp4(x))


def test_dynamic_table_equals_reference():
    code = dynamic_map()
    table = _lut.code8_table(code)
    assert table is not None and table.shape == (_lut.EXPONENT_TABLE_SIZE, 2)
    mids = (code[:-1] + code[1:]) * np.float32(0.5)
    x = np.concatenate([sweep(mids), around(code), np.array([2.0, -3.5, np.inf, -np.inf], np.float32)])
    np.testing.assert_array_equal(_lut.code8_by_table(x, table), ref.codes_8bit(x, code))


def test_codes_that_do_not_fit_the_buckets_get_no_table():
    """Repeated values (the padded linear map) or boundaries closer than a bucket (fp8's
    subnormals) make the kernels fall back to the binary search."""
    from cupyquant.codebooks import create_dynamic_map

    assert _lut.code8_table(create_linear_map()) is None
    assert _lut.code8_table(create_fp8_map()) is None
    assert _lut.code8_table(create_dynamic_map(signed=False)) is None
    assert _lut.code8_table(np.zeros(16, np.float32)) is None
