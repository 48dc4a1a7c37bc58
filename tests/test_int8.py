"""LLM.int8 ops: bitsandbytes' bytes (fixtures), behaviour and errors on the NumPy path,
and the CuPy kernels against it, bit for bit (gpu marker)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from safetensors.numpy import load_file

from cupyquant import _reference as ref
from cupyquant import _reference_int8 as ref8
from cupyquant import int8 as I8

from .conftest import FIXTURES

FORMATS = ("float32", "float16", "bfloat16")
# One int8 step is absmax / 127; rounding to nearest keeps half of it, and the float32
# scale and product add a few ulps on top.
HALF_STEP = 0.5 / 127 * (1 + 2**-20)


def random_bits(rng: np.random.Generator, shape: tuple[int, ...], fmt: str, scale: float = 1.0) -> np.ndarray:
    """Normal values in a format's storage (bfloat16 as uint16 bits)."""
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    return ref.from_float32(x, fmt) if fmt != "float32" else x


def widen(bits: np.ndarray, fmt: str) -> np.ndarray:
    return ref.to_float32(bits, fmt)


def with_outliers(rng: np.random.Generator, rows: int, K: int, fmt: str, cols: int = 3) -> np.ndarray:
    """Normal activations with a few columns scaled up (LLM.int8's outlier features)."""
    x = rng.standard_normal((rows, K)).astype(np.float32)
    if K:
        x[:, rng.choice(K, size=min(cols, K), replace=False)] *= 9.0
    return ref.from_float32(x, fmt) if fmt != "float32" else x


# ---------------------------------------------------------------------------------------
# bitsandbytes 0.50.2 fixtures
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("threshold", [0, 6])
def test_fixture_vectorwise_quant(threshold):
    d = load_file(FIXTURES / "int8_vectorwise_fp16.safetensors")
    ca, sca, cols = I8.int8_vectorwise_quant(d["A"], threshold=float(threshold))
    np.testing.assert_array_equal(ca, d[f"CB_thr{threshold}"])
    np.testing.assert_array_equal(sca, d[f"SCB_thr{threshold}"])
    if threshold:
        np.testing.assert_array_equal(cols, d["outlier_cols_thr6"])
        assert cols.dtype == np.int64
    else:
        assert cols is None


@pytest.mark.parametrize("threshold", [0, 6])
def test_fixture_linear8bitlt(threshold):
    """The weight bytes (float32 weight rounded to float16, then quantized) and the layer
    output of Linear8bitLt(64, 32, has_fp16_weights=False, threshold), bit for bit."""
    d = load_file(FIXTURES / f"linear8bitlt_thr{threshold}.safetensors")
    cb, scb, _ = I8.int8_vectorwise_quant(d["fp_weight"].astype(np.float16))
    np.testing.assert_array_equal(cb, d["module.weight"])
    np.testing.assert_array_equal(scb, d["module.SCB"])
    y = I8.int8_linear(d["x"], cb, scb, bias=d["module.bias"], threshold=float(threshold))
    assert y.dtype == np.float16
    np.testing.assert_array_equal(y, d["y"])


def test_fixture_truncated_reciprocal_matters():
    """A weight value at exactly -absmax/2 scales to -63.5 only with the correctly rounded
    scale; bitsandbytes (and the truncated reciprocal) give -63."""
    d = load_file(FIXTURES / "linear8bitlt_thr6.safetensors")
    w = d["fp_weight"].astype(np.float16).astype(np.float32)
    i, j = 7, 50
    assert w[i, j] * 2 == -np.abs(w[i]).max()
    assert d["module.weight"][i, j] == -63
    exact_scale = np.float32(127) / np.abs(w[i]).max()
    assert np.rint(w[i, j] * exact_scale) == -64


# ---------------------------------------------------------------------------------------
# exact arithmetic helpers of the reference
# ---------------------------------------------------------------------------------------
def _round_fraction_to_f32(q: Fraction) -> np.float32:
    """Correctly rounded (to nearest, ties to even) float32 of an exact rational."""
    f = np.float32(float(q))
    best = None
    for c in (np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))):
        key = (abs(Fraction(float(c)) - q), int(c.view(np.uint32)) & 1)
        if best is None or key < best[0]:
            best = (key, c)
    return best[1]


def test_reciprocal_rz_is_exact():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.uniform(1e-3, 1e3, 2000).astype(np.float32),
        np.float32(2.0) ** rng.integers(-100, 100, 50).astype(np.float32),
        np.array([3.0, 7.0, 127.0, 0.12139892578125, 1e-40], dtype=np.float32),
    ])  # fmt: skip
    r = ref8.reciprocal_rz(x)
    for xi, ri in zip(x, r, strict=True):
        exact = 1 / Fraction(float(xi))
        assert Fraction(float(ri)) <= exact  # toward zero
        if ri != np.finfo(np.float32).max:
            assert Fraction(float(np.nextafter(ri, np.float32(np.inf)))) > exact
    assert ref8.reciprocal_rz(np.array([0.0], np.float32))[0] == np.inf
    assert ref8.reciprocal_rz(np.array([np.inf], np.float32))[0] == 0.0


def test_fma32_rounds_once():
    rng = np.random.default_rng(1)
    a = rng.standard_normal(3000).astype(np.float32) * np.float32(1e3)
    b = np.full(3000, ref8.MM_DEQUANT_SCALE, np.float32)
    c = rng.standard_normal(3000).astype(np.float32)
    # ties of the float64 sum: c chosen so a*b + c lands on float32 midpoints often
    c[:1000] = -(a[:1000] * b[:1000]).astype(np.float32)
    got = ref8.fma32(a, b, c)
    for ai, bi, ci, gi in zip(a, b, c, got, strict=True):
        exact = Fraction(float(ai)) * Fraction(float(bi)) + Fraction(float(ci))
        assert gi == _round_fraction_to_f32(exact)


# ---------------------------------------------------------------------------------------
# row-wise quantization: behaviour
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 64), (3, 7), (17, 1000), (64, 4096)], ids=str)
def test_quant_codes_scales_and_round_trip(fmt, shape):
    rng = np.random.default_rng(sum(shape))
    bits = random_bits(rng, shape, fmt, 3.0)
    rows, K = shape
    ca, sca, flags = I8.int8_vectorwise_quant_bits(bits.reshape(-1), fmt, rows, K)
    assert flags is None and ca.dtype == np.int8 and sca.dtype == np.float32
    x = widen(bits, fmt)
    np.testing.assert_array_equal(sca, np.abs(x).max(axis=1))
    ca = ca.reshape(shape)
    assert ca.min() >= -127 and ca.max() <= 127
    assert np.all(np.abs(ca).max(axis=1) == 127)  # the absmax element maps to +-127
    deq = I8.int8_vectorwise_dequant(ca, sca)
    assert np.all(np.abs(deq - x) <= HALF_STEP * sca[:, None] + 1e-6 * sca[:, None])


def test_quant_is_round_half_even_of_the_scaled_value():
    x = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 63.5, -63.5]], dtype=np.float32)
    ca, sca, _ = I8.int8_vectorwise_quant(x)
    np.testing.assert_array_equal(ca[0], [127, 0, 2, 2, 0, -2, 64, -64])
    assert sca[0] == 127.0


def test_quant_3d_input_and_one_dimensional_input():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 40)).astype(np.float16)
    ca, sca, _ = I8.int8_vectorwise_quant(x)
    ca2, sca2, _ = I8.int8_vectorwise_quant(x.reshape(6, 40))
    assert ca.shape == x.shape and sca.shape == (6,)
    np.testing.assert_array_equal(ca.reshape(6, 40), ca2)
    np.testing.assert_array_equal(sca, sca2)
    ca1, sca1, _ = I8.int8_vectorwise_quant(x[0, 0])
    assert ca1.shape == (40,) and sca1.shape == (1,)
    np.testing.assert_array_equal(ca1, ca2[0])


def test_zero_rows_nan_and_inf():
    x = np.zeros((4, 8), dtype=np.float32)
    x[1] = np.arange(8) - 3.5
    x[2, 0] = np.nan
    x[2, 1] = 2.0
    x[3, 2] = np.inf
    x[3, 3] = 1.0
    ca, sca, _ = I8.int8_vectorwise_quant(x)
    assert sca[0] == 0 and np.all(ca[0] == 0)  # 0 * (127 / 0) is NaN -> code 0
    assert sca[2] == 2.0 and ca[2, 0] == 0 and ca[2, 1] == 127  # NaN ignored, coded 0
    assert sca[3] == np.inf and np.all(ca[3] == 0)  # scale 127 * (1/inf) = 0
    np.testing.assert_array_equal(I8.int8_vectorwise_dequant(ca, sca)[0], np.zeros(8))


def test_threshold_leaves_outlier_values_out_of_the_row_absmax():
    x = np.array(
        [
            [1.0, 8.0, 0.5, 2.0],  # 8.0 is an outlier: column 1
            [0.25, 3.0, 0.5, 1.0],  # 3.0 sits in the outlier column but counts for the absmax
        ],
        dtype=np.float32,
    )
    ca, sca, cols = I8.int8_vectorwise_quant(x, threshold=6.0)
    np.testing.assert_array_equal(cols, [1])
    np.testing.assert_array_equal(sca, [2.0, 3.0])
    assert np.all(ca[:, 1] == 0)
    np.testing.assert_array_equal(ca[1], [11, 0, 21, 42])
    np.testing.assert_array_equal(ca[0, [0, 2, 3]], [64, 32, 127])


def test_threshold_edge_cases():
    x = np.array([[1.0, -6.0, 5.999]], dtype=np.float32)
    _, sca, cols = I8.int8_vectorwise_quant(x, threshold=6.0)  # |a| >= threshold, inclusive
    np.testing.assert_array_equal(cols, [1])
    assert sca[0] == np.float32(5.999)
    _, _, cols = I8.int8_vectorwise_quant(x, threshold=100.0)
    assert cols is not None and cols.size == 0 and cols.dtype == np.int64
    _, _, cols = I8.int8_vectorwise_quant(x, threshold=0.0)
    assert cols is None


# ---------------------------------------------------------------------------------------
# double quantization
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("threshold", [0.0, 3.0])
def test_double_quant(threshold):
    rng = np.random.default_rng(4)
    x = with_outliers(rng, 33, 70, "float16")
    ca, cat, sca, scat, cols = I8.int8_double_quant(x, threshold=threshold)
    ca2, sca2, cols2 = I8.int8_vectorwise_quant(x, threshold=threshold)
    np.testing.assert_array_equal(ca, ca2)
    np.testing.assert_array_equal(sca, sca2)
    assert cat.shape == x.shape and cat.dtype == np.int8 and scat.shape == (70,)
    x32 = x.astype(np.float32)
    inliers = np.where(np.abs(x32) >= threshold, 0, np.abs(x32)) if threshold else np.abs(x32)
    np.testing.assert_array_equal(scat, inliers.max(axis=0))
    # column-wise codes are the row-wise arithmetic on the transpose
    cat_t, scat_t, _ = I8.int8_vectorwise_quant(np.ascontiguousarray(x.T))
    if threshold:
        np.testing.assert_array_equal(cols, cols2)
        assert cols.size > 0 and np.all(cat[:, cols] == 0) and np.all(ca[:, cols] == 0)
        keep = np.setdiff1d(np.arange(70), cols)
        np.testing.assert_array_equal(cat[:, keep], cat_t.T[:, keep])
    else:
        assert cols is None
        np.testing.assert_array_equal(cat, cat_t.T)
        np.testing.assert_array_equal(scat, scat_t)


# ---------------------------------------------------------------------------------------
# products
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (3, 5, 7), (17, 33, 130), (2, 4, 5000)])
def test_int8_linear_matmul_is_exact(M, N, K):
    rng = np.random.default_rng(M * N + K)
    a = rng.integers(-128, 128, (M, K), dtype=np.int8)
    b = rng.integers(-128, 128, (N, K), dtype=np.int8)
    a[0, :] = -128
    b[0, :] = -128  # the largest products
    out = I8.int8_linear_matmul(a, b)
    assert out.dtype == np.int32 and out.shape == (M, N)
    np.testing.assert_array_equal(out, a.astype(np.int64) @ b.astype(np.int64).T)
    buf = np.empty((M, N), dtype=np.int32)
    assert I8.int8_linear_matmul(a, b, out=buf) is buf
    np.testing.assert_array_equal(buf, out)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("bias_fmt", [None, "float16", "float32", "bfloat16"])
def test_mm_dequant(dtype, bias_fmt):
    rng = np.random.default_rng(5)
    acc = rng.integers(-(2**22), 2**22, (6, 9)).astype(np.int32)
    rs = rng.uniform(0.1, 3, 6).astype(np.float32)
    cs = rng.uniform(0.1, 3, 9).astype(np.float32)
    bias = None if bias_fmt is None else random_bits(rng, (9,), bias_fmt)
    if bias_fmt == "bfloat16":
        # NumPy has no bfloat16 dtype: the bits-level call takes the uint16 bits and the format.
        got = I8.int8_mm_dequant_bits(acc.reshape(-1), rs, cs, 6, 9, dtype, bias, "bfloat16").reshape(6, 9)
    else:
        out = np.empty((6, 9), dtype=np.uint16 if dtype == "bfloat16" else dtype)
        kwargs = {"dtype": "bfloat16"} if dtype == "bfloat16" else {}
        got = I8.int8_mm_dequant(acc, rs, cs, out=out, bias=bias, **kwargs)
        assert got is out
    v = acc.astype(np.float64) * rs[:, None] * cs[None, :] / 127**2
    if bias is not None:
        v = v + widen(bias, bias_fmt)[None, :]
    tol = {"float16": 2**-10, "bfloat16": 2**-7, "float32": 2**-20}[dtype]
    np.testing.assert_allclose(widen(np.asarray(got), dtype), v, rtol=tol, atol=1e-6)


def test_mm_dequant_defaults_to_float16():
    acc = np.arange(6, dtype=np.int32).reshape(2, 3)
    out = I8.int8_mm_dequant(acc, np.ones(2, np.float32), np.ones(3, np.float32))
    assert out.dtype == np.float16 and out.shape == (2, 3)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("threshold", [0.0, 4.0])
@pytest.mark.parametrize("M,N,K", [(1, 8, 64), (5, 13, 37), (40, 24, 300)])
def test_int8_linear_matches_its_pieces_and_the_float_product(fmt, threshold, M, N, K):
    rng = np.random.default_rng(M + N + K)
    a = with_outliers(rng, M, K, fmt)
    w = rng.standard_normal((N, K)).astype(np.float32) / np.sqrt(K)
    cb, scb, _ = ref8.quantize_rows(w)
    bias = random_bits(rng, (N,), fmt, 0.1)
    out = I8.int8_linear_bits(a.reshape(-1), fmt, M, K, cb.reshape(-1), scb, N, bias, fmt, threshold).reshape(M, N)
    # pieces: quantize, exact product, dequantize, outliers
    ca, sca, flags = I8.int8_vectorwise_quant_bits(a.reshape(-1), fmt, M, K, threshold)
    acc = I8.int8_linear_matmul(ca.reshape(M, K), cb)
    pieces = I8.int8_mm_dequant_bits(acc.reshape(-1), sca, scb, M, N, fmt, bias, fmt).reshape(M, N)
    if flags is not None and flags.any():
        pieces = ref8.add_outliers(pieces, widen(a, fmt), cb, scb, np.flatnonzero(flags), fmt)
    np.testing.assert_array_equal(out, pieces)
    # close to the float product: int8 keeps ~1% relative error on these sizes
    exact = widen(a, fmt).astype(np.float64) @ (cb * scb[:, None] / 127).T + widen(bias, fmt)
    err = np.abs(widen(out, fmt) - exact).max() / np.abs(exact).max()
    assert err < 0.05


def test_threshold_keeps_outlier_columns_precise():
    rng = np.random.default_rng(6)
    M, N, K = 8, 32, 256
    a = rng.standard_normal((M, K)).astype(np.float32)
    a[:, [3, 100]] *= 60.0  # huge activations squash every other value's int8 step
    w = rng.standard_normal((N, K)).astype(np.float32) / 16
    cb, scb, _ = I8.int8_vectorwise_quant(w)
    exact = a.astype(np.float64) @ (cb * scb[:, None] / 127).T
    plain = I8.int8_linear(a, cb, scb, threshold=0.0)
    split = I8.int8_linear(a, cb, scb, threshold=6.0)
    err_plain = np.abs(plain - exact).max()
    err_split = np.abs(split - exact).max()
    assert err_split < err_plain / 4


def test_int8_linear_out_and_leading_dims():
    rng = np.random.default_rng(7)
    a = rng.standard_normal((2, 3, 16)).astype(np.float16)
    cb = rng.integers(-127, 128, (5, 16), dtype=np.int8)
    scb = rng.uniform(0.5, 1, 5).astype(np.float32)
    y = I8.int8_linear(a, cb, scb)
    assert y.shape == (2, 3, 5) and y.dtype == np.float16
    out = np.empty((2, 3, 5), np.float16)
    assert I8.int8_linear(a, cb, scb, out=out) is out
    np.testing.assert_array_equal(out, y)
    np.testing.assert_array_equal(I8.int8_linear(a.reshape(6, 16), cb, scb).reshape(2, 3, 5), y)


def test_empty_shapes():
    a = np.zeros((0, 16), np.float16)
    ca, sca, cols = I8.int8_vectorwise_quant(a, threshold=1.0)
    assert ca.shape == (0, 16) and sca.shape == (0,) and cols.size == 0
    cb = np.zeros((4, 16), np.int8)
    assert I8.int8_linear(a, cb, np.ones(4, np.float32)).shape == (0, 4)
    assert I8.int8_linear_matmul(np.zeros((3, 0), np.int8), np.zeros((2, 0), np.int8)).tolist() == [[0, 0]] * 3


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------
F16 = np.ones((2, 4), np.float16)
I8A = np.ones((2, 4), np.int8)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: I8.int8_vectorwise_quant([1.0]), TypeError, "A must be a NumPy or CuPy array"),
        (lambda: I8.int8_vectorwise_quant(np.ones(3, np.float64)), ValueError, "A must be float32, float16"),
        (lambda: I8.int8_vectorwise_quant(np.ones((), np.float16)), ValueError, "0-d"),
        (lambda: I8.int8_vectorwise_quant(F16, threshold=-1.0), ValueError, "threshold must be a finite number >= 0"),
        (lambda: I8.int8_vectorwise_quant(F16, threshold=float("nan")), ValueError, "threshold must be a finite"),
        (lambda: I8.int8_vectorwise_quant(F16, threshold="x"), TypeError, "threshold must be a number"),
        (lambda: I8.int8_vectorwise_dequant(F16, np.ones(2, np.float32)), ValueError, "A must have dtype int8"),
        (lambda: I8.int8_vectorwise_dequant(I8A, np.ones(2, np.float16)), ValueError, "stats must have dtype float32"),
        (lambda: I8.int8_vectorwise_dequant(I8A, np.ones(3, np.float32)), ValueError, "stats must have 2 elements"),
        (lambda: I8.int8_double_quant(F16, col_stats=np.ones(4)), ValueError, "col_stats must be None"),
        (lambda: I8.int8_double_quant(F16, out_row=np.ones(4)), ValueError, "out_row must be None"),
        (lambda: I8.int8_double_quant(I8A), ValueError, "A must be float32, float16"),
        (lambda: I8.int8_linear_matmul(F16, I8A), ValueError, "A must have dtype int8"),
        (lambda: I8.int8_linear_matmul(I8A, I8A.reshape(-1)), ValueError, "B must be 2-D"),
        (lambda: I8.int8_linear_matmul(I8A, np.ones((3, 5), np.int8)), ValueError, "must equal B's second"),
        (lambda: I8.int8_linear_matmul(I8A, I8A, out=np.empty((2, 2), np.int64)), ValueError, "out must have dtype"),
        (lambda: I8.int8_linear_matmul(I8A, I8A, out=np.empty((2, 3), np.int32)), ValueError, "out must have shape"),
        (
            lambda: I8.int8_linear_matmul(np.ones((1, 131072), np.int8), np.ones((1, 131072), np.int8)),
            ValueError,
            "K must be <= 131071",
        ),
        (lambda: I8.int8_mm_dequant(I8A, np.ones(2, np.float32), np.ones(4, np.float32)), ValueError, "int32"),
        (
            lambda: I8.int8_mm_dequant(np.ones((2, 4), np.int32), np.ones(3, np.float32), np.ones(4, np.float32)),
            ValueError,
            "row_stats must have 2 elements",
        ),
        (
            lambda: I8.int8_mm_dequant(np.ones((2, 4), np.int32), np.ones(2, np.float32), np.ones(5, np.float32)),
            ValueError,
            "col_stats must have 4 elements",
        ),
        (
            lambda: I8.int8_mm_dequant(
                np.ones((2, 4), np.int32), np.ones(2, np.float32), np.ones(4, np.float32), dtype="int8"
            ),
            ValueError,
            "dtype must be one of",
        ),
        (
            lambda: I8.int8_mm_dequant(
                np.ones((2, 4), np.int32), np.ones(2, np.float32), np.ones(4, np.float32), out=np.empty((2, 4))
            ),
            ValueError,
            "out must be float32, float16",
        ),
        (
            lambda: I8.int8_mm_dequant(
                np.ones((2, 4), np.int32), np.ones(2, np.float32), np.ones(4, np.float32), bias=np.ones(3, np.float16)
            ),
            ValueError,
            "bias must have 4 elements",
        ),
        (lambda: I8.int8_linear(F16, F16, np.ones(2, np.float32)), ValueError, "CB must have dtype int8"),
        (lambda: I8.int8_linear(F16, np.ones((2, 5), np.int8), np.ones(2, np.float32)), ValueError, "CB must be 2-D"),
        (lambda: I8.int8_linear(F16, I8A, np.ones(3, np.float32)), ValueError, "SCB must have 2 elements"),
        (lambda: I8.int8_linear(F16, I8A, np.ones(2, np.float16)), ValueError, "SCB must have dtype float32"),
        (lambda: I8.int8_linear(F16, I8A, np.ones(2, np.float32), bias=np.ones(3, np.float16)), ValueError, "bias"),
        (lambda: I8.int8_linear(F16, I8A, np.ones(2, np.float32), threshold=-2), ValueError, "threshold"),
        (
            lambda: I8.int8_linear(F16, I8A, np.ones(2, np.float32), out=np.empty((2, 2), np.float32)),
            ValueError,
            "out must have A's dtype",
        ),
        (lambda: I8.set_int8_gemm_backend("cutlass"), ValueError, "gemm backend must be one of"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_gemm_backend_setting_round_trips():
    assert I8.get_int8_gemm_backend() == "auto"
    I8.set_int8_gemm_backend("cublas")
    try:
        assert I8.get_int8_gemm_backend() == "cublas"
    finally:
        I8.set_int8_gemm_backend("auto")


# ---------------------------------------------------------------------------------------
# GPU: CuPy kernels against the NumPy reference, bit for bit
# ---------------------------------------------------------------------------------------
@pytest.fixture(params=["mma", "cublas"])
def backend(request):
    I8.set_int8_gemm_backend(request.param)
    yield request.param
    I8.set_int8_gemm_backend("auto")


def _to_gpu(cp, a, offset: bool = False):
    """A CuPy copy of ``a``; with ``offset`` it starts one element into a buffer (misaligned)."""
    if not offset:
        return cp.asarray(a)
    flat = cp.empty(a.size + 1, dtype=a.dtype)
    flat[1:] = cp.asarray(a.reshape(-1))
    return flat[1:].reshape(a.shape)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("threshold", [0.0, 4.0])
@pytest.mark.parametrize("shape", [(1, 1), (1, 4096), (3, 7), (9, 1000), (130, 264), (257, 8192)], ids=str)
@pytest.mark.parametrize("offset", [False, True], ids=["aligned", "offset"])
def test_gpu_vectorwise_quant(cp, fmt, threshold, shape, offset):
    rng = np.random.default_rng(sum(shape))
    rows, K = shape
    bits = with_outliers(rng, rows, K, fmt)
    ca, sca, flags = I8.int8_vectorwise_quant_bits(bits.reshape(-1), fmt, rows, K, threshold)
    g = _to_gpu(cp, bits.reshape(-1), offset)
    gca, gsca, gflags = I8.int8_vectorwise_quant_bits(g, fmt, rows, K, threshold)
    np.testing.assert_array_equal(cp.asnumpy(gca), ca)
    np.testing.assert_array_equal(cp.asnumpy(gsca), sca)
    if threshold:
        np.testing.assert_array_equal(cp.asnumpy(gflags), flags)
        np.testing.assert_array_equal(cp.asnumpy(I8.outlier_columns(gflags)), np.flatnonzero(flags))
    else:
        assert gflags is None


@pytest.mark.gpu
def test_gpu_fixtures(cp):
    d = load_file(FIXTURES / "int8_vectorwise_fp16.safetensors")
    for t in (0, 6):
        ca, sca, cols = I8.int8_vectorwise_quant(cp.asarray(d["A"]), threshold=float(t))
        np.testing.assert_array_equal(cp.asnumpy(ca), d[f"CB_thr{t}"])
        np.testing.assert_array_equal(cp.asnumpy(sca), d[f"SCB_thr{t}"])
        if t:
            np.testing.assert_array_equal(cp.asnumpy(cols), d["outlier_cols_thr6"])
        d2 = load_file(FIXTURES / f"linear8bitlt_thr{t}.safetensors")
        y = I8.int8_linear(cp.asarray(d2["x"]), cp.asarray(d2["module.weight"]), cp.asarray(d2["module.SCB"]),
                           bias=cp.asarray(d2["module.bias"]), threshold=float(t))  # fmt: skip
        np.testing.assert_array_equal(cp.asnumpy(y), d2["y"])


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("threshold", [0.0, 4.0])
@pytest.mark.parametrize("shape", [(1, 5), (40, 33), (300, 1030)], ids=str)
def test_gpu_double_quant_and_dequant(cp, fmt, threshold, shape):
    rng = np.random.default_rng(sum(shape) + 1)
    rows, K = shape
    bits = with_outliers(rng, rows, K, fmt).reshape(-1)
    want = I8.int8_double_quant_bits(bits, fmt, rows, K, threshold)
    got = I8.int8_double_quant_bits(cp.asarray(bits), fmt, rows, K, threshold)
    for w, g in zip(want, got, strict=True):
        if w is None:
            assert g is None
        else:
            np.testing.assert_array_equal(cp.asnumpy(g), w)
    deq = I8.int8_vectorwise_dequant_bits(want[0], want[2], rows, K)
    gdeq = I8.int8_vectorwise_dequant_bits(got[0], got[2], rows, K)
    np.testing.assert_array_equal(cp.asnumpy(gdeq), deq)


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(1, 1, 16), (1, 300, 4096), (5, 33, 40), (17, 64, 64), (130, 136, 1024),
                                   (257, 129, 100), (512, 512, 4096)], ids=str)  # fmt: skip
def test_gpu_int8_linear_matmul(cp, backend, M, N, K):
    rng = np.random.default_rng(M * N + K)
    a = rng.integers(-128, 128, (M, K), dtype=np.int8)
    b = rng.integers(-128, 128, (N, K), dtype=np.int8)
    want = I8.int8_linear_matmul(a, b)
    got = I8.int8_linear_matmul(cp.asarray(a), cp.asarray(b))
    np.testing.assert_array_equal(cp.asnumpy(got), want)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bias_fmt", [None, "float16", "bfloat16", "float32"])
def test_gpu_mm_dequant(cp, fmt, bias_fmt):
    rng = np.random.default_rng(8)
    M, N = 37, 301
    acc = rng.integers(-(2**24), 2**24, M * N).astype(np.int32)
    rs = rng.uniform(0.01, 5, M).astype(np.float32)
    cs = rng.uniform(0.01, 5, N).astype(np.float32)
    bias = None if bias_fmt is None else random_bits(rng, (N,), bias_fmt)
    want = I8.int8_mm_dequant_bits(acc, rs, cs, M, N, fmt, bias, bias_fmt)
    gbias = None if bias is None else cp.asarray(bias)
    got = I8.int8_mm_dequant_bits(cp.asarray(acc), cp.asarray(rs), cp.asarray(cs), M, N, fmt, gbias, bias_fmt)
    np.testing.assert_array_equal(cp.asnumpy(got), want)


LINEAR_SHAPES = [
    (1, 1, 16),  # tiny gemv
    (1, 257, 4096),  # gemv, M = 1
    (3, 64, 1040),  # gemv, K past one summary word (1024 columns)
    (8, 96, 8192),  # gemv MT = 8 beyond 48 KB of shared memory (opt-in; "mma" / "cublas" backends)
    (2, 33, 40),  # K % 16 != 0: the padded GEMM path
    (9, 130, 512),  # smallest GEMM M
    (64, 200, 768),
    (300, 136, 1024),
]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("threshold", [0.0, 3.0])
@pytest.mark.parametrize("bias_fmt", [None, "same", "float32", "other"])
@pytest.mark.parametrize("M,N,K", LINEAR_SHAPES, ids=str)
def test_gpu_int8_linear(cp, backend, fmt, threshold, bias_fmt, M, N, K):
    rng = np.random.default_rng(M + N + K)
    a = with_outliers(rng, M, K, fmt).reshape(-1)
    w = rng.standard_normal((N, K)).astype(np.float32) / np.sqrt(K)
    cb, scb, _ = ref8.quantize_rows(w)
    bfmt = {None: None, "same": fmt, "float32": "float32", "other": "float16" if fmt != "float16" else "bfloat16"}
    bfmt = bfmt[bias_fmt]
    bias = None if bfmt is None else random_bits(rng, (N,), bfmt, 0.1)
    want = I8.int8_linear_bits(a, fmt, M, K, cb.reshape(-1), scb, N, bias, bfmt, threshold)
    got = I8.int8_linear_bits(cp.asarray(a), fmt, M, K, cp.asarray(cb.reshape(-1)), cp.asarray(scb), N,
                              None if bias is None else cp.asarray(bias), bfmt, threshold)  # fmt: skip
    np.testing.assert_array_equal(cp.asnumpy(got), want)


def _linear_equals_spec(cp, a, fmt: str, M: int, K: int, cb, scb, N: int, threshold: float) -> None:
    """int8_linear_bits on the GPU (A, CB and SCB copied there as they are) equals the NumPy
    spec bit for bit, no bias."""
    want = I8.int8_linear_bits(a, fmt, M, K, cb.reshape(-1), scb, N, None, None, threshold)
    got = I8.int8_linear_bits(cp.asarray(a), fmt, M, K, cp.asarray(cb.reshape(-1)), cp.asarray(scb), N, None, None,
                              threshold)  # fmt: skip
    np.testing.assert_array_equal(cp.asnumpy(got), want)


@pytest.fixture
def mmv_path(monkeypatch):
    """The "auto" backend without cuBLAS below 65 rows: the medium-M kernel serves 9..64 rows (it
    does where cuBLAS is not usable: N % 8 != 0, or no capturable cuBLAS)."""
    from cupyquant import _gpu_int8

    monkeypatch.setattr(_gpu_int8, "CUBLAS_MIN_M", _gpu_int8.MMV_MAX_M + 1)


@pytest.fixture(params=["gather", "flags"])
def outlier_listing(request, monkeypatch):
    """The cuBLAS path's two forms with outliers: "gather" (each row's bitmap, the columns
    listed by int8_outlier_gather on a forked branch beside cuBLAS, their int8 products taken
    back out) where its bitmap reads allow it, and "flags" (byte flags; int8_outlier_weights
    zeroes the columns in CA before cuBLAS) everywhere else."""
    from cupyquant import _gpu_int8

    if request.param == "flags":
        monkeypatch.setattr(_gpu_int8, "_GATHER_MAX_READS", 0)
    else:
        monkeypatch.setattr(_gpu_int8, "_GATHER_MAX_M", 1 << 30)
    gathered = []
    real = _gpu_int8.outlier_gather
    monkeypatch.setattr(_gpu_int8, "outlier_gather", lambda *args: gathered.append(1) or real(*args))
    yield request.param
    assert bool(gathered) == (request.param == "gather"), "the form the test names did not run"


MMV_SHAPES = [
    (5, 72, 1024),  # MT = 16 with 11 rows of padding (the gemv's rows under "auto" stop at 4)
    (8, 40, 2064),
    (9, 130, 512),  # MT = 16; N not a multiple of the CTA's 32 weight rows
    (16, 8, 1040),  # fewer weight rows than one 16-row group; K % 64 == 16, K % 32 == 16
    (32, 96, 2064),  # MT = 32
    (33, 257, 4096),  # MT = 64 with 31 rows of padding
    (64, 200, 768),
]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("threshold", [0.0, 3.0])
@pytest.mark.parametrize("bias_fmt", [None, "same", "float32"])
@pytest.mark.parametrize("M,N,K", MMV_SHAPES, ids=str)
def test_gpu_int8_linear_medium_m(cp, mmv_path, fmt, threshold, bias_fmt, M, N, K):
    """The "auto" backend's medium-M path (int8_row_quant_wide + int8_linear_mmv)."""
    from cupyquant import _gpu_int8

    assert _gpu_int8._mmv_tile(M, K) is not None
    rng = np.random.default_rng(M * 7 + N + K)
    a = with_outliers(rng, M, K, fmt).reshape(-1)
    w = rng.standard_normal((N, K)).astype(np.float32) / np.sqrt(K)
    cb, scb, _ = ref8.quantize_rows(w)
    bfmt = {None: None, "same": fmt, "float32": "float32"}[bias_fmt]
    bias = None if bfmt is None else random_bits(rng, (N,), bfmt, 0.1)
    want = I8.int8_linear_bits(a, fmt, M, K, cb.reshape(-1), scb, N, bias, bfmt, threshold)
    got = I8.int8_linear_bits(cp.asarray(a), fmt, M, K, cp.asarray(cb.reshape(-1)), cp.asarray(scb), N,
                              None if bias is None else cp.asarray(bias), bfmt, threshold)  # fmt: skip
    np.testing.assert_array_equal(cp.asnumpy(got), want)


@pytest.mark.gpu
@pytest.mark.parametrize("cols", [0, 9, 40])
def test_gpu_int8_linear_medium_m_outlier_counts_and_misaligned_a(cp, cols):
    """Outlier columns: none planted, more than one epilogue batch, every column (a row of
    outliers only); A starting one element into its buffer (the row quantization's scalar loads)."""
    rng = np.random.default_rng(cols)
    M, N, K = 24, 70, 1024
    a = with_outliers(rng, M, K, "float16", cols=cols)
    if cols == 40:
        a[3, :] = ref.from_float32(np.full(K, 20.0, np.float32), "float16")  # a row of outliers only
    cb, scb, _ = ref8.quantize_rows(rng.standard_normal((N, K)).astype(np.float32))
    for threshold in (0.0, 3.0):
        want = I8.int8_linear_bits(a.reshape(-1), "float16", M, K, cb.reshape(-1), scb, N, None, None, threshold)
        got = I8.int8_linear_bits(_to_gpu(cp, a.reshape(-1), True), "float16", M, K, cp.asarray(cb.reshape(-1)),
                                  cp.asarray(scb), N, None, None, threshold)  # fmt: skip
        np.testing.assert_array_equal(cp.asnumpy(got), want)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M,K", [(1, 4096), (3, 1040), (4, 2064)], ids=str)
def test_gpu_int8_linear_gemv_misaligned_a(cp, fmt, M, K):
    """The gemv reads A in 16-byte chunks: A starting one element into its buffer is copied
    first, with the same results; K % 32 == 16 (the last bitmap word half full)."""
    from cupyquant import _gpu_int8

    assert _gpu_int8._gemv_tile(M, K) is not None
    rng = np.random.default_rng(M + K)
    N = 72
    a = with_outliers(rng, M, K, fmt).reshape(-1)
    cb, scb, _ = ref8.quantize_rows(rng.standard_normal((N, K)).astype(np.float32))
    for threshold in (0.0, 3.0):
        want = I8.int8_linear_bits(a, fmt, M, K, cb.reshape(-1), scb, N, None, None, threshold)
        got = I8.int8_linear_bits(_to_gpu(cp, a, True), fmt, M, K, cp.asarray(cb.reshape(-1)), cp.asarray(scb), N,
                                  None, None, threshold)  # fmt: skip
        np.testing.assert_array_equal(cp.asnumpy(got), want)


@pytest.mark.gpu
@pytest.mark.parametrize("threshold", [0.0, 3.0])
def test_gpu_int8_linear_gemv_more_rows_than_warps(cp, threshold):
    """The gemv at MT = 4 caps its grid at 2 CTAs an SM: with more weight rows than the
    grid's warps, warps take several rows (the next row's first batch prefetched)."""
    from cupyquant import _gpu_int8

    sms = _gpu_int8._limits()[0]
    M, K = 4, 512
    N = 8 * _gpu_int8._GEMV_CTAS_PER_SM[4] * sms * 2 + 40  # over two rows a warp
    rng = np.random.default_rng(N)
    a = with_outliers(rng, M, K, "bfloat16").reshape(-1)
    cb, scb, _ = ref8.quantize_rows(rng.standard_normal((N, K)).astype(np.float32))
    _linear_equals_spec(cp, a, "bfloat16", M, K, cb, scb, N, threshold)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4])
def test_gpu_medium_m_kernel_takes_the_gemv_rows_it_cannot_fit(cp, monkeypatch, M):
    """Under "auto", rows the gemv would take go to the medium-M kernel where the gemv does
    not apply (its shared memory, here forced), not to the 128-row fused GEMM."""
    from cupyquant import _gpu_int8

    monkeypatch.setattr(_gpu_int8, "GEMV_AUTO_MAX_M", 0)
    calls = []
    real = _gpu_int8._linear_mmv
    monkeypatch.setattr(_gpu_int8, "_linear_mmv", lambda *args: calls.append(M) or real(*args))
    rng = np.random.default_rng(M)
    N, K = 72, 1040
    a = with_outliers(rng, M, K, "float16").reshape(-1)
    cb, scb, _ = ref8.quantize_rows(rng.standard_normal((N, K)).astype(np.float32))
    for threshold in (0.0, 3.0):
        _linear_equals_spec(cp, a, "float16", M, K, cb, scb, N, threshold)
    assert calls == [M, M]


@pytest.mark.gpu
def test_gpu_cublas_path_forked_branches_from_threads_and_streams(cp):
    """Two threads, each on its own stream, run the cuBLAS path with outliers at once, many
    times: each thread's forked branch (side stream and events) is its own, so every result
    is its input's."""
    import threading

    rng = np.random.default_rng(11)
    M, N, K = 32, 512, 1024
    cb, scb, _ = ref8.quantize_rows(rng.standard_normal((N, K)).astype(np.float32))
    gcb, gscb = cp.asarray(cb.reshape(-1)), cp.asarray(scb)
    inputs = [_planted(rng, M, K, "float16", cols).reshape(-1) for cols in (3, 9)]
    wants = [I8.int8_linear_bits(a, "float16", M, K, cb.reshape(-1), scb, N, None, None, 6.0) for a in inputs]
    I8.int8_linear_bits(cp.asarray(inputs[0]), "float16", M, K, gcb, gscb, N, None, None, 6.0)  # compile first
    errors = []

    def work(i: int) -> None:
        try:
            with cp.cuda.Stream(non_blocking=True) as stream:
                ga = cp.asarray(inputs[i])
                for _ in range(20):
                    got = I8.int8_linear_bits(ga, "float16", M, K, gcb, gscb, N, None, None, 6.0)
                    stream.synchronize()
                    np.testing.assert_array_equal(cp.asnumpy(got), wants[i])
        except AssertionError as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


@pytest.mark.gpu
@pytest.mark.parametrize("cols", [12, 40])
def test_gpu_int8_linear_many_outlier_columns(cp, backend, cols):
    """More outlier columns than the GEMM epilogue batches (8) and than int8_outlier_weights
    precomputes for the cuBLAS path's dequantization (32), on both GEMMs."""
    rng = np.random.default_rng(12)
    M, N, K = 40, 136, 1024
    a = with_outliers(rng, M, K, "bfloat16", cols=cols).reshape(-1)
    cb, scb, _ = ref8.quantize_rows(rng.standard_normal((N, K)).astype(np.float32))
    _linear_equals_spec(cp, a, "bfloat16", M, K, cb, scb, N, 3.0)


@pytest.mark.gpu
def test_gpu_medium_m_path_is_auto_only(cp):
    from cupyquant import _gpu_int8

    assert _gpu_int8._gemv_tile(_gpu_int8.GEMV_AUTO_MAX_M, 4096) is not None  # the gemv's first
    assert _gpu_int8._gemv_tile(_gpu_int8.GEMV_AUTO_MAX_M + 1, 4096) is None
    assert _gpu_int8._mmv_tile(1, 4096) == 16  # where the gemv's shared memory does not fit
    assert _gpu_int8._mmv_tile(_gpu_int8.GEMV_AUTO_MAX_M + 1, 4096) == 16
    assert _gpu_int8._mmv_tile(64, 4096) == 64
    assert _gpu_int8._mmv_tile(65, 4096) is None
    assert _gpu_int8._mmv_tile(16, 40) is None  # K % 16 != 0: the padded GEMM
    I8.set_int8_gemm_backend("mma")
    try:
        assert _gpu_int8._mmv_tile(16, 4096) is None
    finally:
        I8.set_int8_gemm_backend("auto")


# (M, K, N, seed): the small-M path (one kernel, no wait for the device) and the medium-M
# path (row quantization, then the weight streamed once).
CAPTURE_CASES = [(1, 4096, 512, 9), (16, 2048, 256, 26), (48, 2048, 256, 58)]


@pytest.mark.gpu
@pytest.mark.parametrize("threshold", [0.0, 3.0])
@pytest.mark.parametrize(("M", "K", "N", "seed"), CAPTURE_CASES, ids=[f"M{c[0]}" for c in CAPTURE_CASES])
def test_gpu_int8_linear_captures_in_a_cuda_graph(cp, mmv_path, threshold, M, K, N, seed):
    rng = np.random.default_rng(seed)
    a = cp.asarray(with_outliers(rng, M, K, "float16"))
    cb, scb, _ = ref8.quantize_rows(rng.standard_normal((N, K)).astype(np.float32))
    cb, scb = cp.asarray(cb), cp.asarray(scb)
    out = cp.empty((M, N), cp.float16)
    I8.int8_linear(a, cb, scb, threshold=threshold, out=out)  # compile outside the capture
    want = cp.asnumpy(out).copy()
    out[...] = 0
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        I8.int8_linear(a, cb, scb, threshold=threshold, out=out)
        graph = stream.end_capture()
        graph.launch()
    stream.synchronize()
    np.testing.assert_array_equal(cp.asnumpy(out), want)


@pytest.mark.gpu
@pytest.mark.parametrize("threshold", [0.0, 3.0])
def test_gpu_int8_linear_cublas_captures_in_a_cuda_graph(cp, monkeypatch, threshold):
    """The "auto" backend keeps cuBLAS (ctypes cublasGemmEx on the capturing stream) in a capture."""
    from cupyquant import _cublas, _gpu_int8

    if not _cublas.capturable():
        pytest.skip("libcublas not found in the process: CuPy's binding cannot be captured")
    calls = []
    real = _gpu_int8._cublas_int32
    monkeypatch.setattr(_gpu_int8, "_cublas_int32", lambda *args: calls.append(args[2:5]) or real(*args))
    rng = np.random.default_rng(22)
    M, N, K = 512, 256, 512
    a = with_outliers(rng, M, K, "float16")
    cb, scb, _ = ref8.quantize_rows(rng.standard_normal((N, K)).astype(np.float32))
    want = I8.int8_linear_bits(a.reshape(-1), "float16", M, K, cb.reshape(-1), scb, N, None, None, threshold)
    ga, gcb, gscb = cp.asarray(a), cp.asarray(cb), cp.asarray(scb)
    out = cp.empty((M, N), cp.float16)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        I8.int8_linear(ga, gcb, gscb, threshold=threshold, out=out)  # compile, cuBLAS handle
        stream.synchronize()
        out[...] = 0
        calls.clear()
        stream.begin_capture()
        I8.int8_linear(ga, gcb, gscb, threshold=threshold, out=out)
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
    assert calls == [(M, N, K)]
    np.testing.assert_array_equal(cp.asnumpy(out).view(np.uint16), want.reshape(M, N).view(np.uint16))


def _planted(rng: np.random.Generator, M: int, K: int, fmt: str, cols: int) -> np.ndarray:
    """Normal activations with exactly ``cols`` outlier columns at threshold 6 (x 20, so
    every planted column holds a value past 6; N(0, 1) values never reach it)."""
    x = np.clip(rng.standard_normal((M, K)), -5, 5).astype(np.float32)
    picked = rng.choice(K, size=cols, replace=False)
    x[:, picked] *= 20.0
    x[0, picked] = 7.0  # at least one value past the threshold in each planted column
    return ref.from_float32(x, fmt) if fmt != "float32" else x


@pytest.mark.gpu
@pytest.mark.parametrize("cols", [1, 6, 16, 17, 32, 33, 48])
@pytest.mark.parametrize(
    "M,backend",
    [(1, "auto"), (3, "auto"), (8, "auto"), (9, "auto"), (24, "auto"), (64, "auto"), (24, "mmv"), (64, "mmv"),
     (100, "mma"), (512, "auto"), (512, "mma"), (520, "cublas")],
    ids=str,
)  # fmt: skip
def test_gpu_int8_linear_outlier_column_counts(cp, monkeypatch, cols, M, backend):
    """Exactly ``cols`` outlier columns on every path ("auto": gemv, medium-M, cuBLAS; "mmv":
    "auto" with the medium-M kernel up to 64 rows; the fused GEMM): around the lists the
    kernels keep (the gemv's 32 columns a CTA, int8_linear_mmv's 16 a round,
    int8_outlier_weights' 32 cached), with a bias and a K past one 1024-column word group, A
    starting one element into its buffer."""
    from cupyquant import _gpu_int8

    if backend == "mmv":
        monkeypatch.setattr(_gpu_int8, "CUBLAS_MIN_M", _gpu_int8.MMV_MAX_M + 1)
        backend = "auto"
    rng = np.random.default_rng(cols * 1000 + M)
    N, K = 136, 2064
    a = _planted(rng, M, K, "float16", cols).reshape(-1)
    cb, scb, _ = ref8.quantize_rows(rng.standard_normal((N, K)).astype(np.float32))
    bias = random_bits(rng, (N,), "float16", 0.1)
    want = I8.int8_linear_bits(a, "float16", M, K, cb.reshape(-1), scb, N, bias, "float16", 6.0)
    assert np.flatnonzero(ref8.quantize_rows(widen(a, "float16").reshape(M, K), 6.0)[2]).size == cols
    I8.set_int8_gemm_backend(backend)
    try:
        got = I8.int8_linear_bits(_to_gpu(cp, a, True), "float16", M, K, cp.asarray(cb.reshape(-1)), cp.asarray(scb),
                                  N, cp.asarray(bias), "float16", 6.0)  # fmt: skip
        if backend == "auto" and M <= _gpu_int8.GEMV_AUTO_MAX_M:
            assert _gpu_int8._gemv_tile(M, K) is not None
    finally:
        I8.set_int8_gemm_backend("auto")
    np.testing.assert_array_equal(cp.asnumpy(got), want)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M,K", [(1, 16), (5, 1040), (40, 2048), (3, 4112)], ids=str)
def test_gpu_row_quant_wide_row_bitmaps(cp, fmt, M, K):
    """int8_row_quant_wide's per-row outlier bitmaps (every word written, K % 32 == 16
    included, rows padded to a multiple of 4 words with zeros): bit i of word w of row m is
    |A[m, 32w + i]| >= threshold; the row absmax and the codes of the other columns are the
    reference's, outlier codes left as computed."""
    from cupyquant import _gpu_int8

    rng = np.random.default_rng(M + K)
    bits = with_outliers(rng, M, K, fmt, cols=5)
    x = widen(bits, fmt).reshape(M, K)
    ca = cp.empty(M * K, dtype=cp.int8)
    sca = cp.empty(M, dtype=cp.float32)
    g = cp.asarray(bits.reshape(-1))
    stride = _gpu_int8._rowbits_stride(K)
    cp.get_default_memory_pool().malloc(M * stride * 4).memset(0xFF, M * stride * 4)  # freed dirty, reused below
    rowbits = _gpu_int8._row_quant_wide(g, fmt, M, K, 3.0, ca, sca, _gpu_int8._ROW_BITS)
    assert rowbits.size == M * stride and stride % 4 == 0
    words = -(-K // 32)
    big = np.zeros((M, words * 32), dtype=bool)
    big[:, :K] = np.abs(x) >= 3.0
    want_bits = np.packbits(big.reshape(M, words, 4, 8)[..., ::-1], axis=-1).reshape(M, words, 4)
    want_bits = want_bits.astype(np.uint32) << (np.arange(4, dtype=np.uint32) * 8)
    got = cp.asnumpy(rowbits).reshape(M, stride)
    np.testing.assert_array_equal(got[:, :words], want_bits.sum(axis=-1, dtype=np.uint32))
    np.testing.assert_array_equal(got[:, words:], 0)
    want_ca, want_sca, cols = ref8.quantize_rows(x, 3.0)
    np.testing.assert_array_equal(cp.asnumpy(sca), want_sca)
    keep = ~cols
    np.testing.assert_array_equal(cp.asnumpy(ca).reshape(M, K)[:, keep], want_ca[:, keep])


@pytest.mark.gpu
@pytest.mark.parametrize("cols", [0, 5, 32, 40])
def test_gpu_outlier_weights_lists_columns_in_order(cp, cols):
    """int8_outlier_weights (cuBLAS path): every CTA lists the flagged columns itself; CTA 0
    publishes idx / count; the first 32 columns' 16-bit weights (bfloat16 bits, 8 columns a
    16-byte group: [((j // 8) * N + n) * 8 + j % 8], zeros past the listed columns) and
    activations ([j * Mp + m], Mp = M rounded up to 8, the padding rows zero); every flagged
    column of CA zeroed (cached columns by the whole grid, the rest serially), the rest
    untouched."""
    from cupyquant import _gpu_int8

    rng = np.random.default_rng(cols)
    M, N, K = 37, 600, 4096
    flags = np.zeros(K, np.uint8)
    picked = np.sort(rng.choice(K, size=cols, replace=False))
    flags[picked] = 1
    cb, scb, _ = ref8.quantize_rows(rng.standard_normal((N, K)).astype(np.float32))
    a = random_bits(rng, (M, K), "bfloat16")
    ca = rng.integers(-128, 128, (M, K), dtype=np.int8)
    gca = cp.asarray(ca.reshape(-1))
    idx, count, w16, aout = _gpu_int8.outlier_weights(
        cp.asarray(cb.reshape(-1)), cp.asarray(scb), cp.asarray(flags), cp.asarray(a.reshape(-1)), gca, M, N, K,
        "bfloat16",
    )  # fmt: skip
    assert int(count.get()[0]) == cols
    np.testing.assert_array_equal(cp.asnumpy(idx)[:cols], picked)
    cached = picked[:32]
    want_w = ref8.outlier_weights(cb[:, cached], scb, "bfloat16")  # (N, C)
    got_w = cp.asnumpy(w16).reshape(4, N, 8).transpose(0, 2, 1).reshape(32, N)  # [j, n]
    np.testing.assert_array_equal(widen(got_w[: cached.size], "bfloat16"), want_w.T)
    if cached.size % 8:  # the rest of the last group
        np.testing.assert_array_equal(got_w[cached.size : -(-cached.size // 8) * 8], 0)
    mp = -(-M // 8) * 8
    got_a = cp.asnumpy(aout).reshape(32, mp)[: cached.size]
    np.testing.assert_array_equal(got_a[:, :M], a[:, cached].T)
    np.testing.assert_array_equal(got_a[:, M:], 0)
    ca[:, picked] = 0
    np.testing.assert_array_equal(cp.asnumpy(gca).reshape(M, K), ca)


def _planted_linear_matches(
    cp, rng, M: int, N: int, K: int, fmt: str, cols: int, bias: bool, backend: str | None = "cublas"
) -> None:
    """int8_linear_bits at threshold 6 on A with ``cols`` planted outlier columns, a random
    weight and optionally a bias in ``fmt``: the GPU (under ``backend``, None: the current
    one) equals the NumPy spec bit for bit."""
    a = _planted(rng, M, K, fmt, cols).reshape(-1)
    cb, scb, _ = ref8.quantize_rows(rng.standard_normal((N, K)).astype(np.float32))
    b = random_bits(rng, (N,), fmt, 0.1) if bias else None
    bfmt = fmt if bias else None
    want = I8.int8_linear_bits(a, fmt, M, K, cb.reshape(-1), scb, N, b, bfmt, 6.0)
    if backend is not None:
        I8.set_int8_gemm_backend(backend)
    try:
        got = I8.int8_linear_bits(cp.asarray(a), fmt, M, K, cp.asarray(cb.reshape(-1)), cp.asarray(scb), N,
                                  None if b is None else cp.asarray(b), bfmt, 6.0)  # fmt: skip
    finally:
        I8.set_int8_gemm_backend("auto")
    np.testing.assert_array_equal(cp.asnumpy(got), want)


@pytest.mark.gpu
@pytest.mark.parametrize("cols", [6, 40])
@pytest.mark.parametrize("M", [517, 1001])
def test_gpu_cublas_path_rows_not_a_multiple_of_8(cp, outlier_listing, cols, M):
    """The cuBLAS path with outliers at M % 8 != 0: int8_outlier_weights on a grid wider than
    N / 256 (a thread a (column, row) pair zeroing CA), int8_outlier_gather's (column, row)
    pairs grid-strided, int8_mm_dequant_outliers' last slab reading the zero padding of Aout
    (and CAout) with vector loads; 40 columns: past the 32 cached ones."""
    _planted_linear_matches(cp, np.random.default_rng(cols + M), M, 136, 1024, "float16", cols, bias=False)


@pytest.mark.gpu
@pytest.mark.parametrize("K", [2064, 6160, 12304, 20496, 33296])
@pytest.mark.parametrize("M", [12, 16, 24, 64])
def test_gpu_mmv_outlier_search_every_split(cp, mmv_path, M, K):
    """The medium-M path's outlier search: at MT = 16 (M = 12, 16) over each row's bitmap in
    128-column groups, every number of threads a group (8, 4, 2, 1; K = 33296: more groups
    than threads); at MT = 32 / 64 (M = 24, 64) over the byte flags' 32-column words, one to
    five a thread. Outlier columns at group and word edges and in the last group."""
    rng = np.random.default_rng(M * 7 + K)
    N = 40
    x = np.clip(rng.standard_normal((M, K)), -5, 5).astype(np.float32)
    picked = np.array([0, 127, 128, K // 2, K - 129, K - 1])
    x[:, picked] *= 20.0
    x[0, picked] = 7.0
    a = ref.from_float32(x, "float16").reshape(-1)
    cb, scb, _ = ref8.quantize_rows(rng.standard_normal((N, K)).astype(np.float32))
    _linear_equals_spec(cp, a, "float16", M, K, cb, scb, N, 6.0)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cols", [3, 4, 5, 8, 9, 31])
def test_gpu_cublas_path_outlier_batches(cp, outlier_listing, fmt, cols):
    """int8_mm_dequant_outliers' cached outlier columns in 16-byte batches (8 columns of a 16-bit
    format, 4 of float32; weight codes 16 a batch), the first loaded with the int32 products:
    column counts around the batch edges, every activation format, a bias."""
    _planted_linear_matches(cp, np.random.default_rng(cols), 520, 72, 1024, fmt, cols, bias=True)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("listing,columns", [("flags", 1), ("flags", 2), ("flags", 4), ("gather", 1), ("gather", 2)])
@pytest.mark.parametrize("N,cols", [(1032, 5), (1032, 40), (1544, 9)], ids=str)
def test_gpu_cublas_path_dequant_columns_a_thread(cp, monkeypatch, fmt, listing, columns, N, cols):
    """int8_mm_dequant_outliers with 1, 2 and 4 columns a thread (1 and 2 where it takes the
    int8 products back out), more than one CTA of columns and a partial last one; 40 outlier
    columns pass the 32 cached ones; a bias; M % 8 != 0."""
    from cupyquant import _gpu_int8

    if listing == "flags":
        monkeypatch.setattr(_gpu_int8, "_GATHER_MAX_READS", 0)
        monkeypatch.setattr(_gpu_int8, "_DEQUANT_COLUMNS", columns)
    else:
        monkeypatch.setattr(_gpu_int8, "_GATHER_MAX_M", 1 << 30)
        monkeypatch.setattr(_gpu_int8, "_gather_columns", lambda M, N: columns)
    _planted_linear_matches(cp, np.random.default_rng(N + cols), 523, N, 1024, fmt, cols, bias=True)


def test_dequant_columns_fall_back_where_n_or_alignment_forbid():
    """int8_mm_dequant_outliers' columns a thread: the wanted count only where N and the
    addresses of the products and the output allow its vector accesses."""
    from types import SimpleNamespace

    from cupyquant._gpu_int8 import _dequant_columns

    def buf(ptr: int, itemsize: int) -> SimpleNamespace:
        return SimpleNamespace(data=SimpleNamespace(ptr=ptr), itemsize=itemsize)

    acc, out = buf(4096, 4), buf(4096, 2)
    assert _dequant_columns(acc, out, 1024, 4) == 4
    assert _dequant_columns(acc, out, 1030, 4) == 2
    assert _dequant_columns(acc, out, 1029, 4) == 1
    assert _dequant_columns(buf(4104, 4), out, 1024, 4) == 2  # products 8-byte aligned only
    assert _dequant_columns(acc, buf(4098, 2), 1024, 4) == 1  # output 2-byte aligned only
    assert _dequant_columns(acc, buf(4100, 4), 1024, 4) == 1  # float32 output 4-byte aligned only
    assert _dequant_columns(acc, buf(4104, 4), 1024, 4) == 2
    assert _dequant_columns(acc, out, 1024, 1) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("threads", [256, 1024])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cols", [0, 7, 17, 33])
@pytest.mark.parametrize("M,K", [(17, 4112), (40, 1040), (64, 2048)], ids=str)
def test_gpu_cublas_path_row_bitmaps(cp, monkeypatch, threads, fmt, cols, M, K):
    """The cuBLAS path with outliers at few rows: each row's bitmap (no memset), cuBLAS on
    the codes with the outlier columns still in, and their int8 products taken back out,
    the columns listed by int8_outlier_gather on a forked branch (CTAs of 256 or 1024
    threads); K % 128 != 0 (a partial last group), 17 columns (two batches of weight codes),
    more than 32 (past the cache), none, a bias, N past one CTA."""
    from cupyquant import _gpu_int8

    calls = []
    real = _gpu_int8.outlier_gather
    monkeypatch.setattr(_gpu_int8, "outlier_gather", lambda *args: calls.append(M) or real(*args))
    monkeypatch.setattr(_gpu_int8, "_GATHER_WIDE_M", 1 << 30 if threads == 256 else 0)
    rng = np.random.default_rng(M + K + cols)
    _planted_linear_matches(cp, rng, M, 264, K, fmt, cols, bias=True, backend=None)
    assert calls == [M]


@pytest.mark.gpu
def test_gpu_cublas_path_forked_branch_in_a_graph(cp, monkeypatch):
    """The outlier listing's forked branch captures into a CUDA graph and joins back: replays
    give the eager result, also after the activations change between replays."""
    from cupyquant import _gpu_int8

    calls = []
    real = _gpu_int8.outlier_gather
    monkeypatch.setattr(_gpu_int8, "outlier_gather", lambda *args: calls.append(1) or real(*args))
    rng = np.random.default_rng(5)
    M, N, K = 32, 512, 1024
    cb, scb, _ = ref8.quantize_rows(rng.standard_normal((N, K)).astype(np.float32))
    gcb, gscb = cp.asarray(cb.reshape(-1)), cp.asarray(scb)
    inputs = [_planted(rng, M, K, "float16", cols).reshape(-1) for cols in (3, 9)]
    ga = cp.asarray(inputs[0])
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        I8.int8_linear_bits(ga, "float16", M, K, gcb, gscb, N, None, None, 6.0)  # compile outside the capture
        stream.begin_capture()
        got = I8.int8_linear_bits(ga, "float16", M, K, gcb, gscb, N, None, None, 6.0)
        graph = stream.end_capture()
        assert calls == [1, 1]
        for a in inputs:
            ga[...] = cp.asarray(a)
            graph.launch(stream)
            stream.synchronize()
            want = I8.int8_linear_bits(a, "float16", M, K, cb.reshape(-1), scb, N, None, None, 6.0)
            np.testing.assert_array_equal(cp.asnumpy(got), want)


def test_gather_listing_where_its_bitmap_reads_stay_small():
    """int8_outlier_gather's CTAs each read all rows' bitmaps: the forked listing serves
    where those reads stay small, the byte flags (int8_outlier_weights) elsewhere."""
    from cupyquant._gpu_int8 import _gather_listing

    assert _gather_listing(17, 4096, 4096)
    assert _gather_listing(256, 4096, 4096)  # 4 CTAs of 1024 threads: 512 KB of bitmaps
    assert not _gather_listing(257, 4096, 4096)  # more rows than it serves
    assert _gather_listing(32, 28672, 8192)  # 112 CTAs x 32 KB = 3.5 MiB
    assert not _gather_listing(64, 28672, 8192)  # 7 MiB
    assert not _gather_listing(17, 256, 300_000)  # the OR of the bitmaps past its shared memory


def test_gather_dequant_columns_keep_a_cta_an_sm(monkeypatch):
    """The dequantization after int8_outlier_gather takes 2 columns a thread only where that
    still gives every SM a CTA (132 SMs)."""
    from cupyquant import _gpu_int8

    monkeypatch.setattr(_gpu_int8, "_limits", lambda: (132, 232448))
    assert _gpu_int8._gather_columns(64, 4096) == 1  # 8 x 8 CTAs at 2
    assert _gpu_int8._gather_columns(256, 4096) == 2  # 8 x 32
    assert _gpu_int8._gather_columns(64, 28672) == 2  # 56 x 8
