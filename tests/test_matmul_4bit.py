"""4-bit matrix products: NumPy path and CuPy paths against a float64 reference of
``A @ dequantize_4bit(W)^T (+ bias)``, bitsandbytes' Linear4bit outputs, error paths."""

from __future__ import annotations

import copy
import importlib

import numpy as np
import pytest

import cupyquant as cq
from cupyquant import _reference as ref
from cupyquant import rawkernels
from cupyquant.blockwise import dequantize_4bit_bits
from cupyquant.quant_state import QuantState

from .conftest import FIXTURES

# the module (the package attribute of the same name is the function)
mm = importlib.import_module("cupyquant.matmul_4bit")

# Relative Frobenius error ||out - ref|| / ||ref|| against float64 A @ W^T (+ bias), where W is
# dequantize_4bit's exact float32 weight.
# float32: only the float32 accumulation order differs (~1e-7 measured); 1e-5 leaves room for K
#   in the thousands.
# float16: the output is rounded once to fp16 (~2e-4), and the tensor-core kernel rounds
#   code[q], the block scale and their product to fp16 (~4e-4 in a rounding simulation);
#   2e-3 is 5x that.
# bfloat16: the same three roundings with 8 mantissa bits: ~3.3e-3 simulated; 1.5e-2 is 4.5x.
TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.5e-2}

FORMATS = ("float32", "float16", "bfloat16")
M_SWEEP = (1, 2, 3, 7, 16, 33, 64, 128, 512)
# (N, K): aligned; odd N with blocks straddling rows (K % 64 != 0); K % 32 != 0; odd K;
# a K above one 1024-element pass of a warp and not a multiple of the 128-element segment.
SHAPES = ((64, 256), (37, 96), (50, 100), (21, 77), (67, 1184))


def _shape_id(shape):
    return f"{shape[0]}x{shape[1]}"


def make_case(N, K, M, fmt, quant_type="nf4", blocksize=64, nested=True, bias=True, seed=0):
    """NumPy operands: (a_bits, packed uint8, QuantState, bias_bits or None)."""
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((N, K)) / np.sqrt(max(K, 1))).astype(np.float32)
    packed, qs = cq.quantize_4bit(W, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    a_bits = ref.from_float32(rng.standard_normal(M * K).astype(np.float32), fmt)
    bias_bits = ref.from_float32(rng.standard_normal(N).astype(np.float32), fmt) if bias else None
    return a_bits, packed.reshape(-1), qs, bias_bits


def _as_float32(qs):
    return QuantState(absmax=qs.absmax, shape=qs.shape, code=qs.code, blocksize=qs.blocksize,
                      quant_type=qs.quant_type, dtype="float32", offset=qs.offset, state2=qs.state2)  # fmt: skip


def reference(a_bits, fmt, M, packed, qs, bias_bits):
    """float64 A @ W^T (+ bias) with W = dequantize_4bit(packed) in float32 (the spec's weight)."""
    N, K = qs.shape
    weight = np.empty(N * K, dtype=np.float32)
    dequantize_4bit_bits(packed, _as_float32(qs), weight)
    acc = ref.to_float32(a_bits, fmt).astype(np.float64).reshape(M, K) @ weight.astype(np.float64).reshape(N, K).T
    if bias_bits is not None:
        acc += ref.to_float32(bias_bits, fmt).astype(np.float64)[None, :]
    return acc


def rel_error(out_bits, fmt, expected):
    out = ref.to_float32(np.asarray(out_bits), fmt).astype(np.float64).reshape(expected.shape)
    assert np.all(np.isfinite(out)), "output has NaN/Inf (unwritten or overflowed values)"
    denom = np.linalg.norm(expected)
    return np.linalg.norm(out - expected) / (denom if denom else 1.0)


# ---------------------------------------------------------------------------------------
# CPU (NumPy reference path)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M", (1, 3, 16))
def test_numpy_matches_reference(shape, fmt, M):
    N, K = shape
    a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, seed=M)
    out = mm.matmul_4bit_bits(a_bits, fmt, M, packed, qs, bias_bits)
    assert rel_error(out, fmt, reference(a_bits, fmt, M, packed, qs, bias_bits)) < TOLERANCE[fmt]


@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
@pytest.mark.parametrize("blocksize", cq.BLOCKSIZES_4BIT)
@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
def test_numpy_every_blocksize(quant_type, blocksize, nested):
    a_bits, packed, qs, bias_bits = make_case(19, 150, 2, "float32", quant_type, blocksize, nested, bias=False)
    out = mm.matmul_4bit_bits(a_bits, "float32", 2, packed, qs)
    assert rel_error(out, "float32", reference(a_bits, "float32", 2, packed, qs, None)) < TOLERANCE["float32"]


def test_numpy_public_api_shapes():
    rng = np.random.default_rng(3)
    W = (rng.standard_normal((24, 64)) / 8).astype(np.float32)
    packed, qs = cq.quantize_4bit(W, quant_type="nf4")
    A = rng.standard_normal((2, 3, 64)).astype(np.float16)
    bias = rng.standard_normal(24).astype(np.float16)
    out = cq.matmul_4bit(A, packed, qs, bias=bias)
    assert out.shape == (2, 3, 24) and out.dtype == np.float16
    a_bits = A.reshape(-1)
    expected = reference(a_bits, "float16", 6, packed.reshape(-1), qs, bias)
    assert rel_error(out.reshape(-1), "float16", expected) < TOLERANCE["float16"]
    given = np.empty((2, 3, 24), dtype=np.float16)
    assert cq.matmul_4bit(A, packed, qs, out=given, bias=bias) is given
    np.testing.assert_array_equal(given, out)
    vec = cq.gemv_4bit(A[0, 0], packed, qs)
    assert vec.shape == (24,)
    np.testing.assert_allclose(vec, cq.matmul_4bit(A[0, :1], packed, qs)[0], rtol=0, atol=0)


def test_fused_max_m_contract():
    for fmt in FORMATS:
        for N, K in ((4096, 4096), (28672, 8192), (37, 77)):
            m = mm.fused_max_m(fmt, N, K)
            assert isinstance(m, int) and m >= 1
    assert mm.fused_max_m("float16", 4096, 4096) >= 16  # the tensor-core path covers decode batches
    assert mm.fused_max_m("float16", 28672, 8192) >= 64  # gemm_4bit_tile covers prefill-sized batches
    with pytest.raises(ValueError, match="fmt must be one of"):
        mm.fused_max_m("int8", 16, 16)


def _load_linear4bit(name):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = safetensors_torch.load_file(str(FIXTURES / f"{name}.safetensors"))

    def host(t):
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(np.uint16)
        return t.numpy()

    entries = {k[len("module.weight.") :]: host(v) for k, v in tensors.items() if k.startswith("module.weight.")}
    qs = QuantState.from_dict(entries)
    packed = host(tensors["module.weight"]).reshape(-1).view(np.uint8)
    fmt = str(tensors["x"].dtype).removeprefix("torch.")
    return fmt, host(tensors["x"]), packed, qs, host(tensors["module.bias"]), host(tensors["y"])


LINEAR4BIT_FIXTURES = (
    "linear4bit_nf4_nested_bfloat16",
    "linear4bit_fp4_plain_float32",
    "linear4bit_nf4_nested_float16_storagebfloat16",
)


@pytest.mark.parametrize("name", LINEAR4BIT_FIXTURES)
def test_numpy_matches_bitsandbytes_linear4bit(name):
    fmt, x, packed, qs, bias, y = _load_linear4bit(name)
    M = x.shape[0]
    out = mm.matmul_4bit_bits(x.reshape(-1), fmt, M, packed, qs, bias.reshape(-1))
    expected = ref.to_float32(y.reshape(-1), fmt).astype(np.float64).reshape(M, -1)
    assert rel_error(out, fmt, expected) < TOLERANCE[fmt]


# ---------------------------------------------------------------------------------------
# error paths
# ---------------------------------------------------------------------------------------
def _small():
    a_bits, packed, qs, bias_bits = make_case(8, 64, 2, "float16", bias=True)
    return a_bits, packed, qs, bias_bits


def test_errors_public_api():
    a_bits, packed, qs, bias_bits = _small()
    A = a_bits.view(np.float16).reshape(2, 64)
    with pytest.raises(ValueError, match=r"A's last dimension \(63\) must equal the weight's K \(64\)"):
        cq.matmul_4bit(A[:, :63], packed, qs)
    with pytest.raises(ValueError, match="A must be float32, float16 or bfloat16, got int32"):
        cq.matmul_4bit(A.astype(np.int32), packed, qs)
    with pytest.raises(ValueError, match=r"bias must be \(8,\) of float16"):
        cq.matmul_4bit(A, packed, qs, bias=np.zeros(7, np.float16))
    with pytest.raises(ValueError, match=r"bias must be \(8,\) of float16"):
        cq.matmul_4bit(A, packed, qs, bias=np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="out must be a contiguous"):
        cq.matmul_4bit(A, packed, qs, out=np.empty((2, 7), np.float16))
    with pytest.raises(ValueError, match="out must be a contiguous"):
        cq.matmul_4bit(A, packed, qs, out=np.empty((8, 2), np.float16).T)
    with pytest.raises(TypeError, match="B must be a NumPy or CuPy array"):
        cq.matmul_4bit(A, packed.tolist(), qs)
    with pytest.raises(TypeError, match="quant_state must be a QuantState"):
        cq.matmul_4bit(A, packed, {"shape": (8, 64)})
    with pytest.raises(ValueError, match="gemv_4bit needs exactly one row"):
        cq.gemv_4bit(A, packed, qs)
    with pytest.raises(ValueError, match="A must have at least one dimension"):
        cq.matmul_4bit(np.array(1.0, dtype=np.float16), packed, qs)
    flat_state = copy.copy(qs)
    flat_state.shape = (8 * 64,)
    with pytest.raises(ValueError, match=r"B must be a quantized 2-D \(N, K\) weight, got shape \(512,\)"):
        cq.matmul_4bit(A, packed, flat_state)


def test_errors_bits_api():
    a_bits, packed, qs, bias_bits = _small()
    with pytest.raises(ValueError, match="fmt must be one of"):
        mm.matmul_4bit_bits(a_bits, "float8", 2, packed, qs)
    with pytest.raises(ValueError, match="M must be a non-negative integer, got -1"):
        mm.matmul_4bit_bits(a_bits, "float16", -1, packed, qs)
    with pytest.raises(ValueError, match="A must have 192 elements, got 128"):
        mm.matmul_4bit_bits(a_bits, "float16", 3, packed, qs)
    with pytest.raises(ValueError, match="A must hold bfloat16 values as uint16, got float16"):
        mm.matmul_4bit_bits(a_bits.view(np.float16), "bfloat16", 2, packed, qs)
    with pytest.raises(ValueError, match="B holds 100 bytes but an \\(8, 64\\) weight needs 256"):
        mm.matmul_4bit_bits(a_bits, "float16", 2, packed[:100], qs)
    with pytest.raises(ValueError, match="B \\(packed codes\\) must be a flat uint8 array"):
        mm.matmul_4bit_bits(a_bits, "float16", 2, packed.view(np.int8), qs)
    with pytest.raises(ValueError, match="bias must have 8 elements, got 7"):
        mm.matmul_4bit_bits(a_bits, "float16", 2, packed, qs, bias_bits[:7])
    with pytest.raises(ValueError, match="out must have 16 elements, got 15"):
        mm.matmul_4bit_bits(a_bits, "float16", 2, packed, qs, None, np.empty(15, np.float16))
    empty = mm.matmul_4bit_bits(a_bits[:0], "float16", 0, packed, qs)
    assert empty.size == 0


# ---------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------
def to_gpu(cp, a_bits, packed, qs, bias_bits):
    qs_gpu = copy.deepcopy(qs).to(0)
    return (cp.asarray(a_bits), cp.asarray(packed), qs_gpu, None if bias_bits is None else cp.asarray(bias_bits))


def run_gpu(cp, a_bits, fmt, M, packed, qs, bias_bits, path=None):
    """Run on the GPU into a NaN-poisoned output; ``path`` forces a kernel ("gemv", "mma",
    "mma-rt1", "mma-rt2", "mma-wide", "tile-<mt>x<rt>") or "dequant" (dequantize + cuBLAS)."""
    ga, gp, gqs, gb = to_gpu(cp, a_bits, packed, qs, bias_bits)
    N = qs.shape[0]
    if fmt == "float32":
        out = cp.full(M * N, np.nan, dtype=np.float32)
    else:  # NaN bit patterns, in the storage dtype of the format
        out = cp.full(M * N, 0x7E00 if fmt == "float16" else 0x7FC0, dtype=np.uint16)
        out = out.view(np.float16) if fmt == "float16" else out
    if path is None:
        mm.matmul_4bit_bits(ga, fmt, M, gp, gqs, gb, out)
    elif path == "dequant":
        mm._matmul_dequant_gemm(ga, fmt, M, N, qs.shape[1], gp, gqs, gb, out)
    else:
        mm._matmul_fused(ga, fmt, M, N, qs.shape[1], gp, gqs, gb, out, path=path)
    return cp.asnumpy(out)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M", M_SWEEP)
def test_gpu_sweep_m(cp, shape, fmt, M):
    N, K = shape
    a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, seed=M + N)
    out = run_gpu(cp, a_bits, fmt, M, packed, qs, bias_bits)
    assert rel_error(out, fmt, reference(a_bits, fmt, M, packed, qs, bias_bits)) < TOLERANCE[fmt]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M", (1, 16))
@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
@pytest.mark.parametrize("blocksize", cq.BLOCKSIZES_4BIT)
@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
@pytest.mark.parametrize("bias", (False, True), ids=("nobias", "bias"))
def test_gpu_formats(cp, fmt, M, quant_type, blocksize, nested, bias):
    # K = 96: blocks straddle rows for blocksize 64 and every blocksize above 96; odd N.
    for N, K in ((37, 96), (21, 77)):
        a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, quant_type, blocksize, nested, bias, seed=blocksize)
        out = run_gpu(cp, a_bits, fmt, M, packed, qs, bias_bits)
        err = rel_error(out, fmt, reference(a_bits, fmt, M, packed, qs, bias_bits))
        assert err < TOLERANCE[fmt], f"{N}x{K}: {err}"


# "mma": the tensor-core dispatch; "mma-wide": gemm_4bit_mma; "tile-<mt>x<rt>": gemm_4bit_tile
# with that many token tiles a CTA and row tiles a warp (every instantiated configuration).
TILE_PATHS = tuple(f"tile-{mt}x{rt}" for mt, rt in mm._TILE_CONFIGS)
# gemm_4bit_tile_split forced: "k<ksplit>" CTAs share each tile's K. On the shapes below:
# 1 segment (37 x 96: the splits past the first are empty), 2 and 5 segments (empty splits
# too), and 33 segments (130 x 4128: shares 11/11/11, and 7 x 4 + 5 with the last segment
# cut by K).
SPLIT_PATHS = tuple(f"tile-{mt}x{rt}k{ks}" for (mt, rt), ks in zip(mm._TILE_SPLIT_CONFIGS, (3, 5), strict=True))
# gemm_4bit_stage forced: "stage-<rt>x<stages>c<chunk>w<warps>", every instantiated configuration.
STAGE_PATHS = [(f"stage-{rt}x{st}c{c}w{w}", M) for _, rt, st, c, w in mm._STAGE_CONFIGS for M in (1, 2, 5, 8)]
FORCED_PATHS = (
    "gemv", "mma", "mma-rt1", "mma-rt2", "mma-frag", "mma-w4", "mma-w8", "mma-chunks", "mma-wide", "dequant",
)  # fmt: skip
EACH_PATH = STAGE_PATHS + [
    (path, M)
    for path in (*FORCED_PATHS, *TILE_PATHS, *SPLIT_PATHS)
    for M in (1, 2, 5, 9, 16, 17, 40, 64, 70, 128, 256)
    if not (path.startswith(("mma-rt", "mma-frag", "mma-w4", "mma-w8")) and M > 16)
    and not (path == "gemv" and M > 70)
    and not (path.startswith("tile-") and M not in (1, 40, 70, 256))
]


@pytest.mark.gpu
@pytest.mark.parametrize(("path", "M"), EACH_PATH, ids=[f"{p}-M{m}" for p, m in EACH_PATH])
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
@pytest.mark.parametrize("shape", ((64, 256), (37, 96), (130, 4128), (300, 640)), ids=_shape_id)
def test_gpu_each_path(cp, path, M, fmt, shape):
    # 130 x 4128: 33 segments of 128 (split-K with a partial share, and a last segment that K
    # cuts); 300 x 640: 19 row tiles; 37 x 96: one segment, cut by K.
    N, K = shape
    a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, "fp4", 128, True, True, seed=M)
    out = run_gpu(cp, a_bits, fmt, M, packed, qs, bias_bits, path=path)
    assert rel_error(out, fmt, reference(a_bits, fmt, M, packed, qs, bias_bits)) < TOLERANCE[fmt]


@pytest.mark.gpu
@pytest.mark.parametrize("path", TILE_PATHS + SPLIT_PATHS)
@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
def test_gpu_tile_plain_nested(cp, path, nested, fmt):
    # The shared-memory tile kernel on plain absmax too, several token chunks, bias off.
    N, K, M = 200, 1056, 100
    a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, "nf4", 64, nested, False, seed=3)
    out = run_gpu(cp, a_bits, fmt, M, packed, qs, bias_bits, path=path)
    assert rel_error(out, fmt, reference(a_bits, fmt, M, packed, qs, bias_bits)) < TOLERANCE[fmt]


@pytest.mark.gpu
@pytest.mark.parametrize("M", (17, 40, 128))
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
def test_gpu_tile_dispatch(cp, monkeypatch, M, fmt):
    # A weight wide enough for the default dispatch to pick gemm_4bit_tile (N >= _TILE_MIN_N;
    # N not a multiple of a CTA's rows, K cut inside a segment).
    monkeypatch.setattr(mm, "_wgmma_supported", lambda: False)  # gemm_4bit_tile, whatever the wgmma rule
    N, K = mm._TILE_MIN_N + 40, 160
    assert M <= mm.fused_max_m(fmt, N, K)
    a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, seed=M)
    out = run_gpu(cp, a_bits, fmt, M, packed, qs, bias_bits)
    assert rel_error(out, fmt, reference(a_bits, fmt, M, packed, qs, bias_bits)) < TOLERANCE[fmt]


def test_tile_default_split_rule():
    # (mt, rt, ksplit) on 132 SMs: 8192 x 28672 (512 row tiles, 224 segments) splits K in 4 at
    # 17..64 tokens and not above; K = 4096 (32 segments) and 28672 rows never split.
    assert mm._tile_default(17, 512, 224, 132) == (4, 2, 4)
    assert mm._tile_default(64, 512, 224, 132) == (8, 2, 4)
    assert mm._tile_default(128, 512, 224, 132) == (8, 1, 1)
    assert mm._tile_default(64, 256, 32, 132) == (8, 1, 1)
    assert mm._tile_default(32, 688, 32, 132) == (4, 1, 1)
    assert mm._tile_default(64, 1792, 64, 132) == (8, 2, 1)
    for row_tiles in (19, 256, 512, 520):
        for segments in range(1, 400, 7):
            for M in (17, 33, 64, 200):
                mt, rt, ks = mm._tile_default(M, row_tiles, segments, 132)
                share = -(-segments // ks)
                assert (ks - 1) * share < segments <= ks * share  # no empty split
                assert ks == 1 or (mt, rt) in mm._TILE_SPLIT_CONFIGS  # instantiated


def _split_dispatch(monkeypatch):
    # Make small weights take gemm_4bit_tile_split in the default dispatch (the real
    # thresholds need 8192 rows and K >= 12288).
    monkeypatch.setattr(mm, "_TILE_MIN_N", 256)
    monkeypatch.setattr(mm, "_TILE_MIN_SHARE", 8)
    monkeypatch.setattr(mm, "_wgmma_supported", lambda: False)  # tile_split, whatever the wgmma rule


@pytest.mark.gpu
@pytest.mark.parametrize("path", SPLIT_PATHS)
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
def test_gpu_tile_split_deterministic(cp, path, fmt):
    # The splits' float32 partials are summed in split order whichever CTA finishes last:
    # repeated launches give identical bits. 300 x 4128 at 64 tokens: 33 segments, K ends
    # inside the last split's last segment.
    N, K, M = 300, 4128, 64
    a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, "nf4", 64, True, True, seed=13)
    outs = [run_gpu(cp, a_bits, fmt, M, packed, qs, bias_bits, path=path) for _ in range(3)]
    assert rel_error(outs[0], fmt, reference(a_bits, fmt, M, packed, qs, bias_bits)) < TOLERANCE[fmt]
    for other in outs[1:]:
        np.testing.assert_array_equal(other.view(np.uint16), outs[0].view(np.uint16))


@pytest.mark.gpu
@pytest.mark.parametrize("bias", (False, True), ids=("nobias", "bias"))
def test_gpu_split_shapes_are_not_prepared(cp, monkeypatch, bias):
    # gemm_4bit_tile_split needs a workspace a launch (a kept one would be shared by
    # concurrent streams and outlive the graphs that record it), so prepare_fused declines
    # it and the general path runs, with the same result every time.
    _split_dispatch(monkeypatch)
    fmt, N, K, M = "float16", 300, 2112, 64
    assert M <= mm.fused_max_m(fmt, N, K)
    a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, seed=23, bias=bias)
    ga, gp, gqs, gb = to_gpu(cp, a_bits, packed, qs, bias_bits)
    assert mm.prepare_fused(fmt, M, gp, gqs, bias) is None
    outs = []
    for _ in range(3):
        out = cp.full(M * N, np.nan, dtype=np.float16)
        mm.matmul_4bit_bits(ga, fmt, M, gp, gqs, gb, out)
        outs.append(cp.asnumpy(out))
    assert rel_error(outs[0], fmt, reference(a_bits, fmt, M, packed, qs, bias_bits)) < TOLERANCE[fmt]
    for other in outs[1:]:
        np.testing.assert_array_equal(other.view(np.uint16), outs[0].view(np.uint16))


@pytest.mark.gpu
@pytest.mark.parametrize("path", (None, SPLIT_PATHS[-1]))
def test_gpu_graph_capture_split(cp, monkeypatch, path):
    # gemm_4bit_tile_split under capture (the default dispatch, made to split, and forced):
    # the workspace is allocated and its counters zeroed inside the graph; two replays give
    # the eager result bit for bit.
    _split_dispatch(monkeypatch)
    fmt, N, K, M = "float16", 300, 2112, 48
    a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, seed=29)
    ga, gp, gqs, gb = to_gpu(cp, a_bits, packed, qs, bias_bits)
    out = cp.zeros(M * N, dtype=np.float16)
    if path is None:
        with cp.cuda.Device(0):
            assert mm._pick_tile(M, N, K)[3] > 1

    def call():
        if path is None:
            mm.matmul_4bit_bits(ga, fmt, M, gp, gqs, gb, out)
        else:
            mm._matmul_fused(ga, fmt, M, N, K, gp, gqs, gb, out, path=path)

    eager = replays_equal_eager(cp, call, out)
    assert rel_error(eager, fmt, reference(a_bits, fmt, M, packed, qs, bias_bits)) < TOLERANCE[fmt]


def replays_equal_eager(cp, call, out):
    """Runs ``call`` (which writes the 16-bit ``out``) eagerly, then captured in a CUDA graph,
    checks that two replays give the eager bits; returns the eager result on the host."""
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        call()
        stream.synchronize()
        eager = cp.asnumpy(out)
        stream.begin_capture()
        call()
        graph = stream.end_capture()
        for _ in range(2):
            out.fill(0)
            graph.launch(stream)
            stream.synchronize()
            np.testing.assert_array_equal(cp.asnumpy(out).view(np.uint16), eager.view(np.uint16))
    return eager


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("M", "N", "K"), ((1, 300, 640), (16, 300, 640), (32, 300, 640), (40, 8232, 640), (128, 8232, 640), (5, 6400, 8192))
)
@pytest.mark.parametrize("bias", (False, True), ids=("nobias", "bias"))
@pytest.mark.parametrize("wgmma", (True, False), ids=("wgmma-rule", "no-wgmma"))
def test_gpu_prepared_launch(cp, monkeypatch, M, N, K, bias, wgmma):
    # prepare_fused's launch (the torch adapter's eager path): gemv_4bit_half at one token
    # (its staged A in dynamic shared memory), gemm_4bit_small (4 and 8 warps), the tile
    # kernel (8232 rows at 40 / 128 tokens; on an H100 / H200 gemm_4bit_wgmma, unsplit, unless
    # the rule is switched off), and the dynamic shared memory and 256-thread blocks of
    # gemm_4bit_stage (6400 x 8192).
    if not wgmma:
        monkeypatch.setattr(mm, "_wgmma_supported", lambda: False)
    fmt = "float16"
    assert M <= mm.fused_max_m(fmt, N, K)
    a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, seed=21, bias=bias)
    ga, gp, gqs, gb = to_gpu(cp, a_bits, packed, qs, bias_bits)
    if K >= mm._STAGE_MIN_K:
        kernel = mm._mma_launch(ga, fmt, M, N, K, gp, gqs, gb, cp.empty(M * N, dtype=np.float16))[0]
        assert "gemm_4bit_stage" in kernel.name
    launch = mm.prepare_fused(fmt, M, gp, gqs, bias)
    assert launch is not None and launch.accepts(ga.data.ptr)
    out = cp.full(M * N, np.nan, dtype=np.float16)
    stream = cp.cuda.get_current_stream()
    launch(ga.data.ptr, None if gb is None else gb.data.ptr, out.data.ptr, stream.ptr)
    assert rel_error(cp.asnumpy(out), fmt, reference(a_bits, fmt, M, packed, qs, bias_bits)) < TOLERANCE[fmt]


@pytest.mark.gpu
@pytest.mark.parametrize("M", (1, 3, 8, 16, 40))
@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
def test_gpu_float32_gemv(cp, M, nested):
    for N, K in ((64, 256), (21, 77), (67, 1184)):
        a_bits, packed, qs, bias_bits = make_case(N, K, M, "float32", "nf4", 64, nested, True, seed=M)
        out = run_gpu(cp, a_bits, "float32", M, packed, qs, bias_bits, path="gemv")
        err = rel_error(out, "float32", reference(a_bits, "float32", M, packed, qs, bias_bits))
        assert err < TOLERANCE["float32"], f"{N}x{K}: {err}"


def test_gemv_rows_rule():
    # 8 weight rows a warp at 2..4 activation rows where the grid (N / 32 CTAs) still gives
    # every SM a CTA; 4 otherwise, and always at one row.
    assert mm._gemv_rows(2, 28672, 132) == 8 and mm._gemv_rows(4, 8192, 132) == 8
    assert mm._gemv_rows(4, 4193, 132) == 8 and mm._gemv_rows(4, 4192, 132) == 4  # 132 CTAs, 131
    assert mm._gemv_rows(3, 4096, 132) == 4 and mm._gemv_rows(1, 28672, 132) == 4


@pytest.mark.gpu
@pytest.mark.parametrize("M", (2, 3, 4))
@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
def test_gpu_float32_gemv_rows_same_bits(cp, monkeypatch, M, nested):
    # 8 weight rows a warp (one SM counted) against 4 (a thousand): each row's sums run in the
    # same order, so the bits are the same; aligned, unaligned (K % 32 != 0) and tiled weights.
    for N, K in ((64, 256), (21, 77), (67, 1184), (48, 1152)):
        a_bits, packed, qs, bias_bits = make_case(N, K, M, "float32", "nf4", 64, nested, True, seed=M + N)
        outs = []
        for sms in (1, 1000):
            monkeypatch.setattr(mm, "_sm_count", lambda sms=sms: sms)
            outs.append(run_gpu(cp, a_bits, "float32", M, packed, qs, bias_bits, path="gemv"))
            if N % 16 == 0 and K % 128 == 0:
                ga, gp, gqs, gb = to_gpu(cp, a_bits, packed, qs, bias_bits)
                tiled = cq.tile_4bit(gp, gqs)
                out = cp.full(M * N, np.nan, dtype=np.float32)
                mm._matmul_fused(ga, "float32", M, N, K, tiled.data, gqs, gb, out, path="gemv", tiled=True)
                np.testing.assert_array_equal(cp.asnumpy(out).view(np.uint32), outs[-1].view(np.uint32))
        np.testing.assert_array_equal(outs[0].view(np.uint32), outs[1].view(np.uint32))
        err = rel_error(outs[0], "float32", reference(a_bits, "float32", M, packed, qs, bias_bits))
        assert err < TOLERANCE["float32"], f"{N}x{K}: {err}"


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M", (1, 3, 20))
def test_gpu_unaligned_views(cp, monkeypatch, fmt, M):
    # A and B starting one element / byte into their buffers: not 16-byte aligned. Only the
    # CUDA-core GEMV takes them: one 16-bit row (any float32 rows up to its switch point) is
    # fused, more 16-bit rows dequantize and call cuBLAS.
    N, K = 40, 128
    a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, seed=5)
    ga_buf = cp.asarray(np.concatenate([a_bits[:1], a_bits]))
    gp_buf = cp.asarray(np.concatenate([packed[:1], packed]))
    gqs = copy.deepcopy(qs).to(0)
    ran = []
    for name in ("_matmul_fused", "_matmul_dequant_gemm"):
        real = getattr(mm, name)
        monkeypatch.setattr(mm, name, lambda *a, real=real, name=name, **k: ran.append(name) or real(*a, **k))
    out = mm.matmul_4bit_bits(ga_buf[1:], fmt, M, gp_buf[1:], gqs, cp.asarray(bias_bits))
    assert rel_error(cp.asnumpy(out), fmt, reference(a_bits, fmt, M, packed, qs, bias_bits)) < TOLERANCE[fmt]
    fused = M <= (mm.fused_max_m(fmt, N, K) if fmt == "float32" else 1)
    assert ran == ["_matmul_fused" if fused else "_matmul_dequant_gemm"]
    assert mm.prepare_fused(fmt, M, gp_buf[1:], gqs, True) is None or fused


@pytest.mark.gpu
@pytest.mark.parametrize("name", LINEAR4BIT_FIXTURES)
def test_gpu_matches_bitsandbytes_linear4bit(cp, name):
    fmt, x, packed, qs, bias, y = _load_linear4bit(name)
    M = x.shape[0]
    expected = ref.to_float32(y.reshape(-1), fmt).astype(np.float64).reshape(M, -1)
    for path in ("gemv", "dequant") + (("mma",) if fmt != "float32" else ()):
        out = run_gpu(cp, x.reshape(-1), fmt, M, packed, qs, bias.reshape(-1), path=path)
        assert rel_error(out, fmt, expected) < TOLERANCE[fmt], path


@pytest.mark.gpu
@pytest.mark.parametrize("M", (1, 16, 64, 512))
def test_gpu_graph_capture(cp, M):
    fmt, N, K = "float16", 96, 256
    a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, seed=11)
    ga, gp, gqs, gb = to_gpu(cp, a_bits, packed, qs, bias_bits)
    out = cp.zeros(M * N, dtype=np.float16)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        mm.matmul_4bit_bits(ga, fmt, M, gp, gqs, gb, out)  # warm up: compile, cuBLAS handle, pool
        stream.synchronize()
        out.fill(0)
        stream.begin_capture()
        mm.matmul_4bit_bits(ga, fmt, M, gp, gqs, gb, out)
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
    assert rel_error(cp.asnumpy(out), fmt, reference(a_bits, fmt, M, packed, qs, bias_bits)) < TOLERANCE[fmt]


@pytest.mark.gpu
def test_gpu_public_api(cp):
    rng = np.random.default_rng(9)
    W = cp.asarray((rng.standard_normal((48, 160)) / 12).astype(np.float32))
    packed, qs = cq.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
    A = cp.asarray(rng.standard_normal((2, 2, 160)).astype(np.float16))
    out = cq.matmul_4bit(A, packed, qs)
    assert out.shape == (2, 2, 48) and out.dtype == np.float16
    host_qs = copy.deepcopy(qs).to("cpu")
    expected = reference(cp.asnumpy(A).reshape(-1), "float16", 4, cp.asnumpy(packed).reshape(-1), host_qs, None)
    assert rel_error(cp.asnumpy(out).reshape(-1), "float16", expected) < TOLERANCE["float16"]
    vec = cq.gemv_4bit(A[0, 0], packed, qs)
    assert vec.shape == (48,)


@pytest.mark.gpu
def test_gpu_stage_rejects_unbuilt_configurations(cp):
    with pytest.raises(ValueError, match="gemm_4bit_stage takes up to 8 tokens"):
        mm._stage_config(9)
    with pytest.raises(ValueError, match="no .token tiles, row tiles, stages, chunk, warps."):
        mm._stage_config(4, "2x3c4w4")


# Kernels that deal row groups out over a one-wave grid, at token counts they take.
DEALT_PATHS = [(p, M) for p in sorted({p for p, _ in STAGE_PATHS}) for M in (1, 5)] + [
    (p, M) for p in TILE_PATHS for M in (40, 70)
]


@pytest.mark.gpu
@pytest.mark.parametrize(("path", "M"), DEALT_PATHS, ids=[f"{p}-M{m}" for p, m in DEALT_PATHS])
def test_gpu_many_row_groups_per_cta(cp, path, M):
    # More row groups than one wave's warps (gemm_4bit_stage) or than a quarter of the CTA
    # groups (gemm_4bit_tile): each CTA takes groups b, b + G, ...; N is not a multiple of a
    # group's rows.
    N, K = 20008, 256
    a_bits, packed, qs, bias_bits = make_case(N, K, M, "float16", "nf4", 64, True, True, seed=M)
    out = run_gpu(cp, a_bits, "float16", M, packed, qs, bias_bits, path=path)
    assert rel_error(out, "float16", reference(a_bits, "float16", M, packed, qs, bias_bits)) < TOLERANCE["float16"]


# gemv_4bit_half (one fp16 / bf16 token): every instantiated configuration forced, and "half"
# (the configuration picked for the shape).
HALF_PATHS = ("half", *(mm._half_path(c) for c in mm._HALF_CONFIGS))
# (N, K): K = 96 (blocks of 64 straddle rows; one chunk a lane at most), 4128 (129 chunks:
# a last partial batch), 8256 (258 chunks: two full batches of every unroll, then a tail);
# N not a multiple of a CTA's rows.
HALF_SHAPES = ((37, 96), (130, 4128), (21, 8256), (300, 640))


@pytest.mark.gpu
@pytest.mark.parametrize("path", HALF_PATHS)
@pytest.mark.parametrize("shape", HALF_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
def test_gpu_half_gemv(cp, path, shape, quant_type, nested, fmt):
    N, K = shape
    a_bits, packed, qs, bias_bits = make_case(N, K, 1, fmt, quant_type, 64, nested, nested, seed=K)
    out = run_gpu(cp, a_bits, fmt, 1, packed, qs, bias_bits, path=path)
    assert rel_error(out, fmt, reference(a_bits, fmt, 1, packed, qs, bias_bits)) < TOLERANCE[fmt]


def test_prologue_first_rule(monkeypatch):
    # The one-token kernels issue their prologue's loads first where the grid is one wave and
    # a CTA's packed weights are at most 128 KB.
    monkeypatch.setattr(mm, "_sm_count", lambda: 132)
    assert mm._prologue_first(256, 3, 16, 4096) and mm._prologue_first(396, 3, 64, 4096)
    assert mm._prologue_first(256, 3, 16, 14336) and not mm._prologue_first(256, 2, 32, 16384)
    assert not mm._prologue_first(397, 3, 16, 4096) and not mm._prologue_first(896, 2, 32, 8192)


# Every built one-token configuration, forced (the picked ones also depend on the SM count):
# gemv_4bit_half on both layouts, gemv_4bit_tiled on tiles.
ONE_TOKEN_CASES = [
    *((mm._half_path(c), tiled) for c in mm._HALF_CONFIGS for tiled in (False, True)),
    *((f"tgemv-{s}x{u}c{c}", True) for s, u, c in mm._TGEMV_CONFIGS),
]


@pytest.mark.gpu
@pytest.mark.parametrize(("path", "tiled"), ONE_TOKEN_CASES, ids=lambda v: v if isinstance(v, str) else f"tiled={v}")
@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
def test_gpu_one_token_prologue_order_same_bits(cp, monkeypatch, path, tiled, nested, fmt):
    # The prologue's loads before the weights' (a thousand SMs counted: one wave) or after them
    # (one SM: 5+ waves of 17 strips) change only when bytes arrive: the same bits, from the
    # other build of the same configuration. K = 256: A within the head's first unit a thread;
    # K = 3200: 400 units, a second head unit for some threads, none past it.
    built = []
    real_get = rawkernels.get_function
    monkeypatch.setattr(rawkernels, "get_function", lambda f, e: built.append(e) or real_get(f, e))
    for N, K in ((272, 256), (272, 3200)):
        a_bits, packed, qs, bias_bits = make_case(N, K, 1, fmt, "nf4", 64, nested, True, seed=K)
        ga, gp, gqs, gb = to_gpu(cp, a_bits, packed, qs, bias_bits)
        weight = cq.tile_4bit(gp, gqs).data if tiled else gp
        outs, kernels = [], []
        for sms in (1000, 1):
            monkeypatch.setattr(mm, "_sm_count", lambda sms=sms: sms)
            built.clear()
            out = cp.full(N, 0x7E00 if fmt == "float16" else 0x7FC0, dtype=np.uint16)  # NaN
            mm._matmul_fused(ga, fmt, 1, N, K, weight, gqs, gb, out.view(ga.dtype), path=path, tiled=tiled)
            outs.append(cp.asnumpy(out))
            kernels.append(built[-1])
        # the PROLOGUE_FIRST build (the other's template arguments, then PROLOGUE_FIRST = true,
        # after TILED = false on gemv_4bit_half's bitsandbytes layout, and before
        # gemv_4bit_tiled's bf16 AHEAD), then the other
        assert kernels[0] != kernels[1] and kernels[0].startswith(kernels[1][:-1]), kernels
        ahead = f", {mm._TGEMV_SHORT_PROLOGUE_AHEAD}" if path.startswith("tgemv") and fmt == "bfloat16" else ""
        assert kernels[0].endswith(f", true{ahead}>"), kernels
        np.testing.assert_array_equal(outs[0], outs[1])
        got = outs[0].view(np.float16) if fmt == "float16" else outs[0]
        assert rel_error(got, fmt, reference(a_bits, fmt, 1, packed, qs, bias_bits)) < TOLERANCE[fmt]


@pytest.mark.gpu
@pytest.mark.parametrize("blocksize", cq.BLOCKSIZES_4BIT)
@pytest.mark.parametrize("bias", (False, True), ids=("nobias", "bias"))
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
def test_gpu_half_gemv_blocksizes(cp, blocksize, bias, fmt):
    N, K = 67, 4160  # blocks straddle rows for every blocksize that does not divide 4160
    a_bits, packed, qs, bias_bits = make_case(N, K, 1, fmt, "nf4", blocksize, True, bias, seed=blocksize)
    out = run_gpu(cp, a_bits, fmt, 1, packed, qs, bias_bits, path="half")
    assert rel_error(out, fmt, reference(a_bits, fmt, 1, packed, qs, bias_bits)) < TOLERANCE[fmt]


@pytest.mark.gpu
def test_gpu_half_gemv_staging_sizes_in_any_order(cp):
    # The staged copy of A needs K-dependent dynamic shared memory: a long K after a short one
    # on the same kernel must still get its limit raised (and a short one after a long one fit).
    path = mm._half_path(next(c for c in mm._HALF_CONFIGS if c[3]))
    for K in (96, 8256, 4128, 16384, 640):
        a_bits, packed, qs, bias_bits = make_case(24, K, 1, "float16", seed=K)
        out = run_gpu(cp, a_bits, "float16", 1, packed, qs, bias_bits, path=path)
        assert rel_error(out, "float16", reference(a_bits, "float16", 1, packed, qs, bias_bits)) < TOLERANCE["float16"]


@pytest.mark.gpu
def test_gpu_half_gemv_is_the_default_for_one_16bit_token(cp, monkeypatch):
    # matmul_4bit_bits and the prepared launch both run gemv_4bit_half at M = 1 with fp16 or
    # bf16 (and not at M = 2, with float32, or with K % 32 != 0).
    ran = []
    real = mm._half_launch
    monkeypatch.setattr(mm, "_half_launch", lambda *a, **k: ran.append((a[1], a[2])) or real(*a, **k))
    for M, fmt, K in ((1, "float16", 256), (2, "float16", 256), (1, "bfloat16", 256), (1, "float32", 256),
                      (1, "float16", 240)):  # fmt: skip
        a_bits, packed, qs, bias_bits = make_case(40, K, M, fmt, seed=M)
        out = run_gpu(cp, a_bits, fmt, M, packed, qs, bias_bits)
        assert rel_error(out, fmt, reference(a_bits, fmt, M, packed, qs, bias_bits)) < TOLERANCE[fmt]
    assert ran == [("float16", 1), ("bfloat16", 1)]
    a_bits, packed, qs, bias_bits = make_case(40, 256, 1, "bfloat16", seed=1)
    _, gp, gqs, _ = to_gpu(cp, a_bits, packed, qs, bias_bits)
    before = len(ran)
    assert mm.prepare_fused("bfloat16", 1, gp, gqs, True) is not None
    assert ran[before:] == [("bfloat16", 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("path", HALF_PATHS)
def test_gpu_half_gemv_fp16_overflow_falls_back(cp, path):
    # Activations of +-10000 against positive weights near their block's absmax: the eight
    # products one fp16 accumulator half sums in a chunk (elements 0, 4, .., 28) overflow
    # fp16 (> 65504), while the row sums (chunks of opposite sign cancel) stay finite. The
    # kernel must redo those chunks in float32, not return inf.
    N, K = 16, 128
    rng = np.random.default_rng(5)
    W = rng.uniform(0.8, 1.0, (N, K)).astype(np.float32)
    packed, qs = cq.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    x = (10000.0 * np.where((np.arange(K) // 32) % 2 == 0, 1.0, -1.0)).astype(np.float32)
    a_bits = ref.from_float32(x, "float16")
    packed = packed.reshape(-1)
    weight = np.empty(N * K, dtype=np.float32)
    dequantize_4bit_bits(packed, _as_float32(qs), weight)
    eight = (weight.reshape(N, K // 32, 8, 4)[..., 0] * x.reshape(K // 32, 8, 4)[None, :, :, 0]).sum(axis=-1)
    assert np.abs(eight).max() > 65504  # some chunk's fp16 sum overflows
    expected = reference(a_bits, "float16", 1, packed, qs, None)
    assert 1000 < np.abs(expected).max() < 65504  # the answer itself fits fp16
    out = run_gpu(cp, a_bits, "float16", 1, packed, qs, None, path=path)
    assert rel_error(out, "float16", expected) < TOLERANCE["float16"]


def activation_range_case(N, K, magnitude):
    """One fp16 token of activations around ``magnitude`` against weights that keep the
    outputs near 1: (a_bits, packed, QuantState, reference output)."""
    rng = np.random.default_rng(7)
    W = (rng.standard_normal((N, K)) / (magnitude * np.sqrt(K))).astype(np.float32)
    packed, qs = cq.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    packed = packed.reshape(-1)
    a_bits = ref.from_float32((rng.standard_normal(K) * magnitude).astype(np.float32), "float16")
    return a_bits, packed, qs, reference(a_bits, "float16", 1, packed, qs, None)


@pytest.mark.gpu
@pytest.mark.parametrize("path", HALF_PATHS)
@pytest.mark.parametrize("magnitude", (1e-6, 1e-5, 3e-2, 5e3), ids=("1e-6", "1e-5", "3e-2", "5e3"))
def test_gpu_half_gemv_fp16_activation_range(cp, path, magnitude):
    # fp16 activations far from 1 against weights that keep the outputs near 1: tiny ones
    # would make fp16-subnormal products (a NumPy simulation of the kernel's sums without the
    # power-of-two scaling: 4.5e-2 relative error at 1e-6, 5.5e-4 with it); the kernel
    # multiplies them by a power of two first, and the sums back. Large ones (5e3) may overflow
    # an 8-product sum, which is then redone in float32.
    a_bits, packed, qs, expected = activation_range_case(40, 4160, magnitude)
    out = run_gpu(cp, a_bits, "float16", 1, packed, qs, None, path=path)
    assert rel_error(out, "float16", expected) < TOLERANCE["float16"]


@pytest.mark.gpu
@pytest.mark.parametrize("magnitude", (1.0, 1e-6, 3e-2, "outlier"))
def test_gpu_half_gemv_deferred_guard_same_bits(cp, magnitude):
    # The staged builds read fp16's range guard after their first batch and, where it scales
    # A (k != 0), multiply that batch again on the rescaled copy; the unstaged build of the
    # same configuration reads it first and scales A as it loads it. The sums are the same
    # either way: the same bits. (N, K) = (40, 4160): warps past N, three batches a warp.
    # "outlier": one activation of 3 among ones of 1e-3 (k = 0).
    scale = 1e-3 if magnitude == "outlier" else magnitude
    a_bits, packed, qs, expected = activation_range_case(40, 4160, scale)
    if magnitude == "outlier":
        a_bits[1234] = ref.from_float32(np.array([3.0], np.float32), "float16")[0]
        expected = reference(a_bits, "float16", 1, packed, qs, None)
    outs = [run_gpu(cp, a_bits, "float16", 1, packed, qs, None, path=path) for path in ("half-4x2c2s", "half-4x2c2")]
    np.testing.assert_array_equal(outs[0].view(np.uint16), outs[1].view(np.uint16))
    assert rel_error(outs[0], "float16", expected) < TOLERANCE["float16"]


def test_forced_small_kernel_paths_refuse_more_than_16_tokens(monkeypatch):
    # gemm_4bit_small's forced variants would otherwise fall back to gemm_4bit_mma, which
    # reads A row-major while a fragment-order copy was made.
    monkeypatch.setattr(mm, "_sm_count", lambda: 132)
    for path in ("mma-frag", "mma-w8", "mma-rt1"):
        with pytest.raises(ValueError, match=f"path '{path}' forces gemm_4bit_small, which takes up to 16 tokens"):
            mm._mma_launch(None, "float16", 17, 300, 640, None, None, None, None, path=path)


def test_small_early_rule(monkeypatch):
    # gemm_4bit_small's EARLY kernel (first batch before the byte table): 8-warp CTAs with K >=
    # 8192 (run 41 of NOTES_matmul_4bit.md: it wins there, loses on K = 4096 and would cost
    # 4-warp CTAs their fourth CTA an SM); at 9..16 tokens 8-warp CTAs take 4-segment batches
    # where that is a warp's whole share (then EARLY) or, tiled, its shares are whole batches
    # (run 62).
    monkeypatch.setattr(mm, "_sm_count", lambda: 132)
    batch = mm._SMALL_BATCH_TWO_TILES
    small = "gemm_4bit_small<{}, {}, "
    assert mm._pick_mma(16, 8192, 28672, frag=True)[0] == small + "2, 2, true, 8, false, true>"
    assert mm._pick_mma(16, 8192, 28672, tiled=True)[0] == small + f"2, 2, false, 8, true, false, {batch}>"
    assert mm._pick_mma(2, 28672, 8192, warps=8, tiled=True)[0] == "gemm_4bit_small<{}, {}, 1, 2, false, 8, true, true>"
    assert mm._pick_mma(16, 28672, 8192, frag=True)[0] == small + "2, 2, true, 8, false, true>"
    assert mm._pick_mma(16, 4096, 11008, tiled=True)[0] == small + "2, 2, false, 8, true, true>"  # 11 segments
    assert mm._pick_mma(16, 28672, 8192, frag=True, warps=4)[0] == "gemm_4bit_small<{}, {}, 2, 2, true, 4>"
    # 4096 x 4096: K split 8 ways, 4 segments a warp, one batch
    assert mm._pick_mma(16, 4096, 4096)[0] == small + f"2, 2, false, 8, false, true, {batch}>"
    assert mm._pick_mma(12, 4096, 4096, tiled=True)[0] == small + f"2, 2, false, 8, true, true, {batch}>"
    # 8192 x 4096: the same share on 256 CTAs, more than one an SM: the last segment is
    # requested once the first is multiplied
    assert mm._pick_mma(16, 8192, 4096, tiled=True)[0] == small + f"2, 2, false, 8, true, true, {batch}, true>"
    assert mm._pick_mma(16, 8192, 4096)[1:5] == (2, 1, 8, 256)
    assert mm._pick_mma(8, 4096, 4096, warps=8)[0] == "gemm_4bit_small<{}, {}, 1, 1, false, 8>"
    assert mm._pick_mma(2, 14336, 4096, warps=8, tiled=True)[0] == "gemm_4bit_small<{}, {}, 1, 2, false, 8, true>"
    expressions = set(mm._kernel_expressions("gemm_4bit.cu"))
    assert "gemm_4bit_small<MmaBFloat16, true, 2, 2, true, 8, false, true>" in expressions
    assert "gemm_4bit_small<MmaHalf, false, 1, 1, false, 8, true, true>" in expressions
    for frag in (False, True):
        for tiled in (False, True):
            for M, N, K in ((16, 4096, 4096), (16, 8192, 4096), (16, 28672, 8192)):
                expr = mm._pick_mma(M, N, K, frag=frag, tiled=tiled)[0]
                assert expr.format("MmaBFloat16", "true") in expressions, expr


def test_small_schedule():
    batch = mm._SMALL_BATCH_TWO_TILES
    for tiled in (False, True):
        assert mm._small_schedule(2, 2, 8, 4096, batch, tiled) == (True, batch)  # the whole share in one batch
        assert mm._small_schedule(2, 2, 8, 4096, 3, tiled) == (True, batch)  # less than a batch: still early
        assert mm._small_schedule(2, 2, 4, 8192, 64, tiled) == (False, 0)  # 4 warps: as before
        assert mm._small_schedule(2, 1, 8, 8192, 64, tiled) == (True, 0)  # one row tile: the default batch is 4
        assert mm._small_schedule(1, 2, 8, 8192, 64, tiled) == (True, 0)  # 1..8 tokens
        assert mm._small_schedule(1, 2, 8, 4096, 64, tiled) == (False, 0)
        assert mm._small_schedule(2, 2, 8, 11008, 11, tiled) == (True, 0)  # segments past the last batch
    assert mm._small_schedule(2, 2, 8, 8192, 8 * batch, True) == (False, batch)  # tiled, whole batches
    assert mm._small_schedule(2, 2, 8, 8192, 8 * batch, False) == (True, 0)  # row-major: as before


@pytest.mark.gpu
@pytest.mark.parametrize("tiled", (False, True), ids=("row-major", "tiled"))
@pytest.mark.parametrize("M", (2, 8, 16))
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
def test_gpu_small_early_same_bits(cp, monkeypatch, tiled, M, fmt):
    # EARLY only moves the first batch's loads before the table, BATCH only how many segments
    # are in flight, and LAST_AFTER_MULTIPLY only when a short share's last segment is
    # requested: the same bits, on 8-warp CTAs whose warps have several whole
    # batches (K = 8192 and more, split 8 ways at most), one (K = 4096) or fewer segments than
    # a batch of 4 (K = 384 / 320, unsplit), one or two row tiles a warp, and a last batch cut
    # short or (row-major, K % 128 = 64) a segment K cuts. At 16 tokens the short builds
    # (BATCH 4) sum a split over all 8 warps with every partial loaded first (ksplit_store),
    # the others in cta_ksplit_sum's loop: K = 4096 is split 8 ways, so the two are compared
    # there. (At 2..8 tokens these builds all take ksplit_store at that split;
    # test_gpu_one_token_tile_split_sum_same_bits compares it with the loop.)
    shapes = (((272, 8192), (144, 8320), (272, 4096), (144, 384)) if tiled
              else ((272, 8192), (48, 8256), (272, 4096), (48, 320)))  # fmt: skip
    paths = ("mma-w8", "mma-rt2") if tiled and M <= 8 else ("mma-w8",)  # (8 warps either way)
    batch4 = mm._SMALL_BATCH_TWO_TILES  # built for 9..16 tokens only
    schedules = [(False, 0, False), (True, 0, False)] + (
        [(False, batch4, False), (True, batch4, False), (True, batch4, True)] if M > 8 else [])
    splits = set()
    for (N, K), path in ((shape, path) for shape in shapes for path in paths):
        a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, seed=M + N)
        ga, gp, gqs, gb = to_gpu(cp, a_bits, packed, qs, bias_bits)
        data = cq.tile_4bit(gp, gqs).data if tiled else gp
        rt, frag = mm._SMALL_PATH_RT.get(path), mm._frag_default(M, N)
        outs = []
        for early, batch, after in schedules:
            monkeypatch.setattr(mm, "_small_schedule", lambda *_, e=early, b=batch: (e, b))
            monkeypatch.setattr(mm, "_small_last_after_multiply", lambda _, a=after: a)
            kernel, tiles, _, ksplit, _, warps = mm._pick_mma(M, N, K, rt, frag=frag, warps=8, tiled=tiled)
            splits.add(ksplit)
            flags = (f", {str(tiled).lower()}, {str(early).lower()}, {batch}{', true' if after else ''}" if batch
                     else f", {str(tiled).lower()}, true" if early else mm._TILED_ARG[tiled])  # fmt: skip
            used_rt = rt or int(kernel.split(", ")[3])
            assert warps == 8 and kernel == (f"gemm_4bit_small<{{}}, {{}}, {tiles}, {used_rt}, "
                                             f"{str(frag).lower()}, 8{flags}>")  # fmt: skip
            # NaN bit patterns in the storage dtype, so that an unwritten output shows
            out = cp.full(M * N, 0x7E00 if fmt == "float16" else 0x7FC0, dtype=np.uint16)
            mm._matmul_fused(ga, fmt, M, N, K, data, gqs, gb, out.view(ga.dtype), path=path, tiled=tiled)
            outs.append(cp.asnumpy(out))
        for other in outs[1:]:
            np.testing.assert_array_equal(other, outs[0])
        result = outs[0].view(np.float16) if fmt == "float16" else outs[0]
        assert rel_error(result, fmt, reference(a_bits, fmt, M, packed, qs, bias_bits)) < TOLERANCE[fmt], (N, K, path)
    assert 8 in splits  # a split over all 8 warps was among the cases


@pytest.mark.gpu
@pytest.mark.parametrize("tiled", (False, True), ids=("row-major", "tiled"))
@pytest.mark.parametrize("M", (2, 5, 8))
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
def test_gpu_one_token_tile_split_sum_same_bits(cp, tiled, M, fmt):
    # Up to 8 tokens on 8 warps, K split over all 8: the builds reading A row-major sum the
    # split from partials loaded at once, spread over the warps (ksplit_store); those reading
    # it in fragment order in cta_ksplit_sum's loop. The adds are the same, in the same
    # order: the same bits, for one and two row tiles a warp (4 and 8 registers, fewer than
    # the warps or as many), rows past N, and (row-major) a last segment that K cuts.
    shapes = ((208, 4096), (272, 4096)) if tiled else ((200, 4096), (272, 4160))
    for (N, K), rt in ((shape, rt) for shape in shapes for rt in (1, 2)):
        a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, seed=M + N + rt)
        ga, gp, gqs, gb = to_gpu(cp, a_bits, packed, qs, bias_bits)
        data = cq.tile_4bit(gp, gqs).data if tiled else gp
        outs = []
        for frag in (False, True):
            kernel, _, _, ksplit, _, warps = mm._pick_mma(M, N, K, rt, frag=frag, warps=8 if tiled else None,
                                                          tiled=tiled)  # fmt: skip
            assert (ksplit, warps) == (8, 8) and kernel.startswith(f"gemm_4bit_small<{{}}, {{}}, 1, {rt}, "
                                                                   f"{str(frag).lower()}, 8")  # fmt: skip
            out = cp.full(M * N, 0x7E00 if fmt == "float16" else 0x7FC0, dtype=np.uint16)
            path = f"mma-frag-rt{rt}" if frag else f"mma-rt{rt}"
            mm._matmul_fused(ga, fmt, M, N, K, data, gqs, gb, out.view(ga.dtype), path=path, tiled=tiled)
            outs.append(cp.asnumpy(out))
        np.testing.assert_array_equal(outs[0], outs[1])
        result = outs[0].view(np.float16) if fmt == "float16" else outs[0]
        assert rel_error(result, fmt, reference(a_bits, fmt, M, packed, qs, bias_bits)) < TOLERANCE[fmt], (N, K, rt)


def test_half_config_rejects_unbuilt():
    for config in mm._HALF_CONFIGS:
        assert mm._half_config(mm._half_path(config), 64, 64) == config
    with pytest.raises(ValueError, match=r"gemv_4bit_half is built for .* got \(3, 3, 3, False\)"):
        mm._half_config("half-3x3c3", 64, 64)


def test_half_pick_rule():
    # 132 SMs with 228 KB each (H100): the measured best of run 17 on the four benchmark shapes.
    smem = 228 * 1024
    assert mm._half_pick(4096, 4096, 132, smem) == (2, 2, 3, True)
    assert mm._half_pick(11008, 4096, 132, smem) == (4, 1, 3, True)
    assert mm._half_pick(28672, 8192, 132, smem) == (2, 2, 3, True)
    assert mm._half_pick(8192, 28672, 132, smem) == (4, 2, 2, True)  # 56 KB of staged A: 2 CTAs an SM
    assert mm._half_pick(8192, 65536, 132, smem) == (4, 2, 2, False)  # 128 KB of A: not staged
    for N in (1, 37, 4096, 11008, 28672):
        for K in (32, 4096, 28672, 40960, 1 << 20):
            assert mm._half_pick(N, K, 132, smem) in mm._HALF_CONFIGS


def test_frag_default_rule():
    # Fragment order at 9..16 tokens on weights of >= 8192 rows (run 19), never at 1..8 or 17+.
    assert mm._frag_default(9, 8192) and mm._frag_default(16, 28672)
    assert not mm._frag_default(8, 28672) and not mm._frag_default(17, 28672)
    assert not mm._frag_default(16, 4096)


@pytest.mark.gpu
@pytest.mark.parametrize("M", (9, 13, 16))
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
def test_gpu_frag_is_the_default_at_9_to_16_tokens_on_wide_weights(cp, monkeypatch, M, fmt):
    # The default dispatch copies A into fragment order (N >= _FRAG_MIN_N, K cut inside a
    # segment), and the prepared launch declines those shapes (the copy needs a buffer a call).
    ran = []
    real = mm._fragment_order
    monkeypatch.setattr(mm, "_fragment_order", lambda *a: ran.append(a[1:]) or real(*a))
    N, K = mm._FRAG_MIN_N + 24, 352
    a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, seed=M)
    out = run_gpu(cp, a_bits, fmt, M, packed, qs, bias_bits)
    assert rel_error(out, fmt, reference(a_bits, fmt, M, packed, qs, bias_bits)) < TOLERANCE[fmt]
    assert ran == [(M, K, 2)]
    _, gp, gqs, _ = to_gpu(cp, a_bits, packed, qs, bias_bits)
    assert mm.prepare_fused(fmt, M, gp, gqs, True) is None


def test_mma_warps_rule(monkeypatch):
    # 8 warps a CTA where the 8-warp grid is one wave and either 4 warps with K split 4 ways
    # leave fewer than the target warps an SM (run 21) or 9..16 tokens meet K >= 8192 (run
    # 42); (token tiles, chunks, ksplit, CTAs, warps).
    monkeypatch.setattr(mm, "_sm_count", lambda: 132)
    assert mm._pick_mma(16, 4096, 4096)[1:] == (2, 1, 8, 128, 8)
    assert mm._pick_mma(4, 4096, 4096)[1:] == (1, 1, 8, 256, 8)
    assert mm._pick_mma(16, 8192, 28672)[1:] == (2, 1, 8, 256, 8)
    assert mm._pick_mma(16, 11008, 4096)[1:] == (2, 1, 4, 344, 4)  # 8 warps: 344 CTAs, 1.3 waves
    assert mm._pick_mma(16, 28672, 8192)[1:] == (2, 1, 2, 224, 8)  # K >= 8192: 8 warps, one wave
    assert mm._pick_mma(8, 28672, 8192)[1:] == (1, 1, 2, 448, 4)  # 1..8 tokens: 4 warps reach the target
    assert mm._pick_mma(16, 14336, 4096)[-1] == 4  # K < 8192: 4 warps reach the target
    assert mm._pick_mma(16, 128256, 8192)[-1] == 4  # 8 warps: 501 CTAs, two waves
    assert mm._pick_mma(16, 4096, 4096, warps=4)[1:] == (2, 1, 4, 128, 4)
    assert mm._pick_mma(40, 4096, 4096)[-1] == 4  # gemm_4bit_mma: always 4


def test_small_chunks_rule(monkeypatch):
    # 17..32 tokens on weights of up to 8192 x 8192 run gemm_4bit_small in 16-token chunks
    # (run 107); (token tiles, chunks, ksplit, CTAs, warps) as measured.
    monkeypatch.setattr(mm, "_sm_count", lambda: 132)
    for M in (17, 24, 32):
        assert mm._small_chunks_default(M, 4096, 4096) and mm._small_chunks_default(M, 8192, 8192)
        assert mm._small_chunks_default(M, 272, 640)
        assert not mm._small_chunks_default(M, 11008, 4096) and not mm._small_chunks_default(M, 4096, 11008)
    assert not mm._small_chunks_default(16, 4096, 4096) and not mm._small_chunks_default(33, 4096, 4096)
    small = "gemm_4bit_small<{}, {}, "
    assert mm._pick_mma(24, 4096, 4096, warps=4, chunked=True) == (small + "2, 2, false, 4>", 2, 2, 4, 256, 4)
    assert mm._pick_mma(32, 8192, 8192, warps=4, chunked=True)[1:] == (2, 2, 4, 512, 4)
    batch = mm._SMALL_BATCH_TWO_TILES
    tiled = mm._pick_mma(32, 4096, 4096, tiled=True, chunked=True)
    assert tiled == (small + f"2, 2, false, 8, true, true, {batch}, true>", 2, 2, 8, 256, 8)
    assert mm._pick_mma(64, 4096, 4096, warps=4, chunked=True)[1:3] == (2, 4)  # forced: any M, 16 tokens a chunk
    with pytest.raises(ValueError, match='takes up to 16 tokens a CTA, got M = 17 .*"mma-chunks"'):
        mm._mma_launch(None, "float16", 17, 64, 256, None, None, None, None, path="mma-rt2")
