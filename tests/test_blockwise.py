"""Blockwise 4-bit and 8-bit quantization: behaviour, edge cases and errors (NumPy path),
and the CuPy kernels against it, bit for bit (gpu marker)."""

from __future__ import annotations

import numpy as np
import pytest

import cupyquant as cq
from cupyquant import _reference as ref
from cupyquant.blockwise import dequantize_4bit_bits, quantize_4bit_bits

FORMATS = ("float32", "float16", "bfloat16")
SIZES = (1, 2, 3, 63, 64, 65, 1001, 4096 * 3 + 17)
# 4-bit quantization keeps at most half a code step of error: NF4's widest step is
# -0.6961928 - (-1) = 0.304, so |x - deq| <= 0.152 * absmax (plus output rounding).
NF4_MAX_ERROR = 0.1520 + 2**-7
FP4_MAX_ERROR = (1.0 - 0.6666667) / 2 + 2**-7
# The dynamic 8-bit map's widest step near 1.0 is 1 - 0.9929688 = 0.0070.
DYNAMIC_8BIT_MAX_ERROR = 0.0036 + 2**-7


def random_bits(rng: np.random.Generator, n: int, fmt: str) -> np.ndarray:
    """Random normal values in a float format's storage (bfloat16 as uint16 bits)."""
    x = rng.standard_normal(n).astype(np.float32) * np.float32(3.0)
    return ref.from_float32(x, fmt) if fmt != "float32" else x


# ---------------------------------------------------------------------------------------
# NumPy path: behaviour
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", cq.BLOCKSIZES_4BIT)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_4bit_round_trip_error_bound(quant_type, blocksize, nested):
    rng = np.random.default_rng(blocksize)
    x = rng.standard_normal((33, 257)).astype(np.float32)
    packed, state = cq.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    assert packed.shape == ((x.size + 1) // 2, 1) and packed.dtype == np.uint8
    assert state.shape == x.shape and state.nested == nested
    y = cq.dequantize_4bit(packed, state)
    assert y.shape == x.shape and y.dtype == x.dtype
    absmax = np.repeat(ref.block_absmax(x.reshape(-1), blocksize), blocksize)[: x.size].reshape(x.shape)
    bound = NF4_MAX_ERROR if quant_type == "nf4" else FP4_MAX_ERROR
    # nested absmax is itself 8-bit quantized: allow its relative error on top
    bound = bound * (1 + DYNAMIC_8BIT_MAX_ERROR) + (DYNAMIC_8BIT_MAX_ERROR if nested else 0)
    assert np.all(np.abs(y - x) <= bound * absmax + 1e-7)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", SIZES)
def test_4bit_sizes_and_formats(fmt, n):
    rng = np.random.default_rng(n)
    bits = random_bits(rng, n, fmt)
    packed, state = quantize_4bit_bits(bits, fmt, (n,), 64, True, "nf4")
    assert packed.size == (n + 1) // 2
    out = np.empty(n, dtype=bits.dtype)
    dequantize_4bit_bits(packed, state, out)
    x, y = ref.to_float32(bits, fmt), ref.to_float32(out, fmt)
    assert np.max(np.abs(x - y)) <= 0.15 * np.max(np.abs(x)) + 1e-6


def test_odd_count_is_padded_with_quantized_zero():
    x = np.array([1.0, -1.0, 0.5], dtype=np.float32)
    packed, _ = cq.quantize_4bit(x, quant_type="nf4")
    assert packed.reshape(-1)[1] & 0x0F == 7  # NF4 index 7 is 0.0
    packed, _ = cq.quantize_4bit(x, quant_type="fp4")
    assert packed.reshape(-1)[1] & 0x0F == 0


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_all_zero_block_dequantizes_to_zero(quant_type):
    x = np.zeros((2, 64), dtype=np.float16)
    x[1] = np.linspace(-1, 1, 64)
    packed, state = cq.quantize_4bit(x, quant_type=quant_type, blocksize=64)
    assert state.absmax[0] == 0
    y = cq.dequantize_4bit(packed, state)
    assert np.all(y[0] == 0)
    q, s8 = cq.quantize_blockwise(x, blocksize=64)
    assert np.all(cq.dequantize_blockwise(q, s8)[0] == 0)


def test_nan_and_inf_stay_in_their_block():
    """NaN is ignored by absmax and gets code 0; Inf makes its block's absmax Inf.
    The other blocks quantize exactly as without the bad values."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(256).astype(np.float32)
    clean_packed, clean_state = cq.quantize_4bit(x, quant_type="nf4", blocksize=64)
    bad = x.copy()
    bad[3] = np.nan
    bad[70] = np.inf
    packed, state = cq.quantize_4bit(bad, quant_type="nf4", blocksize=64)
    assert state.absmax[0] == np.max(np.abs(np.delete(x[:64], 3)))
    assert state.absmax[1] == np.inf
    assert packed.reshape(-1)[1] & 0x0F == 0  # element 3 is the low nibble of byte 1
    np.testing.assert_array_equal(packed[64:], clean_packed[64:])
    np.testing.assert_array_equal(state.absmax[2:], clean_state.absmax[2:])
    y = cq.dequantize_4bit(packed, state)
    np.testing.assert_array_equal(y[128:], cq.dequantize_4bit(clean_packed, clean_state)[128:])
    q, s8 = cq.quantize_blockwise(bad, blocksize=64)
    q_clean, _ = cq.quantize_blockwise(x, blocksize=64)
    assert q[3] == 0
    np.testing.assert_array_equal(q[128:], q_clean[128:])


@pytest.mark.parametrize("blocksize", cq.BLOCKSIZES_8BIT)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_8bit_round_trip(blocksize, nested):
    rng = np.random.default_rng(blocksize)
    x = rng.standard_normal((17, 301)).astype(np.float32)
    q, state = cq.quantize_blockwise(x, blocksize=blocksize, nested=nested)
    assert q.shape == x.shape and q.dtype == np.uint8
    y = cq.dequantize_blockwise(q, state)
    absmax = np.repeat(ref.block_absmax(x.reshape(-1), blocksize), blocksize)[: x.size].reshape(x.shape)
    bound = DYNAMIC_8BIT_MAX_ERROR * (2 if nested else 1)
    assert np.all(np.abs(y - x) <= bound * absmax + 1e-6)


def test_8bit_picks_the_nearest_code():
    code = cq.create_dynamic_map()
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, 20000).astype(np.float32)
    x[:2] = [1.0, -1.0]
    q = ref.codes_8bit(x, code)
    dist = np.abs(code[None, :].astype(np.float64) - x[:, None])
    best = dist.min(axis=1)
    np.testing.assert_array_equal(dist[np.arange(x.size), q], best)


def test_custom_code_and_out_buffers():
    rng = np.random.default_rng(2)
    x = rng.standard_normal(1000).astype(np.float32)
    code = cq.create_linear_map(signed=True)
    out = np.empty(1000, dtype=np.uint8)
    absmax = np.empty(-(-1000 // 256), dtype=np.float32)
    q, state = cq.quantize_blockwise(x, code=code, absmax=absmax, out=out, blocksize=256)
    assert q is out and np.shares_memory(state.absmax, absmax)
    deq = np.empty(1000, dtype=np.float32)
    assert cq.dequantize_blockwise(q, state, out=deq) is deq
    assert np.max(np.abs(deq - x)) <= 1.0 / 254 * np.max(np.abs(x)) + 1e-6


@pytest.mark.parametrize("storage", ["uint8", "int8", "float16", "float32"])
def test_quant_storage_is_a_view_of_the_same_bytes(storage):
    x = np.random.default_rng(3).standard_normal((64, 32)).astype(np.float16)
    base, state = cq.quantize_4bit(x, quant_type="nf4")
    packed, state2 = cq.quantize_4bit(x, quant_type="nf4", quant_storage=np.dtype(storage))
    assert packed.dtype == np.dtype(storage) and packed.shape == (1024 // packed.itemsize, 1)
    assert packed.tobytes() == base.tobytes()
    np.testing.assert_array_equal(cq.dequantize_4bit(packed, state2), cq.dequantize_4bit(base, state))


def test_quantize_4bit_out_and_absmax_buffers():
    x = np.random.default_rng(4).standard_normal(130).astype(np.float32)
    out = np.empty((65, 1), dtype=np.uint8)
    absmax = np.empty(3, dtype=np.float32)
    packed, state = cq.quantize_4bit(x, absmax=absmax, out=out, quant_type="fp4")
    assert packed is out
    np.testing.assert_array_equal(absmax, state.absmax)
    deq = np.empty_like(x)
    assert cq.dequantize_4bit(packed, absmax=absmax, out=deq, quant_type="fp4") is deq
    np.testing.assert_array_equal(deq, cq.dequantize_4bit(packed, state))


def test_empty_input():
    x = np.zeros((0, 8), dtype=np.float32)
    packed, state = cq.quantize_4bit(x, compress_statistics=True)
    assert packed.shape == (0, 1) and state.absmax.size == 0
    assert cq.dequantize_4bit(packed, state).shape == (0, 8)
    q, s8 = cq.quantize_blockwise(x)
    assert cq.dequantize_blockwise(q, s8).shape == (0, 8)


def test_nf4_fp4_helpers_and_maps():
    x = np.random.default_rng(5).standard_normal(100).astype(np.float32)
    p, s = cq.quantize_nf4(x)
    assert s.quant_type == "nf4"
    np.testing.assert_array_equal(cq.dequantize_nf4(p, s), cq.dequantize_4bit(p, s))
    p, s = cq.quantize_fp4(x)
    np.testing.assert_array_equal(cq.dequantize_fp4(p, s), cq.dequantize_4bit(p, s))
    normal = cq.create_normal_map()
    np.testing.assert_allclose(normal[normal != 0], cq.get_4bit_type("nf4")[cq.get_4bit_type("nf4") != 0], atol=2e-7)
    fp8 = cq.create_fp8_map()
    assert fp8.size == 256 and fp8.max() == 1.0 and np.all(np.diff(fp8) >= 0)
    linear = cq.create_linear_map()
    assert linear.size == 256 and linear.min() == -1.0 and linear.max() == 1.0
    unsigned = cq.create_dynamic_map(signed=False)
    assert unsigned.size == 256 and unsigned.min() == 0.0 and unsigned.max() == 1.0


def test_quant_state_round_trips_through_packed_dict():
    x = np.random.default_rng(6).standard_normal((10, 70)).astype(np.float16)
    for nested in (False, True):
        _, state = cq.quantize_4bit(x, quant_type="nf4", compress_statistics=nested)
        packed = state.as_dict(packed=True)
        prefixed = {f"weight.{k}": v for k, v in packed.items()}
        assert cq.QuantState.from_dict(prefixed, device="cpu") == state
        assert cq.QuantState.from_dict(state.as_dict(), device="cpu") == state


# ---------------------------------------------------------------------------------------
# NumPy path: errors
# ---------------------------------------------------------------------------------------
def test_errors_quantize_4bit():
    x = np.ones(64, dtype=np.float32)
    with pytest.raises(ValueError, match="blocksize must be one of .* got 96"):
        cq.quantize_4bit(x, blocksize=96)
    with pytest.raises(ValueError, match="quant_type must be one of .* got 'int4'"):
        cq.quantize_4bit(x, quant_type="int4")
    with pytest.raises(ValueError, match="A must be float32, float16 or bfloat16, got int32"):
        cq.quantize_4bit(np.ones(4, dtype=np.int32))
    with pytest.raises(TypeError, match="NumPy or CuPy array, got list"):
        cq.quantize_4bit([1.0, 2.0])
    with pytest.raises(ValueError, match="quant_storage must be one of .* got 'int16'"):
        cq.quantize_4bit(x, quant_storage=np.int16)
    with pytest.raises(ValueError, match="out must have 32 elements, got 31"):
        cq.quantize_4bit(x, out=np.empty((31, 1), np.uint8))
    with pytest.raises(ValueError, match="absmax must have dtype float32, got float16"):
        cq.quantize_4bit(x, absmax=np.empty(1, np.float16))


def test_errors_dequantize_4bit():
    x = np.ones((4, 64), dtype=np.float32)
    packed, state = cq.quantize_4bit(x)
    with pytest.raises(ValueError, match="needs quant_state, or both absmax and out"):
        cq.dequantize_4bit(packed)
    with pytest.raises(ValueError, match="A holds 64 bytes but quant_state.shape .* needs 128"):
        cq.dequantize_4bit(packed[:64], state)
    with pytest.raises(ValueError, match="out must hold 256 float32 values, got 255"):
        cq.dequantize_4bit(packed, state, out=np.empty(255, np.float32))
    with pytest.raises(ValueError, match="out must have dtype float32, got int32"):
        cq.dequantize_4bit(packed, state, out=np.empty(256, np.int32))
    bad = cq.QuantState(
        absmax=state.absmax[:3], shape=state.shape, code=state.code, blocksize=64, quant_type="fp4", dtype="float32"
    )
    with pytest.raises(ValueError, match="absmax has 3 blocks but shape .* needs 4"):
        cq.dequantize_4bit(packed, bad)
    with pytest.raises(ValueError, match="quant_state.quant_type must be 'nf4' or 'fp4', got None"):
        cq.dequantize_4bit(packed, cq.QuantState(absmax=state.absmax, shape=(4, 64), blocksize=64, dtype="float32"))


def test_errors_blockwise_8bit():
    x = np.ones(100, dtype=np.float32)
    with pytest.raises(ValueError, match="blocksize must be one of .* got 32"):
        cq.quantize_blockwise(x, blocksize=32)
    with pytest.raises(ValueError, match=r"code must be float32\[256\], got float32\[16\]"):
        cq.quantize_blockwise(x, code=np.zeros(16, np.float32))
    with pytest.raises(ValueError, match="code must be sorted ascending"):
        cq.quantize_blockwise(x, code=cq.create_dynamic_map()[::-1].copy())
    with pytest.raises(ValueError, match="out must have 100 elements, got 99"):
        cq.quantize_blockwise(x, out=np.empty(99, np.uint8))
    q, state = cq.quantize_blockwise(x)
    with pytest.raises(ValueError, match="A must be uint8 codes, got int8"):
        cq.dequantize_blockwise(q.view(np.int8), state)
    with pytest.raises(ValueError, match="needs quant_state or absmax"):
        cq.dequantize_blockwise(q)
    with pytest.raises(ValueError, match="nested=True needs the quant_state"):
        cq.dequantize_blockwise(q, absmax=state.absmax, nested=True)
    with pytest.raises(ValueError, match="absmax has 1 blocks but .* needs 2"):
        cq.dequantize_blockwise(np.zeros(5000, np.uint8), state)


def test_errors_quant_state():
    with pytest.raises(ValueError, match="quant_type must be one of"):
        cq.QuantState(absmax=np.zeros(1), quant_type="int4")
    with pytest.raises(ValueError, match="needs both offset and state2"):
        cq.QuantState(absmax=np.zeros(1), offset=np.zeros(()))
    with pytest.raises(ValueError, match="found neither"):
        cq.QuantState.from_dict({"absmax": np.zeros(1)})
    with pytest.raises(ValueError, match="missing keys"):
        cq.QuantState.from_dict({"quant_type": "nf4", "absmax": np.zeros(1)})
    _, state = cq.quantize_blockwise(np.ones(10, np.float32))
    with pytest.raises(ValueError, match="as_dict needs a 4-bit QuantState"):
        state.as_dict()


# ---------------------------------------------------------------------------------------
# CuPy kernels == NumPy reference, bit for bit
# ---------------------------------------------------------------------------------------
GPU_SIZES = (1, 2, 7, 8, 9, 31, 255, 1001, 4095, 4097, 65536 + 3, 1_000_003)


def _to_gpu(cp, a):
    return cp.asarray(a)


def _assert_same_bits(gpu_array, host_array):
    host = np.asarray(host_array).reshape(-1)
    np.testing.assert_array_equal(gpu_array.get().reshape(-1).view(np.uint8), host.view(np.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", cq.BLOCKSIZES_4BIT)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_gpu_4bit_matches_numpy(cp, fmt, quant_type, blocksize, nested):
    rng = np.random.default_rng(blocksize)
    for n in GPU_SIZES:
        bits = random_bits(rng, n, fmt)
        bits[rng.integers(0, n, size=max(1, n // 500))] = 0  # exact zeros on the way
        host_packed, host_state = quantize_4bit_bits(bits, fmt, (n,), blocksize, nested, quant_type)
        with cp.cuda.Device(0):
            dev_packed, dev_state = quantize_4bit_bits(_to_gpu(cp, bits), fmt, (n,), blocksize, nested, quant_type)
        _assert_same_bits(dev_packed, host_packed)
        _assert_same_bits(dev_state.absmax, host_state.absmax)
        if nested:
            _assert_same_bits(dev_state.state2.absmax, host_state.state2.absmax)
            _assert_same_bits(dev_state.offset, host_state.offset)
        host_out = np.empty(n, dtype=bits.dtype)
        dequantize_4bit_bits(host_packed, host_state, host_out)
        dev_out = cp.empty(n, dtype=bits.dtype)
        dequantize_4bit_bits(dev_packed, dev_state, dev_out)
        _assert_same_bits(dev_out, host_out)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("blocksize", cq.BLOCKSIZES_8BIT)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_gpu_8bit_matches_numpy(cp, fmt, blocksize, nested):
    from cupyquant.blockwise import dequantize_blockwise_bits, quantize_blockwise_bits

    rng = np.random.default_rng(blocksize + 1)
    for n in GPU_SIZES:
        bits = random_bits(rng, n, fmt)
        host_q, host_state = quantize_blockwise_bits(bits, fmt, (n,), None, blocksize, nested)
        dev_q, dev_state = quantize_blockwise_bits(_to_gpu(cp, bits), fmt, (n,), None, blocksize, nested)
        _assert_same_bits(dev_q, host_q)
        _assert_same_bits(dev_state.absmax, host_state.absmax)
        host_out = np.empty(n, dtype=bits.dtype)
        dequantize_blockwise_bits(host_q, host_state, host_out)
        dev_out = cp.empty(n, dtype=bits.dtype)
        dequantize_blockwise_bits(dev_q, dev_state, dev_out)
        _assert_same_bits(dev_out, host_out)


@pytest.mark.gpu
def test_gpu_special_values_match_numpy(cp):
    x = np.random.default_rng(9).standard_normal(4096).astype(np.float32)
    x[:64] = 0
    x[100] = np.nan
    x[200] = np.inf
    x[300] = -np.inf
    x[400:464] = np.nan
    x[1000] = 1e-40  # subnormal
    x[2000:2064] = 1e-39
    for quant_type in ("nf4", "fp4"):
        hp, hs = cq.quantize_4bit(x, quant_type=quant_type, compress_statistics=True)
        dp, ds = cq.quantize_4bit(cp.asarray(x), quant_type=quant_type, compress_statistics=True)
        _assert_same_bits(dp, hp)
        _assert_same_bits(ds.absmax, hs.absmax)
        hy, dy = cq.dequantize_4bit(hp, hs), cq.dequantize_4bit(dp, ds)
        np.testing.assert_array_equal(np.isnan(dy.get()), np.isnan(hy))
        np.testing.assert_array_equal(np.nan_to_num(dy.get()), np.nan_to_num(hy))
    hq, hs = cq.quantize_blockwise(x, blocksize=64)
    dq, ds = cq.quantize_blockwise(cp.asarray(x), blocksize=64)
    _assert_same_bits(dq, hq)


@pytest.mark.gpu
def test_gpu_public_api_out_buffers_and_storage(cp):
    x = cp.asarray(np.random.default_rng(10).standard_normal((65, 33)).astype(np.float16))
    out = cp.empty(((x.size + 1) // 2, 1), dtype=cp.uint8)
    absmax = cp.empty(-(-x.size // 64), dtype=cp.float32)
    packed, state = cq.quantize_4bit(x, absmax=absmax, out=out, quant_type="nf4", compress_statistics=True)
    assert packed is out
    deq = cp.empty_like(x)
    assert cq.dequantize_4bit(packed, state, out=deq) is deq
    hp, hs = cq.quantize_4bit(x.get(), quant_type="nf4", compress_statistics=True)
    _assert_same_bits(packed, hp)
    _assert_same_bits(deq, cq.dequantize_4bit(hp, hs))
    p16, s16 = cq.quantize_4bit(x[:, :32].copy(), quant_type="fp4", quant_storage=cp.float16)
    assert p16.dtype == cp.float16
    _assert_same_bits(
        cq.dequantize_4bit(p16, s16), cq.dequantize_4bit(*cq.quantize_4bit(x[:, :32].get(), quant_type="fp4"))
    )
    q8 = cp.empty(x.shape, dtype=cp.uint8)
    q, s8 = cq.quantize_blockwise(x, out=q8, blocksize=256, nested=True)
    assert q is q8
    _assert_same_bits(
        cq.dequantize_blockwise(q, s8),
        cq.dequantize_blockwise(*cq.quantize_blockwise(x.get(), blocksize=256, nested=True)),
    )


@pytest.mark.gpu
def test_gpu_misaligned_views_are_handled(cp):
    base = cp.asarray(np.random.default_rng(11).standard_normal(1027).astype(np.float16))
    view = base[3:]  # 6-byte offset: not 16-byte aligned
    packed, state = cq.quantize_4bit(view, quant_type="nf4")
    hp, hs = cq.quantize_4bit(view.get(), quant_type="nf4")
    _assert_same_bits(packed, hp)
    out_base = cp.empty(1030, dtype=cp.float16)
    out = out_base[6:]
    cq.dequantize_4bit(packed, state, out=out)
    _assert_same_bits(out, cq.dequantize_4bit(hp, hs))


@pytest.mark.gpu
def test_gpu_non_default_stream(cp):
    x = cp.asarray(np.random.default_rng(12).standard_normal((512, 512)).astype(np.float32))
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        packed, state = cq.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
        y = cq.dequantize_4bit(packed, state)
    stream.synchronize()
    hp, hs = cq.quantize_4bit(x.get(), quant_type="nf4", compress_statistics=True)
    _assert_same_bits(packed, hp)
    _assert_same_bits(y, cq.dequantize_4bit(hp, hs))


@pytest.mark.gpu
def test_gpu_second_device(cp):
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("one CUDA device here; the second-device path needs two")
    with cp.cuda.Device(1):
        x = cp.asarray(np.random.default_rng(13).standard_normal(5000).astype(np.float16))
    packed, state = cq.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    assert packed.device.id == 1 and state.absmax.device.id == 1
    y = cq.dequantize_4bit(packed, state)
    assert y.device.id == 1
    hp, hs = cq.quantize_4bit(x.get(), quant_type="nf4", compress_statistics=True)
    _assert_same_bits(y, cq.dequantize_4bit(hp, hs))


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_2_pow_28_elements(cp):
    n = 2**28 + 5
    rng = cp.random.default_rng(14)
    x = rng.standard_normal(n, dtype=cp.float32).astype(cp.float16)
    packed, state = cq.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    # compare a few slices against the reference on matching whole blocks
    for start in (0, 2**27 - 64 * 1000, n - 64 * 1000 - 5):
        start -= start % 64
        sl = x[start : start + 64 * 1000].get()
        hp, hs = cq.quantize_4bit(sl, quant_type="nf4")
        _assert_same_bits(packed.reshape(-1)[start // 2 : start // 2 + 32000], hp.reshape(-1))
    y = cq.dequantize_4bit(packed, state)
    err = float(cp.max(cp.abs(y.astype(cp.float32) - x.astype(cp.float32))))
    assert err < 0.2 * float(cp.max(cp.abs(x)))
    q, s8 = cq.quantize_blockwise(x, blocksize=4096)
    y8 = cq.dequantize_blockwise(q, s8)
    assert float(cp.max(cp.abs(y8.astype(cp.float32) - x.astype(cp.float32)))) < 0.02 * float(cp.max(cp.abs(x)))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["linear", "unsigned_dynamic", "fp8"])
def test_gpu_custom_codes_match_numpy(cp, name):
    """Codes without a bucket table run the binary-search kernel: same bytes."""
    code = {
        "linear": cq.create_linear_map(),
        "unsigned_dynamic": cq.create_dynamic_map(signed=False),
        "fp8": cq.create_fp8_map(),
    }[name]
    x = np.random.default_rng(15).standard_normal(100_003).astype(np.float16)
    if name == "unsigned_dynamic":
        x = np.abs(x)
    hq, hs = cq.quantize_blockwise(x, code=code, blocksize=512)
    dq, ds = cq.quantize_blockwise(cp.asarray(x), code=cp.asarray(code), blocksize=512)
    _assert_same_bits(dq, hq)
    _assert_same_bits(ds.absmax, hs.absmax)
    _assert_same_bits(cq.dequantize_blockwise(dq, ds), cq.dequantize_blockwise(hq, hs))
