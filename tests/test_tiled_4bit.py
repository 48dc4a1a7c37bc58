"""The tile-ordered 4-bit weight (cupyquant.tiled_4bit) and matmul_4bit on it."""

from __future__ import annotations

import copy
import importlib
import types

import numpy as np
import pytest

import cupyquant as cq
from cupyquant.tiled_4bit import tile_bytes, untile_bytes

from .test_matmul_4bit import TOLERANCE, activation_range_case, make_case, reference, rel_error

mm = importlib.import_module("cupyquant.matmul_4bit")


def _as_array(bits, fmt):
    """A NumPy storage array as an array of ``fmt`` (fp16 bits viewed as float16)."""
    return bits.view(np.float16) if fmt == "float16" else bits


def test_tile_order_places_each_byte():
    # Byte j of row n (columns 2j, 2j + 1) lands at ((n // 16 * K / 128 + j // 64) * 16 + n % 16) * 64 + j % 64.
    N, K = 48, 384
    packed = np.arange(N * K // 2, dtype=np.int64).astype(np.uint32)  # distinct values stand in for the bytes
    tiled = tile_bytes(packed, N, K)
    for n in (0, 5, 15, 16, 31, 47):
        for j in (0, 1, 63, 64, 100, 191):
            at = ((n // 16 * (K // 128) + j // 64) * 16 + n % 16) * 64 + j % 64
            assert tiled[at] == packed[n * (K // 2) + j]
    np.testing.assert_array_equal(untile_bytes(tiled, N, K), packed)


def test_tile_4bit_round_trip_and_errors():
    a_bits, packed, qs, _ = make_case(32, 256, 1, "float32")
    tiled = cq.tile_4bit(packed, qs)
    assert tiled.shape == (32, 256) and tiled.quant_state is qs and tiled.data.dtype == np.uint8
    assert not np.array_equal(tiled.data, packed)  # reordered (two row tiles' worth of segments)
    np.testing.assert_array_equal(tiled.untile(), packed)
    for N, K in ((40, 256), (32, 192)):  # N % 16, K % 128
        _, p, q, _ = make_case(N, K, 1, "float32")
        with pytest.raises(ValueError, match=rf"N % 16 == 0 and K % 128 == 0, got \(N, K\) = \({N}, {K}\)"):
            cq.tile_4bit(p, q)
    with pytest.raises(ValueError, match=r"B holds 4094 bytes but an \(32, 256\) weight has 4096"):
        cq.tile_4bit(packed[:-2], qs)
    with pytest.raises(ValueError, match="C-contiguous"):
        cq.tile_4bit(np.stack([packed, packed], axis=1)[:, 0], qs)
    with pytest.raises(TypeError, match="quant_state must be a QuantState"):
        cq.tile_4bit(packed, None)


@pytest.mark.parametrize("fmt", ("float32", "float16"))
@pytest.mark.parametrize("M", (1, 3, 16, 40))
def test_numpy_tiled_matmul_equals_row_major(fmt, M):
    a_bits, packed, qs, bias_bits = make_case(32, 384, M, fmt, seed=M)
    A = _as_array(a_bits, fmt).reshape(M, 384)
    bias = None if bias_bits is None else _as_array(bias_bits, fmt)
    expected = cq.matmul_4bit(A, packed, qs, bias=bias)
    got = cq.matmul_4bit(A, cq.tile_4bit(packed, qs), bias=bias)
    np.testing.assert_array_equal(got.view(np.uint8), expected.view(np.uint8))


def test_tiled_matmul_errors():
    a_bits, packed, qs, _ = make_case(32, 256, 2, "float32")
    A = a_bits.reshape(2, 256)
    tiled = cq.tile_4bit(packed, qs)
    with pytest.raises(ValueError, match="quant_state must be None or B.quant_state .* got another QuantState"):
        cq.matmul_4bit(A, tiled, copy.deepcopy(qs))
    with pytest.raises(TypeError, match="quant_state is required unless B is a Tiled4bit"):
        cq.matmul_4bit(A, packed)
    with pytest.raises(TypeError, match="tiled must be a bool, got str"):
        mm.matmul_4bit_bits(a_bits, "float32", 2, packed, qs, tiled="yes")
    with pytest.raises(ValueError, match=r"a tiled weight has N % 16 == 0, K % 128 == 0 and N\*K/2 bytes"):
        mm.matmul_4bit_bits(a_bits, "float32", 2, np.concatenate([packed, packed[:16]]), qs, tiled=True)
    assert np.array_equal(cq.matmul_4bit(A, tiled, tiled.quant_state), cq.matmul_4bit(A, packed, qs))


# ---------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------
def _gpu_case(cp, N, K, M, fmt, quant_type="nf4", nested=True, bias=True, seed=0):
    """GPU operands (a_bits, bias_bits, row-major packed, state, tile-ordered bytes) and the reference."""
    a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, quant_type, 64, nested, bias, seed=seed)
    expected = reference(a_bits, fmt, M, packed, qs, bias_bits)
    gqs = copy.deepcopy(qs).to(0)
    gpacked = cp.asarray(packed)
    gbias = None if bias_bits is None else cp.asarray(bias_bits)
    return cp.asarray(a_bits), gbias, gpacked, gqs, cq.tile_4bit(gpacked, gqs).data, expected


def _run(cp, a_bits, fmt, M, packed, qs, bias_bits, tiled):
    """The product into a NaN-poisoned output of ``fmt``'s storage dtype, on the host."""
    N = qs.shape[0]
    if fmt == "float32":
        out = cp.full(M * N, np.nan, dtype=np.float32)
    else:  # NaN bit patterns
        out = cp.full(M * N, 0x7E00 if fmt == "float16" else 0x7FC0, dtype=np.uint16)
        out = out.view(np.float16) if fmt == "float16" else out
    mm.matmul_4bit_bits(a_bits, fmt, M, packed, qs, bias_bits, out, tiled=tiled)
    return cp.asnumpy(out)


@pytest.mark.gpu
def test_gpu_tile_bytes_match_numpy(cp):
    _, packed, qs, _ = make_case(64, 512, 1, "float16")
    tiled = cq.tile_4bit(cp.asarray(packed), copy.deepcopy(qs).to(0))
    np.testing.assert_array_equal(cp.asnumpy(tiled.data), tile_bytes(packed, 64, 512))
    np.testing.assert_array_equal(cp.asnumpy(tiled.untile()), packed)


@pytest.mark.gpu
def test_gpu_public_api_takes_a_tiled_weight(cp):
    a_bits, bias_bits, packed, qs, _, expected = _gpu_case(cp, 256, 512, 12, "float16", seed=3)
    A, bias = a_bits.view(cp.float16).reshape(12, 512), bias_bits.view(cp.float16)
    out = cq.matmul_4bit(A, cq.tile_4bit(packed, qs), bias=bias)
    assert out.shape == (12, 256) and out.dtype == cp.float16
    assert rel_error(cp.asnumpy(out).reshape(-1), "float16", expected) < TOLERANCE["float16"]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ("float16", "bfloat16", "float32"))
@pytest.mark.parametrize("M", (1, 2, 5, 8, 9, 16, 17, 40, 64, 100, 200, 300))
@pytest.mark.parametrize("shape", ((64, 256), (256, 1152), (8192, 256)), ids=lambda s: f"{s[0]}x{s[1]}")
def test_gpu_tiled_matmul_sweep(cp, fmt, M, shape):
    # Every path a tiled weight takes: the one-token GEMV (gemv_4bit_tiled), gemm_4bit_small
    # (4 / 8 warps, fragment-order A on 8192 rows), the tile kernels above 16 tokens
    # (gemm_4bit_wgmma from 33 on 8192 rows on an H100 / H200), dequantize + cuBLAS on the
    # tiles past the fused switch point, and for float32 up to it gemv_4bit's TILED build.
    N, K = shape
    a_bits, bias_bits, packed, qs, tiled, expected = _gpu_case(cp, N, K, M, fmt, seed=M + N)
    out = _run(cp, a_bits, fmt, M, tiled, qs, bias_bits, True)
    assert rel_error(out, fmt, expected) < TOLERANCE[fmt]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
@pytest.mark.parametrize("M", (1, 4, 12, 33))
def test_gpu_tiled_formats(cp, fmt, quant_type, nested, M):
    a_bits, _, packed, qs, tiled, expected = _gpu_case(cp, 128, 640, M, fmt, quant_type, nested, bias=False, seed=7)
    assert rel_error(_run(cp, a_bits, fmt, M, tiled, qs, None, True), fmt, expected) < TOLERANCE[fmt]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
@pytest.mark.parametrize(("N", "K", "M"), ((8192, 256, 12), (8192, 1024, 40), (512, 640, 300), (256, 8192, 700)))
def test_gpu_tiled_equals_row_major_bit_for_bit(cp, fmt, N, K, M):
    # Where both layouts run the same kernel (gemm_4bit_small on fragment-order A;
    # gemm_4bit_tile, or gemm_4bit_wgmma on an H100 / H200; dequantize + cuBLAS past the
    # switch point, the dequantize kernel reading the tiles in place) only the addresses of
    # the weight loads differ: the outputs are identical.
    a_bits, bias_bits, packed, qs, tiled, _ = _gpu_case(cp, N, K, M, fmt, seed=N + M)
    np.testing.assert_array_equal(_run(cp, a_bits, fmt, M, tiled, qs, bias_bits, True),
                                  _run(cp, a_bits, fmt, M, packed, qs, bias_bits, False))  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
def test_gpu_tiled_half_gemv_equals_row_major_bit_for_bit(cp, fmt):
    # gemv_4bit_half on tile order (forced) reads each row's chunks as on the row-major
    # layout: same configuration, same bits. (The default, gemv_4bit_tiled, adds in another order.)
    N, K = 4096, 512
    a_bits, bias_bits, packed, qs, tiled, _ = _gpu_case(cp, N, K, 1, fmt, seed=N)
    config = mm._half_pick(N, K, mm._sm_count(), mm._smem_per_sm())
    got = cp.empty(N, dtype=_xp_dtype(fmt))
    mm._matmul_fused(a_bits, fmt, 1, N, K, tiled, qs, bias_bits, got, path=mm._half_path(config), tiled=True)
    np.testing.assert_array_equal(cp.asnumpy(got).view(np.uint16),
                                  _run(cp, a_bits, fmt, 1, packed, qs, bias_bits, False).view(np.uint16))  # fmt: skip


def _xp_dtype(fmt):
    return np.float16 if fmt == "float16" else np.uint16


# gemv_4bit_tiled: every instantiated configuration forced, and "tgemv" (the pick). (N, K):
# one strip; 17 strips (the last CTA of 2 or 4 strips has strips past N); K = 128 (one tile,
# parts with no tile); 4224 (33 tiles: a part's last batch partial); 8192 + 128. The wide
# table's build ("w") too.
WIDE_PATH = "tgemv-{}x{}c{}w".format(*mm._TGEMV_WIDE_CONFIG)
NARROW_PATH = WIDE_PATH[:-1]
TGEMV_PATHS = ("tgemv", *(f"tgemv-{s}x{u}c{c}" for s, u, c in mm._TGEMV_CONFIGS), WIDE_PATH)
TGEMV_SHAPES = ((16, 128), (272, 4224), (48, 8320), (512, 640))


@pytest.mark.gpu
@pytest.mark.parametrize("path", TGEMV_PATHS)
@pytest.mark.parametrize("shape", TGEMV_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
def test_gpu_tiled_gemv(cp, path, shape, quant_type, nested, fmt):
    N, K = shape
    a_bits, bias_bits, _, qs, tiled, expected = _gpu_case(cp, N, K, 1, fmt, quant_type, nested, nested, seed=K + N)
    out = cp.full(N, 0x7E00 if fmt == "float16" else 0x7FC0, dtype=np.uint16).view(_xp_dtype(fmt))
    mm._matmul_fused(a_bits, fmt, 1, N, K, tiled, qs, bias_bits, out, path=path, tiled=True)
    assert rel_error(cp.asnumpy(out), fmt, expected) < TOLERANCE[fmt]


@pytest.mark.gpu
@pytest.mark.parametrize("blocksize", cq.BLOCKSIZES_4BIT)
def test_gpu_tiled_gemv_blocksizes(cp, blocksize):
    N, K = 64, 4096
    a_bits, packed, qs, bias_bits = make_case(N, K, 1, "float16", "nf4", blocksize, True, True, seed=blocksize)
    expected = reference(a_bits, "float16", 1, packed, qs, bias_bits)
    gqs = copy.deepcopy(qs).to(0)
    tiled = cq.tile_4bit(cp.asarray(packed), gqs)
    out = cq.matmul_4bit(
        cp.asarray(a_bits).view(cp.float16).reshape(1, K), tiled, bias=cp.asarray(bias_bits).view(cp.float16)
    )
    assert rel_error(cp.asnumpy(out).reshape(-1), "float16", expected) < TOLERANCE["float16"]


@pytest.mark.gpu
@pytest.mark.parametrize("magnitude", (1e-6, 3e-2, 5e3), ids=("1e-6", "3e-2", "5e3"))
def test_gpu_tiled_gemv_fp16_activation_range(cp, magnitude):
    # gemv_4bit_half's fp16 range guard, in the tiled kernel: tiny activations are scaled by
    # a power of two (and the sums back), large ones may overflow an 8-product sum (redone in
    # float32). See test_matmul_4bit.py's test_gpu_half_gemv_fp16_activation_range.
    a_bits, packed, qs, expected = activation_range_case(48, 4096, magnitude)
    gqs = copy.deepcopy(qs).to(0)
    tiled = cq.tile_4bit(cp.asarray(packed), gqs).data
    out = _run(cp, cp.asarray(a_bits), "float16", 1, tiled, gqs, None, True)
    assert rel_error(out, "float16", expected) < TOLERANCE["float16"]


@pytest.mark.gpu
@pytest.mark.parametrize("path", TGEMV_PATHS)
@pytest.mark.parametrize("shape", ((272, 4224), (48, 128), (4096, 4096)), ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("magnitude", (1e-6, 3e-2), ids=("1e-6", "3e-2"))
def test_gpu_tiled_gemv_fp16_range_every_build(cp, path, shape, magnitude):
    # Activations below 2^-2 make the fp16 range guard scale A (k != 0). The builds that read
    # the guard only after their first batch (the wide one, and those of two CTAs an SM) then
    # fetch and multiply that batch again on the rescaled copy: every build within the
    # reference's tolerance, with strips past N (272 rows on 2- and 4-strip CTAs), warps
    # without a tile (K = 128) and several batches a warp (4224, 4096).
    N, K = shape
    a_bits, packed, qs, expected = activation_range_case(N, K, magnitude)
    gqs = copy.deepcopy(qs).to(0)
    tiled = cq.tile_4bit(cp.asarray(packed), gqs).data
    out = cp.full(N, 0x7E00, dtype=np.uint16).view(np.float16)
    mm._matmul_fused(cp.asarray(a_bits), "float16", 1, N, K, tiled, gqs, None, out, path=path, tiled=True)
    assert rel_error(cp.asnumpy(out), "float16", expected) < TOLERANCE["float16"]


@pytest.mark.gpu
@pytest.mark.parametrize("sms", (1000, 1), ids=("prologue_first", "weights_first"))
@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
def test_gpu_tiled_gemv_wide_table_same_bits(cp, monkeypatch, sms, nested, fmt):
    # The wide byte table changes where a code pair is looked up, not its value or the order
    # of the sums: the same bits as the narrow table's build of the same configuration, with
    # either prologue order (a thousand SMs: one wave; one SM: several), and the reference's
    # tolerance. (N, K): 17 strips, 33 tiles a row; 256 strips, K = 4096; one tile a row.
    monkeypatch.setattr(mm, "_sm_count", lambda: sms)
    for N, K in ((272, 4224), (4096, 4096), (48, 128)):
        a_bits, bias_bits, _, qs, tiled, expected = _gpu_case(cp, N, K, 1, fmt, "nf4", nested, True, seed=N + K)
        outs = []
        for path in (NARROW_PATH, WIDE_PATH):
            out = cp.full(N, 0x7E00 if fmt == "float16" else 0x7FC0, dtype=np.uint16).view(_xp_dtype(fmt))
            mm._matmul_fused(a_bits, fmt, 1, N, K, tiled, qs, bias_bits, out, path=path, tiled=True)
            outs.append(cp.asnumpy(out).view(np.uint16))
        np.testing.assert_array_equal(outs[1], outs[0])
        assert rel_error(outs[1].view(np.float16) if fmt == "float16" else outs[1], fmt, expected) < TOLERANCE[fmt]


@pytest.mark.gpu
@pytest.mark.parametrize("magnitude", (1e-6, 3e-2, 5e3, "nan", "inf"))
def test_gpu_tiled_gemv_wide_table_fp16_range(cp, magnitude):
    # The fp16 range guard in the wide build (tiny activations scaled by a power of two, large
    # ones redone in float32, non-finite ones propagated): the narrow build's bits, though the
    # wide build reads the guard after its first batch and the narrow one before it.
    scale = 1.0 if isinstance(magnitude, str) else magnitude
    a_bits, packed, qs, expected = activation_range_case(48, 4096, scale)
    if isinstance(magnitude, str):  # one non-finite activation among small ones
        a_bits = (a_bits.view(np.float16) * np.float16(1e-3)).view(np.uint16)
        a_bits[1000] = 0x7E00 if magnitude == "nan" else 0x7C00
    gqs = copy.deepcopy(qs).to(0)
    tiled = cq.tile_4bit(cp.asarray(packed), gqs).data
    ga = cp.asarray(a_bits)
    outs = []
    for path in (NARROW_PATH, WIDE_PATH):
        out = cp.full(48, 0x7E00, dtype=np.uint16).view(np.float16)
        mm._matmul_fused(ga, "float16", 1, 48, 4096, tiled, gqs, None, out, path=path, tiled=True)
        outs.append(cp.asnumpy(out).view(np.uint16))
    np.testing.assert_array_equal(outs[1], outs[0])
    if not isinstance(magnitude, str):
        assert rel_error(outs[1].view(np.float16), "float16", expected) < TOLERANCE["float16"]
    else:
        assert not np.isfinite(outs[1].view(np.float16)).any()


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ("float32", "float16", "bfloat16"))
@pytest.mark.parametrize("blocksize", cq.BLOCKSIZES_4BIT)
@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
def test_gpu_dequantize_reads_tiles_in_place(cp, fmt, blocksize, nested):
    # The dequantize kernel on tile order (tile_k = K) writes the same row-major bits as on
    # the bitsandbytes layout.
    from cupyquant import _gpu
    from cupyquant.blockwise import _gpu_scales

    N, K = 48, 384
    _, packed, qs, _ = make_case(N, K, 1, fmt, "fp4", blocksize, nested, False, seed=blocksize)
    gqs = copy.deepcopy(qs).to(0)
    gpacked = cp.asarray(packed)
    tiled = cq.tile_4bit(gpacked, gqs).data
    outs = []
    for data, tile_k in ((gpacked, 0), (tiled, K)):
        out = cp.empty(N * K, dtype=np.float32 if fmt == "float32" else np.uint16)
        _gpu.dequantize_4bit(data, fmt, blocksize, "fp4", _gpu_scales(gqs, gqs.absmax.size), out, tile_k)
        outs.append(cp.asnumpy(out))
    np.testing.assert_array_equal(outs[1], outs[0])


@pytest.mark.gpu
@pytest.mark.parametrize("M", (2, 12, 40))
def test_gpu_tiled_odd_row_tile_count(cp, M):
    # 272 rows = 17 row tiles. At 12 tokens gemm_4bit_small takes two row tiles a warp, so the
    # last warp's second tile lies past N (its loads are clamped to the last tile, its outputs
    # dropped); 2 and 40 tokens run one row tile a warp on the same weight.
    a_bits, bias_bits, packed, qs, tiled, expected = _gpu_case(cp, 272, 1152, M, "float16", seed=M)
    got = _run(cp, a_bits, "float16", M, tiled, qs, bias_bits, True)
    assert rel_error(got, "float16", expected) < TOLERANCE["float16"]
    # The same bits where both layouts run the same configuration: up to 8 tokens a tiled weight
    # takes 8 warps a CTA (run 32 of NOTES_matmul_4bit.md), so the row-major run is forced to 8 too.
    if M <= 8:
        row_major = cp.empty(M * 272, dtype=np.float16)
        mm._matmul_fused(a_bits, "float16", M, 272, 1152, packed, qs, bias_bits, row_major, path="mma-w8")
        row_major = cp.asnumpy(row_major)
    else:
        row_major = _run(cp, a_bits, "float16", M, packed, qs, bias_bits, False)
    np.testing.assert_array_equal(got, row_major)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
def test_gpu_tiled_split_k_equals_row_major(cp, monkeypatch, fmt):
    # gemm_4bit_tile_split on a tiled weight: small thresholds make 512 x 4096 split K.
    monkeypatch.setattr(mm, "_TILE_MIN_N", 256)
    monkeypatch.setattr(mm, "_TILE_MIN_SHARE", 8)
    monkeypatch.setattr(mm, "_wgmma_supported", lambda: False)  # tile_split, whatever the wgmma rule
    M, N, K = 64, 512, 4096
    assert mm._pick_tile(M, N, K)[3] > 1
    a_bits, bias_bits, packed, qs, tiled, expected = _gpu_case(cp, N, K, M, fmt, seed=5)
    got = _run(cp, a_bits, fmt, M, tiled, qs, bias_bits, True)
    assert rel_error(got, fmt, expected) < TOLERANCE[fmt]
    np.testing.assert_array_equal(got, _run(cp, a_bits, fmt, M, packed, qs, bias_bits, False))


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
@pytest.mark.parametrize(("fmt", "M", "N", "K"), (
    ("float32", 1, 272, 1152), ("float32", 3, 4096, 512), ("float32", 4, 64, 4096),
    ("float16", 17, 272, 1152), ("bfloat16", 20, 4096, 512), ("float16", 32, 256, 4096),
))  # fmt: skip
def test_gpu_tiled_gemv_and_mma_equal_row_major_bit_for_bit(cp, monkeypatch, quant_type, nested, fmt, M, N, K):
    # float32 rows (the CUDA-core GEMV) and 17..32 tokens on weights under 8192 rows where
    # they take gemm_4bit_mma (the 16-token chunks' rule switched off here: its configuration
    # differs between the layouts) run the same kernel on both layouts: only the weight
    # addresses differ, so the outputs are identical, and no row-major copy of the tiles is
    # made. 272 rows are 17 row tiles: with gemm_4bit_mma's 4 warps a CTA (K split 2 ways at
    # 17 tokens), the last CTA's second tile lies past N.
    monkeypatch.setattr(mm, "_small_chunks_default", lambda *shape: False)
    a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, quant_type, 64, nested, True, seed=M + N)
    expected = reference(a_bits, fmt, M, packed, qs, bias_bits)
    gqs, gpacked = copy.deepcopy(qs).to(0), cp.asarray(packed)
    a_bits, bias_bits, tiled = cp.asarray(a_bits), cp.asarray(bias_bits), cq.tile_4bit(gpacked, gqs).data
    row_major = _run(cp, a_bits, fmt, M, gpacked, gqs, bias_bits, False)
    monkeypatch.setattr(mm, "untile_bytes", lambda *a: pytest.fail("the tiled weight was copied"))
    got = _run(cp, a_bits, fmt, M, tiled, gqs, bias_bits, True)
    np.testing.assert_array_equal(got, row_major)
    assert rel_error(got, fmt, expected) < TOLERANCE[fmt]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
@pytest.mark.parametrize("M", (17, 24, 32))
@pytest.mark.parametrize(("N", "K"), ((272, 1152), (4096, 512), (1040, 8192), (4096, 4096)), ids=lambda v: str(v))
def test_gpu_small_chunks_both_layouts(cp, monkeypatch, fmt, M, N, K):
    # 17..32 tokens on weights of up to 8192 x 8192: gemm_4bit_small in 16-token chunks, in
    # each layout's configuration (4 warps row-major; tiles: the 9..16-token pick, 4 warps on
    # the first two weights, 8 warps in batches of 4 segments on 1040 x 8192, the short-share
    # schedule with the last segment after the multiply on 4096 x 4096), both against the
    # reference, the tiles read in place.
    assert mm._small_chunks_default(M, N, K)
    chunked = []
    real = mm._pick_mma
    monkeypatch.setattr(mm, "_pick_mma", lambda *a, **kw: chunked.append(a[-1]) or real(*a, **kw))
    a_bits, bias_bits, gpacked, gqs, tiled, expected = _gpu_case(cp, N, K, M, fmt, seed=M + N)
    row_major = _run(cp, a_bits, fmt, M, gpacked, gqs, bias_bits, False)
    monkeypatch.setattr(mm, "untile_bytes", lambda *a: pytest.fail("the tiled weight was copied"))
    got = _run(cp, a_bits, fmt, M, tiled, gqs, bias_bits, True)
    assert chunked == [True, True]
    assert rel_error(row_major, fmt, expected) < TOLERANCE[fmt]
    assert rel_error(got, fmt, expected) < TOLERANCE[fmt]


@pytest.mark.gpu
@pytest.mark.parametrize(("fmt", "M"), (("float32", 1), ("float32", 4), ("float16", 1), ("bfloat16", 12)))
def test_gpu_tiled_unaligned_activations(cp, monkeypatch, fmt, M):
    # A at an odd address: the tiled path multiplies an aligned copy of A, never a row-major
    # copy of the weight, and gives the bits of the aligned call.
    N, K = 256, 1152
    a_bits, bias_bits, _, qs, tiled, expected = _gpu_case(cp, N, K, M, fmt, seed=11)
    shifted = cp.empty(M * K + 1, dtype=a_bits.dtype)
    shifted[1:] = a_bits
    assert shifted[1:].data.ptr % 16 != 0
    monkeypatch.setattr(mm, "untile_bytes", lambda *a: pytest.fail("the tiled weight was copied"))
    got = _run(cp, shifted[1:], fmt, M, tiled, qs, bias_bits, True)
    np.testing.assert_array_equal(got, _run(cp, a_bits, fmt, M, tiled, qs, bias_bits, True))
    assert rel_error(got, fmt, expected) < TOLERANCE[fmt]


# Where each kernel template takes its TILED argument (0-based).
_TILED_ARGUMENT = {
    "gemm_4bit_mma": 3,
    "gemm_4bit_small": 6,
    "gemm_4bit_tile": 4,
    "gemm_4bit_tile_split": 4,
    "gemm_4bit_wgmma": 2,
    "dequantize_4bit": 3,
}


def test_tiled_argument_positions_match_the_kernels():
    # _TILED_ARGUMENT against each kernel's template parameter list in its .cu file.
    import pathlib
    import re

    sources = "".join(p.read_text() for p in (pathlib.Path(mm.__file__).parent / "rawkernels").glob("*.cu"))
    for name, index in _TILED_ARGUMENT.items():
        found = re.search(r"template <([^>]*)>\s*__global__ void __launch_bounds__\([^)]*\)\s*" + name + r"\(", sources)
        assert found, name
        params = [p.split("=")[0].split()[-1] for p in found.group(1).split(",")]
        assert params.index("TILED") == index, (name, params)


@pytest.mark.gpu
def test_gpu_tiled_kernels_are_taken(cp, monkeypatch):
    # 1..700 tokens of fp16 run the tiled instantiations (one token: gemv_4bit_tiled; 40
    # tokens: gemm_4bit_tile, or gemm_4bit_wgmma on an H100 / H200; 700: the dequantize
    # kernel on tile order), never a row-major copy of the weight.
    from cupyquant import _gpu, rawkernels

    seen = []
    real_get = rawkernels.get_function
    monkeypatch.setattr(rawkernels, "get_function", lambda f, e: seen.append(e) or real_get(f, e))
    monkeypatch.setattr(_gpu, "get_function", lambda f, e: seen.append(e) or real_get(f, e))
    monkeypatch.setattr(mm, "untile_bytes", lambda *a: pytest.fail("the tiled weight was copied"))
    for M in (1, 2, 12, 40, 700):
        a_bits, bias_bits, _, qs, tiled, _ = _gpu_case(cp, 8192, 256, M, "float16", seed=M)
        _run(cp, a_bits, "float16", M, tiled, qs, bias_bits, True)
    kernels = [e for e in seen if e.split("<")[0] in ("gemv_4bit_tiled", "gemv_4bit_half", *_TILED_ARGUMENT)]
    assert len(kernels) == 5 and kernels[0].startswith("gemv_4bit_tiled<"), kernels
    for e in kernels[1:]:
        name, args = e.split("<")
        assert args.rstrip(">").split(", ")[_TILED_ARGUMENT[name]] == "true", e


def test_fused_tiled_refuses_the_stage_kernel():
    # gemm_4bit_stage reads the bitsandbytes layout only; every other kernel has a TILED build.
    for path in ("stage", "stage-1x4c2w4"):
        with pytest.raises(ValueError, match=f"gemm_4bit_stage reads the bitsandbytes layout only, got path '{path}'"):
            mm._mma_launch(None, "float16", 4, 64, 256, None, None, None, None, path=path, tiled=True)


def test_tiled_float32_gemv_and_narrow_mma_expressions(monkeypatch):
    # float32 activations up to 4 rows run gemv_4bit's TILED build; 17..32 fp16 / bf16 tokens
    # on weights under _TILE_MIN_N rows and longer than the chunked rule's K run gemm_4bit_mma's
    # (both registered for compiling).
    monkeypatch.setattr(mm, "_sm_count", lambda: 132)
    gemv = mm._kernel_expressions("gemv_4bit.cu")
    for mr in (1, 4):
        assert f"gemv_4bit<Float32, true, {mr}, 4, true, true>" in gemv
    assert not any(e.startswith("gemv_4bit<") and e.endswith("false, true>") for e in gemv)  # TILED needs ALIGNED
    for M in (17, 32):
        expr = mm._pick_mma(M, 4096, 4096, wide=True, tiled=True)[0]
        assert expr == "gemm_4bit_mma<{}, {}, 4, true>", expr
        assert expr.format("MmaHalf", "true") in mm._kernel_expressions("gemm_4bit.cu")
    with pytest.raises(ValueError, match="reads a tiled weight only with K % 32 == 0 and 16-byte aligned A and B"):
        mm._gemv_launch(None, "float32", 1, 64, 256, None, None, None, None, aligned=False, tiled=True)


class _Asked(Exception):
    """Raised by a stand-in get_function with the kernel expression the launcher asked for."""


@pytest.mark.parametrize(("M", "N", "K", "tiled", "expected"), (
    (20, 4096, 11008, True, "gemm_4bit_mma<MmaHalf, true, 4, true>"),
    (32, 272, 11008, True, "gemm_4bit_mma<MmaHalf, true, 4, true>"),
    (20, 4096, 11008, False, "gemm_4bit_mma<MmaHalf, true, 4>"),
    (20, 11008, 4096, True, "gemm_4bit_tile"),  # 8192+ rows: the tile kernels, either layout
    (20, 11008, 4096, False, "gemm_4bit_tile"),
    (20, 8192, 8192, True, "gemm_4bit_small<MmaHalf, true, 2, 2, false, 8, true, false, 4>"),  # 16-token chunks
    (32, 272, 4096, True, "gemm_4bit_small<MmaHalf, true, 2, 2, false, 8, true, true, 4>"),
    (17, 4096, 4096, False, "gemm_4bit_small<MmaHalf, true, 2, 2, false, 4>"),
))  # fmt: skip
def test_default_dispatch_of_17_to_32_tokens(monkeypatch, M, N, K, tiled, expected):
    # The launcher's own routing (not _pick_mma forced): weights of up to 8192 x 8192 take
    # gemm_4bit_small in 16-token chunks (4 warps on the bitsandbytes layout); others under
    # _TILE_MIN_N rows take gemm_4bit_mma, its TILED build for tiles.
    from cupyquant import rawkernels

    monkeypatch.setattr(mm, "_sm_count", lambda: 132)
    monkeypatch.setattr(mm, "_wgmma_supported", lambda: False)

    def asked(filename, expression):
        raise _Asked(expression)

    monkeypatch.setattr(rawkernels, "get_function", asked)
    with pytest.raises(_Asked) as got:
        mm._mma_launch(None, "float16", M, N, K, None, types.SimpleNamespace(nested=True), None, None, tiled=tiled)
    assert str(got.value).startswith(expected), str(got.value)


def test_tiled_reference_restores_bytes():
    # The NumPy path multiplies the row-major bytes: 32 x 256 is 2 x 2 tiles, so the tiled
    # bytes differ from the row-major ones, and read as row-major they give another product.
    a_bits, packed, qs, _ = make_case(32, 256, 2, "float16", bias=False)
    tiled = tile_bytes(packed, 32, 256)
    assert not np.array_equal(tiled, packed)
    expected = mm.matmul_4bit_bits(a_bits, "float16", 2, packed, qs)
    np.testing.assert_array_equal(mm.matmul_4bit_bits(a_bits, "float16", 2, tiled, qs, tiled=True), expected)
    assert not np.array_equal(mm.matmul_4bit_bits(a_bits, "float16", 2, tiled, qs), expected)


def test_tiled_weights_never_take_the_stage_kernel(monkeypatch):
    # gemm_4bit_stage reads the row-major layout: a tiled weight that would otherwise take it
    # (1..8 tokens, K >= 8192, enough row tiles an SM) goes to gemm_4bit_small.
    monkeypatch.setattr(mm, "_sm_count", lambda: 132)
    for M in (1, 2, 8):
        assert mm._stage_default(M, 28672, 8192)
        assert not mm._stage_default(M, 28672, 8192, tiled=True)
    assert not mm._stage_default(9, 28672, 8192) and not mm._stage_default(4, 28672, 4096)


def test_tiled_instantiations_compile_in_groups_of_their_own():
    # The TILED instantiations (one template argument more) compile apart from the
    # row-major ones, so first use of either compiles only its own group.
    from cupyquant import rawkernels

    plain = "gemm_4bit_small<MmaHalf, true, 2, 2, true, 4>"
    tiled = "gemm_4bit_small<MmaHalf, true, 2, 2, true, 4, true>"
    plain_group = rawkernels._group("gemm_4bit.cu", plain)
    tiled_group = rawkernels._group("gemm_4bit.cu", tiled)
    assert plain in plain_group and tiled in tiled_group
    assert not set(plain_group) & set(tiled_group)
    assert all(e.count(",") == 6 for e in tiled_group) and len(plain_group) == len(tiled_group) == 32


def test_tgemv_config_and_pick(monkeypatch):
    for config in mm._TGEMV_CONFIGS:
        assert mm._tgemv_config("tgemv-{}x{}c{}".format(*config), 64, 128) == (*config, False)
    assert mm._tgemv_config("tgemv-1x2c3w", 64, 128) == (1, 2, 3, True)
    with pytest.raises(ValueError, match=r"gemv_4bit_tiled is built for .* got path 'tgemv-3x3c3'"):
        mm._tgemv_config("tgemv-3x3c3", 64, 128)
    with pytest.raises(ValueError, match=r"got path 'tgemv-1x2'"):
        mm._tgemv_config("tgemv-1x2", 64, 128)
    with pytest.raises(ValueError, match=r"wide table is built for \(1, 2, 3\) only, got path 'tgemv-2x3c2w'"):
        mm._tgemv_config("tgemv-2x3c2w", 64, 128)
    sm = 228 * 1024  # an H100's shared memory an SM
    for N, K in ((28672, 8192), (8192, 28672), (4096, 4096), (11008, 4096), (4096, 14336)):
        config = mm._tgemv_pick(N, K, sm)
        assert config in mm._TGEMV_CONFIGS and mm._tgemv_fits(config, K, sm), (N, K, config)
    # A staged in shared memory: a CTA holds the byte table and 2K bytes of A
    assert mm._tgemv_pick(4096, 96 * 1024, sm) is None
    monkeypatch.setattr(mm, "_smem_per_sm", lambda: sm)
    assert not mm._tgemv_applies("float16", 1, 4096, 96 * 1024, True)
    assert mm._tgemv_applies("bfloat16", 1, 4096, 4096, True)
    assert not mm._tgemv_applies("float16", 2, 4096, 4096, True)
    assert not mm._tgemv_applies("float32", 1, 4096, 4096, True)


def test_tgemv_ahead_rule():
    # The PROLOGUE_FIRST builds with a short prologue request one tile a warp before it: bf16's
    # (no range guard) and the wide ones (fp16's guard read after the first batch); the other
    # fp16 builds request their whole first batch. Template arguments after the configuration.
    ahead = mm._TGEMV_SHORT_PROLOGUE_AHEAD
    assert mm._tgemv_order("float16", True, wide=True) == f", true, {ahead}, true"
    assert mm._tgemv_order("bfloat16", True, wide=True) == f", true, {ahead}, true"
    assert mm._tgemv_order("float16", False, wide=True) == f", false, {mm._TGEMV_WIDE_CONFIG[1]}, true"
    assert mm._tgemv_order("bfloat16", True) == f", true, {ahead}"
    assert mm._tgemv_order("float16", True) == ", true"
    assert mm._tgemv_order("bfloat16", False) == mm._tgemv_order("float16", False) == ""


def test_tgemv_wide_rule():
    # The wide table where two of its CTAs an SM hold the whole grid (one strip a CTA):
    # an H100's 132 SMs and 228 KB an SM.
    sm, sms = 228 * 1024, 132
    wide = {(N, K): mm._tgemv_wide(mm._tgemv_pick(N, K, sm), N, K, sm, sms)
            for N, K in ((4096, 4096), (2048, 4096), (4096, 11008), (4096, 1024), (4224, 4096), (4240, 4096),
                         (6144, 4096), (5120, 5120), (11008, 4096), (28672, 8192), (4096, 28672))}  # fmt: skip
    assert [shape for shape, w in wide.items() if w] == [(4096, 4096), (2048, 4096), (4096, 11008), (4096, 1024),
                                                         (4224, 4096)]  # fmt: skip
    # 264 strips are two wide CTAs on each of the 132 SMs; 265 are not
    assert mm._tgemv_wide((1, 2, 3), 264 * 16, 4096, sm, sms) and not mm._tgemv_wide((1, 2, 3), 265 * 16, 4096, sm, sms)
    # two wide CTAs of a long K do not fit an SM
    per_cta = mm._TGEMV_WIDE_STATIC_SMEM + mm._TGEMV_WIDE_TABLE + mm._CTA_RESERVED_SMEM
    k_max = (sm // 2 - per_cta) // 2
    assert mm._tgemv_wide((1, 2, 3), 4096, k_max // 128 * 128, sm, sms)
    assert not mm._tgemv_wide((1, 2, 3), 4096, (k_max // 128 + 1) * 128, sm, sms)
    # the expressions the launcher asks for are registered
    from cupyquant import rawkernels

    exprs = rawkernels.expressions("gemv_4bit.cu")
    assert "gemv_4bit_tiled<Float16, true, 1, 2, 3, true, 1, true>" in exprs
    assert "gemv_4bit_tiled<BFloat16, true, 1, 2, 3, true, 1, true>" in exprs
    assert sum(e.startswith("gemv_4bit_tiled<") and e.endswith(", true>") and e.count(",") == 7 for e in exprs) == 8


def test_tgemv_path_needs_a_tiled_weight():
    a_bits, packed, qs, _ = make_case(32, 256, 1, "float16", bias=False)
    with pytest.raises(ValueError, match=r"path 'tgemv' \(gemv_4bit_tiled\) needs a tiled weight"):
        mm._matmul_fused(a_bits, "float16", 1, 32, 256, packed, qs, None, a_bits[:32], path="tgemv")


def test_numpy_dequantize_reads_tile_order():
    from cupyquant.blockwise import dequantize_4bit_bits

    _, packed, qs, _ = make_case(32, 384, 1, "float32", "fp4", 128, True, False)
    expected = dequantize_4bit_bits(packed, qs, np.empty(32 * 384, dtype=np.float32))
    got = dequantize_4bit_bits(tile_bytes(packed, 32, 384), qs, np.empty(32 * 384, dtype=np.float32), tiled=True)
    np.testing.assert_array_equal(got, expected)
    _, packed, qs, _ = make_case(40, 256, 1, "float32")
    with pytest.raises(ValueError, match=r"N % 16 == 0 and K % 128 == 0, got shape \(40, 256\)"):
        dequantize_4bit_bits(packed, qs, np.empty(40 * 256, dtype=np.float32), tiled=True)
