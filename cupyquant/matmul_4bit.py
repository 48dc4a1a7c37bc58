"""4-bit matrix products: ``out = A @ dequantize(B)^T (+ bias)`` on packed NF4/FP4 weights.

``B`` is the packed weight of an (N, K) matrix quantized with :func:`quantize_4bit`
(``quant_state.shape == (N, K)``, bitsandbytes layout); ``A`` is (..., K).

Semantics (the NumPy path, the spec): dequantize W to float32 (``code[q] * absmax``),
multiply in float32, add the bias in float32, round once to A's format.

CuPy arrays take one of four paths, picked per call from M (the number of rows of A)
without any host synchronisation, so every path can be captured in a CUDA graph:

* fused tensor-core kernels (``rawkernels/gemm_4bit.cu``): fp16 / bf16 activations from two
  rows, K % 32 == 0, 16-byte aligned A and B, M <= :func:`fused_max_m`. The weight is
  dequantized in registers to A's format (``code[q]`` and the block's scale each rounded to
  it, then multiplied there), products are accumulated in float32. Up to 16 tokens
  ``gemm_4bit_small``; above, ``gemm_4bit_tile`` (activations staged in shared memory and
  shared by a CTA's 64-128 weight rows; ``gemm_4bit_tile_split`` splits K across CTAs,
  summing the partials in a fixed order, where the rows are few and K long) for wide
  weights, ``gemm_4bit_mma`` for narrow ones. On an H100 / H200, from 33 tokens on weights
  of 4096+ rows, ``gemm_4bit_wgmma`` (``rawkernels/gemm_4bit_wgmma.cu``: Hopper's warpgroup
  MMA, activations read by the tensor cores from shared memory, a warp of its own fetching
  the scales, K split likewise where the rows leave SMs idle; 64 tokens a CTA on one
  warpgroup, or two at their own split where that pays (``_wgmma_default_split``); above
  64 tokens, mostly 128 or 256 tokens a CTA on two warpgroups; on 256-token CTAs the TMA
  unit copies the activations, one tensor copy a stage).
* one fp16 / bf16 token (M = 1, K % 32 == 0, aligned): ``gemv_4bit_half``
  (``rawkernels/gemv_4bit.cu``) on CUDA cores: the byte table's code pairs in A's format
  times the activations, summed in A's format over each 32-element chunk (8 products a
  half; a chunk that overflows is redone in float32), then scaled and summed in float32.
  On a tiled weight (:mod:`cupyquant.tiled_4bit`) ``gemv_4bit_tiled``: the same arithmetic,
  a warp reading whole 1 KB tiles; on weights whose one-strip CTAs fit two an SM in one
  wave (4096 x 4096, 2048 x 4096, 4096 x 11008) with the byte table in 256-byte entries,
  which saves an instruction a packed byte (``_tgemv_wide``).
* fused CUDA-core GEMV (``rawkernels/gemv_4bit.cu``): everything else with
  M <= :func:`fused_max_m` (float32 activations, any K, unaligned arrays); dequantizes in
  float32 exactly as the reference and accumulates in float32. A tiled weight is read in
  place (an unaligned A is copied first).

The cuBLAS call goes through ctypes to the libcublas CuPy loaded, on CuPy's handle and the
current stream, because CuPy's binding refuses to run during stream capture.

Some calls take temporaries from CuPy's current memory pool, in stream order: A in fragment
order (9..16 tokens on wide weights), the split-K workspace, the dequantized weight. A CUDA
graph captured through this API keeps their addresses, so keep those blocks from being
handed out again while the graph lives (capture with a pool of its own, or hold the pool's
memory; the torch adapter's graphs use torch's graph pool and need nothing).
* dequantize + cuBLAS for larger M: W is dequantized to A's format (as
  :func:`dequantize_4bit` does) and multiplied by cublasGemmEx with float32 compute; a bias
  is pre-broadcast into the output and added by the GEMM (beta = 1), so it is rounded once.
"""

from __future__ import annotations

import ctypes
import functools
import re
import threading
from typing import Any

import numpy as np

from . import _cublas, _tensor_map, _xp
from . import _reference as ref
from .blockwise import _check_array, _gpu_scales, check_state_4bit, dequantize_4bit_bits
from .quant_state import QuantState
from .tiled_4bit import Tiled4bit, untile_bytes

__all__ = ["matmul_4bit", "gemv_4bit", "matmul_4bit_bits", "fused_max_m", "prepare_fused", "FusedLaunch"]

# Largest M at which the fused kernels beat dequantize + cuBLAS, from the sweeps in
# benchmarks/NOTES_matmul_4bit.md (NF4 bs64 nested, fp16; shapes 4096x4096, 11008x4096,
# 28672x8192, 8192x28672). us: fused vs dequantize + cuBLAS, graph replay.
# * "tc-tile" (fp16 / bf16, K % 32 == 0, N >= _TILE_MIN_N; gemm_4bit_small up to 16 tokens,
#   gemm_4bit_tile above (gemm_4bit_wgmma from 33 tokens on an H100 / H200, run 35, which
#   moved no switch point); H100, run 4): wins at M = 192 on 28672x8192 (350 vs 387) and
#   11008x4096 (63 vs 81), ties on 8192x28672 (392 vs 394); loses at M = 256 on all three
#   (444 vs 402, 103 vs 82, 385 vs 391 is a tie).
# * "tc" (the same formats, N < _TILE_MIN_N; gemm_4bit_mma above 16 tokens): wins at M = 32
#   (17.4 vs 25.5 at 4096x4096, H100 run 4; 17.0 vs 23.3 on the H200), loses at M = 64
#   (27.0 vs 25.8).
# * "tc-wgmma" (the same, _WGMMA_MIN_N <= N < _TILE_MIN_N and K < _WGMMA_LONG_K, on an H100 /
#   H200: gemm_4bit_wgmma from 33 tokens, 128 tokens a CTA above 64; H100 run 36): wins at
#   M = 128 (4096x4096: 24.6 vs 26.9), loses at M = 160 (32.4 vs 30.1; 256 tokens a CTA
#   would take 35.8 there, run 39). Also for _WGMMA_NARROW_MIN_N <= N < _WGMMA_MIN_N with K
#   >= _WGMMA_NARROW_MIN_K (H100 run 113): wins at M = 128 (2048x8192 27.0 vs 29.8, 3072x8192
#   31.5 vs 47.0, 2560x10240 33.0 vs 49.2); larger M not measured there.
# * "tc-wgmma-256" (the same, N >= _WGMMA_MIN_N and K >= _WGMMA_LONG_K, or N >= _TILE_MIN_N,
#   on an H100 / H200: gemm_4bit_wgmma, 256 tokens a CTA from 129 where _wgmma_tokens says
#   so; H100 run 39): wins at M = 256 (28672x8192: 280 vs 402, 8192x28672: 231 vs 392,
#   4096x14336: 77 vs 113, 5120x13824: 91 vs 127, 11008x4096: 76 vs 82, 14336x4096 and
#   13824x5120 on the one-chunk grid of 192 tokens: 72 vs 103, 86 vs 125); lost at M = 512
#   on 28672x8192 (558 vs 546: a second 256-token chunk) before the activations' bulk copies,
#   so the range stopped at 256 ("tc-wgmma-512" below moves it where they win). (Run 36,
#   before 256-token CTAs: K >= 8192 only, up to 256; 11008x4096 lost at 224 then.)
# * "gemv" with float32 activations (CUDA-core kernel; H200): wins at M = 4 (63 vs 67 us at
#   4096x4096, 569 vs 795 us at 28672x8192), loses at M = 8.
# * "gemv" with fp16 / bf16 (K % 32 != 0 or unaligned arrays; H200): wins at M = 1 (9.2 vs
#   22.8 us at 4096x4096), loses at M = 2 there (28.9 vs 22.6 us, measured with K % 32 == 0;
#   the general path for odd K is slower still).
# * "tc-wgmma-512" (the same, N >= _TILE_MIN_N and K >= _WGMMA_LONG_K, where 512 tokens on
#   256-token CTAs fill _WGMMA_FULL_WAVES of their waves, _wgmma_fills_waves; H100 run 49, the
#   activations' bulk copies from an image pass, two m64n128k16 a k slice): wins at 320..512
#   on 8192x28672 (393 / 383 / 378 at 320 / 384 / 512 vs 403 / 418 / 486) and 8192x8192 (118
#   / 126 vs 124 / 153 at 320 / 512), at 384..512 on 28672x8192 (452 / 512 vs 477 / 550; 449
#   vs 436 at 320, a near tie; 456-490 with one m64n256k16), loses at 640 on all three (731 /
#   748 / 232 vs 664 / 556 / 174). Where the grid leaves SMs idle it loses at 512: 11008x4096
#   (172 CTAs on 132 SMs: 128 vs 106), 5120x13824 (80 CTAs: 188 vs 161).
_FUSED_MAX_M = {"tc": 32, "tc-wgmma": 128, "tc-wgmma-256": 256, "tc-wgmma-512": 512, "tc-tile": 192,
                "gemv-float32": 4, "gemv-16bit": 1}  # fmt: skip
_WGMMA_FULL_WAVES = 0.8
_WGMMA_LONG_K = 8192
# Weights with at least this many rows run 17.."tc-tile" tokens on gemm_4bit_tile (64 * rt
# weight rows a CTA; gemm_4bit_tile_split where K is long and the rows few, see
# _tile_default); narrower ones on gemm_4bit_mma, whose split-K fills the SMs. (On an H100 /
# H200 both give way to gemm_4bit_wgmma from 33 tokens where _wgmma_default says so.)
# H100, run 4: 8192 rows (128 CTAs) win (8192x28672 at 32 tokens: 143 vs 207 us); 4096 rows
# (64 CTAs) lose to gemm_4bit_mma at 32 tokens (24.6 vs 17.5 us with the best tile shape).
_TILE_MIN_N = 8192

# Tensor-core kernel geometry (gemm_4bit.cu): 4 warps a CTA, 16-row tiles, 128-element
# segments, 4 segments' weights in flight a warp (gemm_4bit_small / gemm_4bit_mma).
_MMA_WARPS = 4
_MMA_SEGMENT = 128
_MMA_IN_FLIGHT = 4
_MMA_TOKEN_TILES = (1, 2, 4, 8)  # n8 token tiles a CTA: up to 8, 16, 32, 64 tokens
# gemm_4bit_tile: activation stages in shared memory (kTileStages), and the (token tiles a
# CTA, row tiles a warp) instantiated.
_TILE_STAGES = 4
_TILE_CONFIGS = ((4, 1), (4, 2), (8, 1), (8, 2))
# CUDA-core GEMV geometry (gemv_4bit.cu): 4 warps a CTA, 4 weight rows a warp at one
# activation row; at 2..4 (4 a CTA, each lane reads 32 activations a row per 16 weight
# bytes) 4, or 8 where that still gives every SM a CTA: more weight rows a warp share each
# activation load. Same bits at any count. H100, float32, us at 2 / 4 rows (runs 44-45 of
# NOTES_matmul_4bit.md), 2 weight rows a warp / 4 / 8: 28672 x 8192 556 / 575, 299 / 325,
# 300 / 305; 8192 x 28672 600 / 606, 435 / 443, 258 / 262; 11008 x 4096 115.6 / 115.8,
# 69.1 / 70.0, 57.7 / 58.4; 4096 x 4096 (128 CTAs of 8 rows) 63.0 / 63.7, 26.3 / 26.7,
# 29.2 / 32.0. (8 rows keep ~400 bytes a thread in local memory at the 168-register cap;
# measured with that.)
_GEMV_WARPS = 4
_GEMV_ROWS = 4
_GEMV_ROWS_WIDE = 8
# gemm_4bit_stage: (token tiles, row tiles a warp, weight stages a warp, segments a stage,
# warps a CTA) instantiated; a stage holds `chunk` segments of the warp's 16 * rt rows
# (1 KB * rt * chunk); the warps of a CTA share one byte table. The default (first entry)
# runs 1..8 tokens where the weight has >= 3 row tiles an SM and K >= _STAGE_MIN_K: H100,
# run 8 of NOTES_matmul_4bit.md, at 1 / 2 / 4 / 8 tokens 28672 x 8192 60.1 / 62.0 / 65.4 /
# 70.1 us against 66.7 / 67.8 / 69.1 / 72.2 for gemm_4bit_small, 8192 x 28672 57.9 / 59.7 /
# 61.7 / 64.6 against 76.0 / 75.9 / 75.9 / 76.9; at K = 4096 gemm_4bit_small stays faster
# (11008 x 4096: 15.0 against 18.6 us at one token). Up to 16 tokens (2 token tiles) the
# stage kernels lost everywhere (28672 x 8192: 98.4-101.4 against 86.3) and are not built;
# nor is the 4-warp, 3-stage configuration (as fast at 8192 x 28672, slower at 28672 x 8192).
_STAGE_CONFIGS = ((1, 2, 2, 2, 8),)
_STAGE_MIN_K = 8192
_STAGE_MIN_ROW_TILES_PER_SM = 3
# gemv_4bit_half (one fp16 / bf16 token; CUDA cores, 16-bit sums a chunk): (rows a warp, chunks a row
# in flight, CTAs an SM the registers are bounded for, A staged in shared memory)
# instantiated; 8 warps a CTA, flat chunk indices in 32 bits (N * K < 2^37). The staged
# configurations are picked by _half_pick; the unstaged one serves K too long to stage.
_HALF_CONFIGS = ((2, 2, 3, True), (4, 1, 3, True), (4, 2, 2, True), (4, 2, 2, False))
_HALF_WARPS = 8
_HALF_STATIC_SMEM = 4 * (256 * 32 + 256 + 8)  # byte table, nested code (plain: unused), warp maxima
_CTA_RESERVED_SMEM = 1024  # shared memory the driver reserves a CTA (sm_80 and later)
_HALF_MAX_ELEMENTS = 1 << 37
# gemv_4bit_tiled (one fp16 / bf16 token on a tile-ordered weight, gemv_4bit.cu): (16-row
# strips a CTA, tiles a warp in flight, CTAs an SM the registers are bounded for)
# instantiated; 8 warps a CTA (8 / strips warps a strip), A always staged (2K bytes). The
# pick is _tgemv_pick.
_TGEMV_CONFIGS = ((1, 2, 3), (1, 3, 2), (2, 2, 3), (2, 3, 2), (4, 4, 2))
_TGEMV_STATIC_SMEM = _HALF_STATIC_SMEM + 4 * 16 * _HALF_WARPS  # and the strips' part sums
# gemv_4bit_tiled's WIDE build (the byte table in 256-byte entries, in dynamic shared memory:
# one instruction a packed byte fewer) is instantiated for this configuration; _tgemv_wide
# picks it.
_TGEMV_WIDE_CONFIG = (1, 2, 3)
_TGEMV_WIDE_TABLE = 256 * 256  # bytes (the kernel's kWideTableBytes)
_TGEMV_WIDE_STATIC_SMEM = _TGEMV_STATIC_SMEM - 4 * 256 * 32 + 16  # its static table is a stub
# The tiles a warp of gemv_4bit_tiled requests before its prologue in the PROLOGUE_FIRST builds
# with a short prologue (the kernel's AHEAD): bf16's, which have no range guard, and the wide
# ones, which read fp16's guard after their first batch; the other fp16 builds request all
# UNROLL. H100, us, one token, all / 1: bf16 (run 48 of NOTES_matmul_4bit.md) 4096 x 4096
# 6.71-6.75 / 6.43-6.48, 11008 x 4096 12.12-12.13 / 11.83-11.84, 4096 x 11008 12.88 /
# 12.66-12.69, fp16 6.48 / 6.70-6.72; fp16 on the wide build (run 137) 4096 x 4096 6.15 /
# 6.04, 4096 x 11008 12.26 / 11.97.
_TGEMV_SHORT_PROLOGUE_AHEAD = 1
# gemm_4bit_small reads A in fragment order (permute_fragments runs first, a copy of A a
# call) at 9..16 tokens on weights of at least _FRAG_MIN_N rows: each 16-byte activation load
# of a warp then covers 16 sectors, not 32 (ncu, 28672 x 8192 at 16 tokens: L1 throughput
# 90%, global sectors 5.6x the weight's). H100, run 19 of NOTES_matmul_4bit.md, us at 16
# tokens, fragment order / not: 28672 x 8192 69.2 / 86.7, 11008 x 4096 17.5 / 18.8,
# 8192 x 28672 80.0 / 81.1; 4096 x 4096 13.5 / 12.1 (the extra launch costs more than it
# saves there), and at 1..8 tokens it lost on every shape (4096 x 4096: 10.6 / 8.8).
_FRAG_MIN_N = 8192
# gemm_4bit_small's EARLY kernel (the first batch of weights requested before the byte table
# is built) for 8-warp CTAs from this K; H100 run 41 of NOTES_matmul_4bit.md (gemm_4bit.cu).
_SMALL_EARLY_MIN_K = 8192
# Segments a batch of gemm_4bit_small's 8-warp CTAs at 9..16 tokens (two row tiles a warp;
# the kernel's default there is 2): _small_schedule.
_SMALL_BATCH_TWO_TILES = 4
# The forced paths of gemm_4bit_small (_mma_launch; each built for tiled weights too): row tiles
# a warp, warps a CTA, or A in fragment order ("mma-frag*").
_SMALL_PATH_RT = {"mma-rt1": 1, "mma-rt2": 2, "mma-frag-rt1": 1, "mma-frag-rt2": 2}
_SMALL_PATH_WARPS = {"mma-w4": 4, "mma-w8": 8}
_SMALL_PATHS = ("mma-frag", *_SMALL_PATH_RT, *_SMALL_PATH_WARPS)
# 17..32 tokens as two 16-token chunks of gemm_4bit_small side by side in one grid ("mma-chunks";
# the chunks read the same weights through L2), where the weight has at most these rows and
# columns; 4 warps a CTA on the bitsandbytes layout, the 9..16-token pick on tiles. H100, runs
# 107-108 of NOTES_matmul_4bit.md, us, chunks against the path they replace (gemm_4bit_mma /
# gemm_4bit_tile), row-major / tiled, at 32 tokens: 4096 x 4096 14.3 / 12.3 against 17.6 /
# 17.6, 8192 x 8192 44.9 / 41.7 against 52.0 / 51.3, 2048 x 4096 11.5 / 7.8 against 12.1 /
# 13.4 (every weight measured under the limits gains at 17, 24 and 32 tokens); 11008 x 4096
# loses (32.3-34.0 against 31.0 / 30.3 at 24 / 32). Three chunks (48 tokens) gain on 4096 x
# 4096 only (19.0 against 21.4) and lose on 11008 x 4096 (42.3 against 31.1).
_SMALL_CHUNKS_MAX_M = 32
_SMALL_CHUNKS_MAX_N = 8192
_SMALL_CHUNKS_MAX_K = 8192
_WARPS_PER_SM_TARGET = 12  # warps, each with 4 KB of weights in flight, to cover DRAM latency

# cuBLAS / CUDA enum values (library_types.h, cublas_api.h).
_CUDA_R = {"float32": 0, "float16": 2, "bfloat16": 14}
_ONE = np.ones(1, dtype=np.float32)  # host scalars for cuBLAS (alive for the process)
_ZERO = np.zeros(1, dtype=np.float32)

_GEMV_STRUCT = {"float32": "Float32", "float16": "Float16", "bfloat16": "BFloat16"}
_TILED_ARG = {False: "", True: ", true"}  # the kernels' last template argument, TILED (default false)
_MMA_STRUCT = {"float16": "MmaHalf", "bfloat16": "MmaBFloat16"}


def fused_max_m(fmt: str, N: int, K: int, current_device: bool = True) -> int:
    """The largest M for which the fused kernels beat dequantize + cuBLAS.

    fp16 / bf16 switch points measured on an H100, float32 ones on an H200
    (benchmarks/NOTES_matmul_4bit.md): on an H100 / H200, for weights of at least 4096 rows,
    512 for weights of 8192+ rows with K >= 8192 whose 256-token grid at 512 tokens fills at
    least 80% of its waves of CTAs, else 256 where K >= 8192 or the weight has 8192+ rows,
    else 128, and 128 for weights of 2048..4095 rows with K >= 8192; elsewhere 192 for
    weights of at least 8192 rows, else 32. The torch adapter
    uses it to route its matmuls. ``fmt``: the activation format ("float16", "bfloat16" or "float32");
    ``N``, ``K``: the weight's shape; ``current_device``: count the current CUDA device's own
    kernels (call it in the weight's device context); False gives the switch point every
    device shares (the CPU path's, so that its results do not depend on the host's GPU).
    """
    if fmt not in _xp.FLOAT_FORMATS:
        raise ValueError(f"fmt must be one of {_xp.FLOAT_FORMATS}, got {fmt!r}")
    if fmt == "float32":
        return _FUSED_MAX_M["gemv-float32"]
    if K % 32 != 0:
        return _FUSED_MAX_M["gemv-16bit"]
    if current_device and _wgmma_weight(N, K) and _xp.gpu_available() and _wgmma_supported():
        if N < _WGMMA_MIN_N:  # a narrow weight with long K: measured up to 128 tokens
            return _FUSED_MAX_M["tc-wgmma"]
        wide = N >= _TILE_MIN_N and K >= _WGMMA_LONG_K
        if wide and _wgmma_fills_waves(_FUSED_MAX_M["tc-wgmma-512"], N, K, _sm_count()):
            return _FUSED_MAX_M["tc-wgmma-512"]
        if K >= _WGMMA_LONG_K or N >= _TILE_MIN_N:
            return _FUSED_MAX_M["tc-wgmma-256"]
        return _FUSED_MAX_M["tc-wgmma"]
    if N >= _TILE_MIN_N:
        return _FUSED_MAX_M["tc-tile"]
    return _FUSED_MAX_M["tc"]


@functools.lru_cache(maxsize=4096)
def _wgmma_fills_waves(M: int, N: int, K: int, sms: int) -> bool:
    """Whether M tokens on 256-token gemm_4bit_wgmma CTAs (the default split, for the current
    device's SMs: ``sms`` is its count, the memo's key) fill at least _WGMMA_FULL_WAVES of the
    waves they take on ``sms`` SMs, one CTA an SM."""
    _, _, ctas, ksplit, _ = _pick_wgmma(M, N, K, tokens=256)
    blocks = ctas * ksplit
    return blocks >= _WGMMA_FULL_WAVES * -(-blocks // sms) * sms


def _weight_shape(quant_state: QuantState) -> tuple[int, int]:
    check_state_4bit(quant_state)
    if len(quant_state.shape) != 2:
        raise ValueError(f"B must be a quantized 2-D (N, K) weight, got shape {quant_state.shape}")
    return quant_state.shape


def _check_operands(K: int, quant_state: QuantState) -> tuple[int, int]:
    N, K_w = _weight_shape(quant_state)
    if K != K_w:
        raise ValueError(f"A's last dimension ({K}) must equal the weight's K ({K_w}); weight shape is {(N, K_w)}")
    return N, K_w


def _check_bits(arr: Any, name: str, fmt: str, size: int) -> None:
    want = _xp.storage_dtype(fmt)
    if arr.dtype != want:
        raise ValueError(f"{name} must hold {fmt} values as {want}, got {arr.dtype}")
    if arr.size != size:
        raise ValueError(f"{name} must have {size} elements, got {arr.size}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")


def matmul_4bit_bits(a_bits: Any, fmt: str, M: int, packed: Any, quant_state: QuantState,
                     bias_bits: Any = None, out_bits: Any = None, tiled: bool = False) -> Any:  # fmt: skip
    """``out[M, N] = A[M, K] @ W[N, K]^T (+ bias[N])`` on flat storage arrays (bf16 as uint16 bits).

    ``a_bits``: (M*K) values of ``fmt`` (float32 / float16 / uint16 for bfloat16),
    contiguous; ``packed``: flat uint8 codes of W (bitsandbytes layout, at least
    (N*K+1)//2 bytes); ``bias_bits``: N values of ``fmt`` or None; ``out_bits``: M*N values
    of ``fmt`` written in place (allocated when None); ``tiled``: ``packed`` is in the tile
    order of :mod:`cupyquant.tiled_4bit` (exactly N*K/2 bytes). Accumulation is float32 (one fp16 /
    bf16 row first sums each 32-element chunk in its own format, see the module docstring)
    and the result is rounded to ``fmt`` once. NumPy arrays run the reference, CuPy arrays the
    kernels on the current device and stream (no host synchronisation). Call inside the
    arrays' device context. Returns ``out_bits``.
    """
    if fmt not in _xp.FLOAT_FORMATS:
        raise ValueError(f"fmt must be one of {_xp.FLOAT_FORMATS}, got {fmt!r}")
    if isinstance(M, bool) or not isinstance(M, (int, np.integer)) or M < 0:
        raise ValueError(f"M must be a non-negative integer, got {M!r}")
    M = int(M)
    N, K = _weight_shape(quant_state)
    xp = _xp.array_module(a_bits)
    _check_bits(a_bits, "A", fmt, M * K)
    _xp.same_module(a_bits, packed, "A", "B")
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise ValueError(f"B (packed codes) must be a flat uint8 array, got {packed.dtype} of shape {packed.shape}")
    if packed.size < (N * K + 1) // 2:
        raise ValueError(f"B holds {packed.size} bytes but an ({N}, {K}) weight needs {(N * K + 1) // 2}")
    if not isinstance(tiled, bool):
        raise TypeError(f"tiled must be a bool, got {type(tiled).__name__}")
    if tiled and (N % 16 or K % 128 or packed.size != N * K // 2):
        raise ValueError(f"a tiled weight has N % 16 == 0, K % 128 == 0 and N*K/2 bytes, got (N, K) = ({N}, {K}) "
                         f"and {packed.size} bytes")  # fmt: skip
    if bias_bits is not None:
        _xp.same_module(a_bits, bias_bits, "A", "bias")
        _check_bits(bias_bits, "bias", fmt, N)
    if out_bits is None:
        out_bits = xp.empty(M * N, dtype=_xp.storage_dtype(fmt))
    else:
        _xp.same_module(a_bits, out_bits, "A", "out")
        _check_bits(out_bits, "out", fmt, M * N)
    if M == 0 or N == 0:
        return out_bits
    if xp is np:
        if tiled:
            packed = untile_bytes(packed, N, K)
        return _matmul_reference(a_bits, fmt, M, N, K, packed, quant_state, bias_bits, out_bits)
    if K == 0:
        out2d = out_bits.reshape(M, N)
        if bias_bits is None:
            out2d.fill(0)
        else:
            out2d[...] = bias_bits
        return out_bits
    if tiled:
        if not _fused_applies(fmt, M, N, K, _aligned(K, packed)):
            _matmul_dequant_gemm(a_bits, fmt, M, N, K, packed, quant_state, bias_bits, out_bits, tiled=True)
            return out_bits
        if packed.data.ptr % 16 == 0:
            if a_bits.data.ptr % 16:  # the fused kernels read A in 16-byte units: an aligned copy
                a_bits = a_bits.copy()
            _matmul_fused(a_bits, fmt, M, N, K, packed, quant_state, bias_bits, out_bits, tiled=True)
            return out_bits
        # a weight at an odd address (a view): the general kernels read the bitsandbytes layout
        packed = untile_bytes(packed, N, K)
    if _fused_applies(fmt, M, N, K, _aligned(K, a_bits, packed)):
        _matmul_fused(a_bits, fmt, M, N, K, packed, quant_state, bias_bits, out_bits)
    else:
        _matmul_dequant_gemm(a_bits, fmt, M, N, K, packed, quant_state, bias_bits, out_bits)
    return out_bits


def _fused_applies(fmt: str, M: int, N: int, K: int, aligned: bool) -> bool:
    """Whether M rows take the fused kernels: up to :func:`fused_max_m`; and 16-bit activations
    or weights that are not 16-byte aligned, which only the CUDA-core GEMV takes, one row only
    (the GEMV loses to dequantize + cuBLAS from two rows, see _FUSED_MAX_M's "gemv-16bit")."""
    if M > fused_max_m(fmt, N, K):
        return False
    return fmt == "float32" or aligned or M <= _FUSED_MAX_M["gemv-16bit"]


# ---------------------------------------------------------------------------------------
# NumPy reference
# ---------------------------------------------------------------------------------------
def _matmul_reference(a_bits, fmt, M, N, K, packed, quant_state, bias_bits, out_bits):
    weight = np.empty(N * K, dtype=np.float32)
    dequantize_4bit_bits(packed, _as_float32_state(quant_state), weight)
    acc = ref.to_float32(a_bits, fmt).reshape(M, K) @ weight.reshape(N, K).T
    if bias_bits is not None:
        acc += ref.to_float32(bias_bits, fmt)[None, :]
    out_bits[...] = ref.from_float32(acc, fmt).reshape(-1)
    return out_bits


def _as_float32_state(qs: QuantState) -> QuantState:
    return QuantState(
        absmax=qs.absmax, shape=qs.shape, code=qs.code, blocksize=qs.blocksize, quant_type=qs.quant_type,
        dtype="float32", offset=qs.offset, state2=qs.state2,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# CuPy paths
# ---------------------------------------------------------------------------------------
def _sm_count() -> int:
    return _xp.device_attribute("MultiProcessorCount")


def _smem_per_sm() -> int:
    return _xp.device_attribute("MaxSharedMemoryPerMultiprocessor")


def _scale_args(qs: QuantState) -> tuple[Any, ...]:
    """(absmax, qabsmax, code2, nested_absmax, offset) kernel arguments, dummies for the unused."""
    blocks = qs.absmax.size
    return _gpu_scales(qs, blocks).kernel_args()


def _kernel_common(fmt: str, packed: Any, qs: QuantState) -> tuple[Any, ...]:
    from . import _gpu

    table = _gpu.device_table(f"{qs.quant_type}_values")
    return (packed, table, *_scale_args(qs))


def _pick_mma(M: int, N: int, K: int, rt: int | None = None, wide: bool = False, frag: bool = False,
              warps: int | None = None, tiled: bool = False,
              chunked: bool = False) -> tuple[str, int, int, int, int, int]:  # fmt: skip
    """(kernel expression prefix, token tiles, token chunks, ksplit, grid, warps a CTA) for the
    tensor-core kernels.

    Up to 16 tokens a CTA run ``gemm_4bit_small`` with ``rt`` 16-row tiles a warp and
    ``warps`` warps a CTA (4 or 8); more tokens run ``gemm_4bit_mma`` (one tile a warp, 4
    warps), in chunks of up to 64 tokens. Default ``rt`` (measured, NOTES_matmul_4bit.md): 2
    for 9..16 tokens; for 1..8 tokens 2 when the weight has at least 3 row tiles per SM
    (N >= 8192 on 132 SMs: 60.9 vs 79.4 us at 28672x8192), else 1 (8.8 vs 11.2 us at
    4096x4096). K is split across a CTA's warps while the grid has fewer than
    _WARPS_PER_SM_TARGET warps an SM and every split keeps _MMA_IN_FLIGHT segments (8 warps:
    half that). Default ``warps``: 8 where the 8-warp grid fits one wave of 2 CTAs an SM and
    either 4 warps a CTA, K split 4 ways, still leave the grid short of that target (H100,
    run 21, us, 8 / 4 warps: 4096 x 4096 at 2 / 16 tokens 8.3 / 8.9 and 10.5 / 12.0, 8192 x
    28672 at 16 tokens 72.7 / 80.1) or 9..16 tokens meet K >= _SMALL_EARLY_MIN_K (run 42:
    28672 x 8192 at 9 / 12 / 16 tokens 66.4 / 67.1 / 66.8 against 68.8 / 69.7 / 69.2, tiled
    56.5 / 57.9 / 57.9 against 58.4 / 60.2 / 60.0; run 43 checks the other weights it
    moves: 65536 x 8192, 32000 x 8192 and 53248 x 16384 gain 1.5-20 us, 14336 x 8192 ties);
    else 4 (11008 x 4096 at 16 tokens, 1.3 waves of 8 warps, 23.5 / 17.5). Whether the first
    batch is requested before the byte table (EARLY) and how many segments a batch holds:
    :func:`_small_schedule`. ``chunked``: more than 16 tokens on ``gemm_4bit_small`` too, in
    16-token chunks (:func:`_small_chunks_default`), by default 4 warps a CTA on the
    bitsandbytes layout (run 107) and the rule above on tiles.
    """
    tiles = next((t for t in _MMA_TOKEN_TILES if 8 * t >= M), _MMA_TOKEN_TILES[-1])
    if chunked:
        tiles = min(tiles, _MMA_TOKEN_TILES[1])
        if warps is None and M > 8 * tiles and not tiled:
            warps = _MMA_WARPS
    chunks = -(-M // (8 * tiles))
    row_tiles = -(-N // 16)
    sms = _sm_count()
    target = _WARPS_PER_SM_TARGET * sms
    segments = -(-K // _MMA_SEGMENT)

    def split(warp_tiles: int, warps: int) -> tuple[int, int]:
        """(ksplit, CTAs) of ``warp_tiles`` row groups on ``warps``-warp CTAs."""
        per_split = _MMA_IN_FLIGHT if warps == _MMA_WARPS else _MMA_IN_FLIGHT // 2  # segments a split keeps
        ksplit = 1
        while ksplit < warps and warp_tiles * chunks * ksplit < target and segments >= 2 * per_split * ksplit:
            ksplit *= 2
        return ksplit, -(-warp_tiles // (warps // ksplit)) * chunks

    if tiles <= 2 and not wide:
        if rt is None:
            rt = 2 if tiles == 2 or row_tiles >= 3 * sms else 1
        warp_tiles = -(-row_tiles // rt)
        if warps is None:
            ksplit, _ = split(warp_tiles, _MMA_WARPS)
            short = ksplit == _MMA_WARPS and warp_tiles * chunks * ksplit < target
            long_k = tiles == 2 and K >= _SMALL_EARLY_MIN_K  # the EARLY kernel's gain, 9..16 tokens
            warps = 8 if (short or long_k) and split(warp_tiles, 8)[1] <= 2 * sms else _MMA_WARPS
        ksplit, ctas = split(warp_tiles, warps)
        early, batch = _small_schedule(tiles, rt, warps, K, -(-segments // ksplit), tiled)
        # TILED[, EARLY[, BATCH[, LAST_AFTER_MULTIPLY]]]: trailing defaults left out
        flags = (f", {str(tiled).lower()}, {str(early).lower()}, {batch}" if batch
                 else f", {str(tiled).lower()}, true" if early else _TILED_ARG[tiled])  # fmt: skip
        if early and batch == _SMALL_BATCH_TWO_TILES and _small_last_after_multiply(ctas):
            flags += ", true"
        kernel = f"gemm_4bit_small<{{}}, {{}}, {tiles}, {rt}, {str(frag).lower()}, {warps}{flags}>"
        return kernel, tiles, chunks, ksplit, ctas, warps
    rt, warps, warp_tiles = 1, _MMA_WARPS, row_tiles
    kernel = f"gemm_4bit_mma<{{}}, {{}}, {tiles}{_TILED_ARG[tiled]}>"
    ksplit, ctas = split(warp_tiles, warps)
    return kernel, tiles, chunks, ksplit, ctas, warps


def _small_schedule(tiles: int, rt: int, warps: int, K: int, share: int, tiled: bool) -> tuple[bool, int]:
    """(EARLY, BATCH) of ``gemm_4bit_small`` (BATCH 0: the kernel's default, 4 / rt segments
    in flight a warp); ``share``: segments a warp multiplies.

    EARLY (the first batch requested before the byte table) on 8-warp CTAs with K >=
    _SMALL_EARLY_MIN_K (run 41 of NOTES_matmul_4bit.md). At 9..16 tokens (two row tiles a
    warp) 8-warp CTAs take batches of _SMALL_BATCH_TWO_TILES segments where that batch is a
    warp's whole share, with EARLY (requested before the table, it leaves nothing to wait
    for after it), and on tiled weights where the share is whole batches. H100, run 62, us
    at 16 tokens, before / after: 4096 x 4096 (share 4) 10.08 / 9.88, row-major 10.57 /
    10.19; tiled 28672 x 8192 57.8 / 56.2, 8192 x 28672 53.3 / 52.2, 14336 x 8192 33.3 /
    31.8, 32000 x 8192 58.5 / 57.4. Not elsewhere: a share with 3 segments past its last
    batch runs them one DRAM trip each (4096 x 11008, 11 segments: 19.1 / 21.1 tiled), and
    long row-major shares lost 0.5-3 us (28672 x 8192, 65536 x 8192); EARLY with long shares
    lost 10 us (its one register set leaves no batch in flight while one is multiplied);
    4-warp CTAs (11008 x 4096 16.9 / 18.0) and 1..8 tokens lost too.
    """
    if warps == 8 and tiles == 2 and rt == 2:
        if share <= _SMALL_BATCH_TWO_TILES:
            return True, _SMALL_BATCH_TWO_TILES
        if tiled and share % _SMALL_BATCH_TWO_TILES == 0:
            return False, _SMALL_BATCH_TWO_TILES
    return warps == 8 and K >= _SMALL_EARLY_MIN_K, 0


def _small_last_after_multiply(ctas: int) -> bool:
    """Whether ``gemm_4bit_small``'s short-share builds (EARLY, BATCH _SMALL_BATCH_TWO_TILES)
    request a warp's last segment once its first is multiplied (LAST_AFTER_MULTIPLY), not
    once the first is in: where the grid of ``ctas`` CTAs is more than one an SM. H100, run 90
    of NOTES_matmul_4bit.md, us at 16 tokens, in / multiplied: 8192 x 4096 (256 CTAs) tiled
    12.88 / 11.79, row-major 15.87 / 12.68; 4096 x 4096 (128) tiled 8.45 / 9.23, row-major
    8.86 / 9.58; 2048 x 4096 (64) tiled 7.58 / 8.44."""
    return ctas > _sm_count()


def _stage_smem(rt: int, stages: int, chunk: int, warps: int) -> int:
    """Dynamic shared memory of ``gemm_4bit_stage``: byte table, code2, each warp's stages."""
    return 4 * (256 * 32 + 256) + warps * stages * rt * chunk * 1024


def _stage_config(M: int, forced: str | None = None) -> tuple[int, int, int, int, int]:
    """(token tiles, rt, stages, chunk, warps) of ``gemm_4bit_stage`` for up to 8 tokens:
    ``forced`` "<rt>x<stages>c<chunk>w<warps>" or the default."""
    if M > 8:
        raise ValueError(f"gemm_4bit_stage takes up to 8 tokens, got M = {M}")
    if forced is None:
        return _STAGE_CONFIGS[0]
    shape, _, rest = forced.partition("c")
    chunk, _, warps = rest.partition("w")
    config = (1, *(int(v) for v in shape.split("x")), int(chunk), int(warps))
    if config not in _STAGE_CONFIGS:
        raise ValueError(f"gemm_4bit_stage has no (token tiles, row tiles, stages, chunk, warps) = {config}")
    return config


def _stage_grid(config: tuple[int, int, int, int, int], N: int, K: int, per_sm: int) -> tuple[int, int]:
    """(ksplit, grid) of ``gemm_4bit_stage``. The weight's rows form groups of rt row tiles,
    each multiplied by ``ksplit`` warps sharing its K; ``ksplit`` is the largest of 4, 2, 1
    for which every group fits in one wave of ``per_sm`` CTAs an SM (no warp waits for a
    second wave), and the grid takes as many CTAs as there are groups or slots, the kernel
    dealing the groups out across them so that busy warps are spread evenly over the SMs."""
    _, rt, _, _, warps = config
    groups = -(-((N + 15) // 16) // rt)
    segments = -(-K // _MMA_SEGMENT)
    slots = per_sm * _sm_count()
    ksplit = next((ks for ks in (4, 2) if segments >= 8 * ks and groups <= slots * (warps // ks)), 1)
    return ksplit, max(min(slots, groups), -(-groups // (warps // ksplit)))


@functools.cache
def _blocks_per_sm(function: int, threads: int, smem: int) -> int:
    """CTAs of ``threads`` threads and ``smem`` dynamic shared bytes that one SM holds at once
    for the compiled kernel ``function`` (a CUfunction of the current device), at least 1.
    Cached: the grids of the dealing kernels depend on it, and a call asks the driver."""
    return max(1, _xp.cupy().cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(function, threads, smem))


def _tile_smem(mt: int) -> int:
    """Dynamic shared memory of ``gemm_4bit_tile`` with ``mt`` token tiles: the byte table
    (256 x 32 u32), code2 (256 floats) and the activation stages (8 * mt tokens x 256 bytes)."""
    return 4 * (256 * 32 + 256) + _TILE_STAGES * mt * 8 * 2 * _MMA_SEGMENT


def _pick_tile(
    M: int,
    N: int,
    K: int,
    mt: int | None = None,
    rt: int | None = None,
    ksplit: int | None = None,
    tiled: bool = False,
) -> tuple[str, int, int, int, int, int, int]:
    """(kernel expression prefix, token chunks, CTAs a split, ksplit, shared bytes, mt, rt)
    of ``gemm_4bit_tile`` (ksplit 1) or ``gemm_4bit_tile_split``.

    ``mt`` token tiles (8 tokens each) a CTA, ``rt`` 16-row tiles a warp (so 64 * rt weight
    rows a CTA), ``ksplit`` CTAs sharing K (grid.y). All None: :func:`_tile_default`; a
    forced shape without ``ksplit`` runs unsplit.
    """
    row_tiles = -(-N // 16)
    if mt is None or rt is None:
        d_mt, d_rt, d_ks = _tile_default(M, row_tiles, -(-K // _MMA_SEGMENT), _sm_count())
        mt = d_mt if mt is None else mt
        rt = d_rt if rt is None else rt
        ksplit = d_ks if ksplit is None else ksplit
    ksplit = 1 if ksplit is None else ksplit
    chunks = -(-M // (8 * mt))
    ctas = -(-row_tiles // (_MMA_WARPS * rt)) * chunks
    name = "gemm_4bit_tile_split" if ksplit > 1 else "gemm_4bit_tile"
    return f"{name}<{{}}, {{}}, {mt}, {rt}{_TILED_ARG[tiled]}>", chunks, ctas, ksplit, _tile_smem(mt), mt, rt


def _tile_ctas(row_groups: int, chunks: int, per_sm: int) -> int:
    """CTAs of an unsplit ``gemm_4bit_tile`` launch: one CTA group a 4 ``row_groups`` (rt row
    tiles each, one a warp) or, where one wave of ``per_sm`` CTAs an SM holds more, as many
    CTA groups as that wave has, keeping at least 2 row groups a CTA group (each CTA stages
    the activations once for all its warps: with 1 busy warp a CTA, 4096 x 4096 at 64 tokens
    went from 23.8 to 29.2 us); times the token chunks. The kernel deals the row groups out
    over the CTA groups. H100 run 10 of NOTES_matmul_4bit.md."""
    wave = per_sm * _sm_count() // chunks
    return max(-(-row_groups // _MMA_WARPS), min(wave, row_groups // 2)) * chunks


# gemm_4bit_tile_split: K is split only where even one row tile a warp leaves SMs without
# a CTA, and each split keeps at least _TILE_MIN_SHARE 128-element segments; the splits
# fill up to _TILE_CTAS_PER_SM CTAs an SM (registers and shared memory allow 2 resident).
# H100 run 5 (NOTES_matmul_4bit.md): 8192 x 28672 at 17..64 tokens (224 segments, 4 splits
# of 56) went from 142-202 us to 99-180; on K = 4096 (32 segments) splits of 8 to 11
# segments lost to the unsplit kernels (4096 x 4096 at 64 tokens: 33.4 vs 32.8 us; 11008 x
# 4096 at 64: 72 vs 43), the last CTA's reduction of the partials costing about what the
# split saves. 48 keeps K = 4096 unsplit; the 8192 x 28672 shares (56) are the measured ones.
_TILE_MIN_SHARE = 48
_TILE_CTAS_PER_SM = 2
_TILE_SPLIT_CONFIGS = ((4, 2), (8, 2))  # (mt, rt) of gemm_4bit_tile_split instantiated


def _nonempty_split(parts: int, ksplit: int) -> int:
    """``ksplit`` trimmed so that no split of ``parts`` (K stages or segments), each taking
    ceil(parts / ksplit) of them in order, is empty: 5 stages in 4 splits -> shares of 2 -> 3."""
    return -(-parts // -(-parts // ksplit))


def _tile_default(M: int, row_tiles: int, segments: int, sms: int) -> tuple[int, int, int]:
    """(mt, rt, ksplit) of the tile kernels for M tokens, ``row_tiles`` 16-row weight tiles
    and ``segments`` 128-element segments of K, on ``sms`` SMs.

    H100 run 4 (NOTES_matmul_4bit.md), unsplit: the best or within ~5% of the best measured
    shape at every M in 17..192 on 28672x8192, 8192x28672 and 11008x4096, except 11008x4096
    at 96 tokens (62.5 us; mt=4, rt=2 took 45.2). Run 5: split as above (rt = 2, ksplit 4 on
    8192x28672 at 17..64 tokens)."""
    mt = 4 if M <= 32 else 8
    chunks = -(-M // (8 * mt))
    ctas_rt1 = -(-row_tiles // _MMA_WARPS) * chunks
    ctas_rt2 = -(-row_tiles // (2 * _MMA_WARPS)) * chunks
    ksplit = min(_TILE_CTAS_PER_SM * sms // ctas_rt2, segments // _TILE_MIN_SHARE)
    if ctas_rt1 < sms and ksplit >= 2:
        return mt, 2, _nonempty_split(segments, ksplit)
    # Two row tiles a warp halve the activation reads from shared memory per weight byte,
    # but halve the CTAs too: only where that still leaves every SM a CTA.
    return mt, 2 if ctas_rt2 >= sms else 1, 1


# gemm_4bit_wgmma (rawkernels/gemm_4bit_wgmma.cu; Hopper's warpgroup MMA, compiled for sm_90a and
# run only on compute capability 9.0): 128 weight rows x TOKENS tokens a CTA, K in stages of 64.
# TOKENS 64: one warpgroup and a scale warp, two CTAs an SM; 128: two warpgroups (one row
# block each) and a scale warp, one CTA an SM; 256: as 128 with a scale warpgroup. K is
# split across CTAs where the unsplit grid leaves SMs without their CTAs, each split keeping
# at least _WGMMA_MIN_SHARE stages.
_WGMMA_GROUPS = {64: 1, 128: 2, 256: 2}  # the kernel's TOKENS -> its default warpgroups (WgmmaShape's GROUPS)
_WGMMA_SCALE_THREADS = {64: 32, 128: 32, 256: 128}  # and its scale threads (WgmmaShape::kScaleThreads)
_WGMMA_TOKEN_WIDTHS = tuple(_WGMMA_GROUPS)
# (tokens, X_TMA, warpgroups) of the builds: every width with either copy of the activations
# at its own warpgroups, and 64 tokens on two (threads' copies; _wgmma_default_split).
_WGMMA_BUILDS = tuple((t, tma, _WGMMA_GROUPS[t]) for t in _WGMMA_TOKEN_WIDTHS for tma in (False, True)) + (
    (64, False, 2),)  # fmt: skip
_WGMMA_ROWS = 128
_WGMMA_STAGE_K = 64
_WGMMA_MIN_SHARE = 16


def _wgmma_mma_threads(tokens: int, groups: int | None = None) -> int:
    """The threads of gemm_4bit_wgmma's warpgroups that multiply (WgmmaShape::kMmaThreads; the
    split-K partials are theirs); ``groups`` None: the width's default."""
    return 128 * (_WGMMA_GROUPS[tokens] if groups is None else groups)


def _wgmma_threads(tokens: int, groups: int | None = None) -> int:
    """The block size of gemm_4bit_wgmma's TOKENS = ``tokens`` (the kernel's WgmmaShape::kThreads):
    its warpgroups and the scale warp (a scale warpgroup at 256 tokens)."""
    return _wgmma_mma_threads(tokens, groups) + _WGMMA_SCALE_THREADS[tokens]


def _wgmma_smem(tokens: int) -> int:
    """Its dynamic shared memory (WgmmaShape::kSmemBytes): 4 activation stages of 128 bytes a
    token, 4 stages of packed weights and scales, the byte table, code2, the flag, an mbarrier
    an activation stage, alignment."""
    return 4 * 128 * tokens + 4 * (4096 + 1024) + 4 * (256 * 32 + 256) + 16 + 4 * 8 + 1024


# TOKENS whose kernel moves registers between its warpgroups with setmaxnreg -> the
# registers a thread it must be launched with (WgmmaShape: the scale warpgroup gives up
# 168 - 80, the two that multiply take 208 - 168). Launched with fewer, the warpgroups would
# wait forever for registers the CTA never had.
_WGMMA_SETMAXNREG = {256: 168}
_CHECKED_KERNELS: set[int] = set()  # id() of the kernels whose registers were checked


def _check_launch_registers(kernel: Any, tokens: int) -> None:
    """Refuse a setmaxnreg kernel the compiler did not give the registers it redistributes."""
    if id(kernel) in _CHECKED_KERNELS:
        return
    if kernel.num_regs != _WGMMA_SETMAXNREG[tokens]:
        raise RuntimeError(f"gemm_4bit_wgmma with {tokens} tokens a CTA must be compiled to "
                           f"{_WGMMA_SETMAXNREG[tokens]} registers a thread (its setmaxnreg budget), "
                           f"got {kernel.num_regs}")  # fmt: skip
    _CHECKED_KERNELS.add(id(kernel))


def _wgmma_ctas_per_sm(tokens: int) -> int:
    """CTAs an SM of the width's default build (WgmmaShape::kCtasPerSm): two of one warpgroup,
    one of two."""
    return 2 // _WGMMA_GROUPS[tokens]


def _wgmma_accs(tokens: int, groups: int | None = None) -> int:
    """float32 accumulators a warpgroup thread: 128 rows x ``tokens`` over its threads."""
    return _WGMMA_ROWS * tokens // _wgmma_mma_threads(tokens, groups)


def _wgmma_groups(tokens: int, tma: bool, forced: int | None = None) -> int:
    """The warpgroups of a ``tokens``-token gemm_4bit_wgmma CTA: ``forced`` (checked against
    the builds), else the width's own (_WGMMA_GROUPS). The default dispatch's choice at 64
    tokens is :func:`_wgmma_default_split`'s."""
    if forced is None:
        return _WGMMA_GROUPS[tokens]
    if forced not in (1, 2) or (forced == 1 and tokens != 64):
        raise ValueError(f"gemm_4bit_wgmma is built with 1 or 2 warpgroups at 64 tokens a CTA and 2 above, "
                         f"got {forced} at {tokens}")  # fmt: skip
    if tma and forced != _WGMMA_GROUPS[tokens]:
        raise ValueError(f"the TMA build has {_WGMMA_GROUPS[tokens]} warpgroup(s) at {tokens} tokens "
                         f"a CTA, got {forced}")  # fmt: skip
    return forced


def _wgmma_fill_split(ctas: int, stages: int, ctas_per_sm: int) -> int:
    """The K split that fills the SMs with ``ctas`` tiles' CTAs at ``ctas_per_sm`` an SM, each
    split keeping at least _WGMMA_MIN_SHARE of the ``stages`` (trimmed so none is empty)."""
    return _nonempty_split(stages, max(1, min(ctas_per_sm * _sm_count() // ctas, stages // _WGMMA_MIN_SHARE)))


def _wgmma_default_split(tokens: int, ctas: int, stages: int, tma: bool,
                         groups: int | None) -> tuple[int, int]:  # fmt: skip
    """(ksplit, warpgroups) of ``ctas`` tiles of ``tokens`` tokens and ``stages`` K stages,
    ``groups`` forced or None. The split fills the SMs with the build's CTAs (two an SM with
    one warpgroup, one with two). 64-token CTAs (threads' copies) take two warpgroups, one
    64-row block each, where their one-CTA-an-SM split is more than half the one-warpgroup
    build's: a two-warpgroup CTA does a stage in a little over half the time that two
    one-warpgroup CTAs sharing an SM take, so it wins where each CTA gets fewer than twice
    the stages. H100, runs 109-110 and 117-118 of NOTES_matmul_4bit.md, us at 33 / 64 tokens,
    two warpgroups (split) against one (split), row-major:
      4096 x 4096 (32 tiles) 18.8 / 19.1 (4) against 21.0 / 21.4 (4: same split, same bits);
      5120 x 4096 21.5 / 21.9 (3) against 25.4 / 26.1 (4); 4608 x 4096 21.1 / 21.5 (3)
      against 25.0 / 25.5 (4); 8192 x 3072 22.0 / 22.3 (2) against 24.5 / 25.1 (3);
      4096 x 6144 22.7 / 22.9 (4) against 26.3 / 26.8 (6); 2304 x 11008 24.4 / 24.8 (7)
      against 29.6 / 30.3 (10); 2048 x 13824 25.8 / 26.0 (8) against 30.8 / 31.1 (13);
      5120 x 5120 23.9 / 24.2 (3) against 25.8 / 26.4 (5); 3072 x 8192 24.9 / 25.1 (5)
      against 28.5 / 28.9 (8). Tiled within 0.4.
    At twice the stages they split even (4096 x 8192 27.9 against 29.4, 4096 x 11008 32.7
    against 33.5 at 33 tokens; 5120 x 13824 46.4 against 42.9, 7168 x 7168 37.5 against
    35.1, 6144 x 4096 25.9 against 25.3) and lose above (8192 x 8192, 64 tiles split 2
    against 4, 45.2 against 40.9), so those keep one. The TMA build has the width's own."""
    if groups is not None:
        groups = _wgmma_groups(tokens, tma, groups)  # checked against the builds
    own = _wgmma_fill_split(ctas, stages, _wgmma_ctas_per_sm(tokens))
    if tokens == 64 and not tma and groups != 1:
        alone = _wgmma_fill_split(ctas, stages, 1)
        if groups == 2 or (ctas <= _sm_count() and 2 * alone > own):
            return alone, 2
    return own, _WGMMA_GROUPS[tokens] if groups is None else groups


_WGMMA_MIN_M = 33  # the default dispatch's first wgmma token count (_wgmma_default)
_WGMMA_MIN_N = 4096  # and its fewest weight rows at any K
_WGMMA_NARROW_MIN_N = 2048  # and at K >= _WGMMA_NARROW_MIN_K (_wgmma_weight)
_WGMMA_NARROW_MIN_K = 8192


def _wgmma_weight(N: int, K: int) -> bool:
    """Whether the default dispatch gives an (N, K) weight to ``gemm_4bit_wgmma`` from
    _WGMMA_MIN_M tokens on an H100 / H200: _WGMMA_MIN_N+ rows, or _WGMMA_NARROW_MIN_N+ rows
    with K >= _WGMMA_NARROW_MIN_K, where the default was dequantize + cuBLAS. H100, run 113
    of NOTES_matmul_4bit.md, us at 33 / 64 / 128 tokens, wgmma against dequantize + cuBLAS:
    2048 x 8192 20.7 / 20.9 / 27.0 against 26.4 / 27.3 / 29.8, 3072 x 8192 28.4 / 28.7 / 31.5
    against 43.0 / 43.2 / 47.0, 2560 x 10240 28.5 / 28.9 / 33.0 against 44.6 / 45.4 / 49.2.
    With K <= 4096 narrow weights lose (2048 x 4096 18.4 / 18.5 / 22.8 against 14.8 / 15.3 /
    18.3, 3072 x 3072 17.7 against 16.6 at 33, 1024 x 4096 18.1 against 11.9)."""
    return N >= _WGMMA_MIN_N or (N >= _WGMMA_NARROW_MIN_N and K >= _WGMMA_NARROW_MIN_K)


def _wgmma_default(M: int, N: int, K: int) -> bool:
    """Whether the default tensor-core dispatch runs ``gemm_4bit_wgmma``: from _WGMMA_MIN_M
    tokens on an H100 / H200, for the weights :func:`_wgmma_weight` takes (up to fused_max_m).
    H100, run 35 of NOTES_matmul_4bit.md, us, wgmma against the kernel it replaces
    (gemm_4bit_tile / gemm_4bit_tile_split from 8192 rows; gemm_4bit_mma or dequantize +
    cuBLAS on 4096 x 4096):
      28672 x 8192 at 33 / 64 / 128 / 192 tokens: 117.9 / 116.2 / 226.1 / 341.9 against
      123.7 / 120.2 / 231.8 / 346.4 (160: 349.0 against 348.2, a tie);
      8192 x 28672 at 64 / 128 / 192: 106.4 / 190.7 / 359.8 against 176.4 / 269.5 / 376.8
      (gemm_4bit_tile_split; 64 and 128 from run 34);
      11008 x 4096 at 33 / 96 / 192: 30.9 / 56.4 / 57.0 against 40.0 / 59.2 / 61.7;
      4096 x 4096 at 33 / 64: 20.7 / 21.5 against 23.1 / 25.7.
    At 32 tokens it loses (a half-empty 64-token tile; 8192 x 28672, run 34: 126.3 against
    98.6)."""
    return M >= _WGMMA_MIN_M and _wgmma_weight(N, K) and _wgmma_supported()


def _compute_capability() -> str:
    """The current device's compute capability, as CuPy spells it ("90" for an H100)."""
    return _device_capability(_xp.cupy().cuda.Device().id)


@functools.cache
def _device_capability(device_id: int) -> str:
    # (Asked on every dispatch of a routed shape: once a device.)
    return _xp.cupy().cuda.Device(device_id).compute_capability


def _wgmma_supported() -> bool:
    """Whether the current device runs gemm_4bit_wgmma (compute capability 9.0: H100 / H200)."""
    return _compute_capability() == "90"


def _pick_wgmma(M: int, N: int, K: int, ksplit: int | None = None, tiled: bool = False,
                tokens: int = 64, tma: bool = False,
                groups: int | None = None) -> tuple[str, int, int, int, int]:  # fmt: skip
    """(kernel expression prefix, token chunks, CTAs a split, ksplit, warpgroups a CTA) of
    ``gemm_4bit_wgmma`` with ``tokens`` tokens a CTA; ``ksplit`` and ``groups`` forced, or
    None for :func:`_wgmma_default_split`'s (a forced split at 64 tokens takes two warpgroups
    where its grid holds one CTA an SM). ``tma``: the X_TMA build, whose activations the TMA
    unit copies through a tensor map (:func:`_wgmma_x_map`)."""
    if tokens not in _WGMMA_TOKEN_WIDTHS:
        raise ValueError(f"gemm_4bit_wgmma is built for {_WGMMA_TOKEN_WIDTHS} tokens a CTA, got {tokens}")
    chunks = -(-M // tokens)
    ctas = -(-N // _WGMMA_ROWS) * chunks
    stages = -(-K // _WGMMA_STAGE_K)
    if ksplit is None:
        ksplit, groups = _wgmma_default_split(tokens, ctas, stages, tma, groups)
    elif ksplit < 1:
        raise ValueError(f"ksplit must be >= 1, got {ksplit}")
    else:  # a forced split: at 64 tokens, two warpgroups where its grid holds one CTA an SM
        ksplit = _nonempty_split(stages, ksplit)
        if groups is None and tokens == 64 and not tma and ctas * ksplit <= _sm_count():
            groups = 2
        groups = _wgmma_groups(tokens, tma, groups)
    return _wgmma_expression(tiled, tokens, tma, groups), chunks, ctas, ksplit, groups


# A balanced last wave (gemm_4bit_wgmma's split_from): where the tiles of one-CTA-an-SM
# widths fill some waves of the SMs and leave the last one short, the last wave's tiles are
# split over K and spread over the SMs. Each split keeps at least _WGMMA_TAIL_MIN_SHARE
# stages, and the split is taken where the split tiles' rounds of CTAs, a share each, take at
# most _WGMMA_TAIL_MAX_COST of the wave they replace (see _wgmma_tail_split).
_WGMMA_TAIL_MIN_SHARE = 32
_WGMMA_TAIL_MAX_COST = 0.6


def _wgmma_tail_split(ctas: int, tokens: int, stages: int, sms: int) -> int:
    """The K split of a balanced last wave for ``ctas`` unsplit tiles of ``tokens`` tokens
    and ``stages`` stages on ``sms`` SMs, 1 for none: the split whose CTAs, in rounds over
    the SMs, take the fewest tile-times, where that is at most _WGMMA_TAIL_MAX_COST. Only
    for widths of one CTA an SM (the 64-token build splits every tile or none)."""
    if _wgmma_ctas_per_sm(tokens) != 1 or ctas <= sms or ctas % sms == 0:
        return 1
    tail = ctas % sms
    best, best_cost = 1, 1.0
    for split in range(2, stages // _WGMMA_TAIL_MIN_SHARE + 1):
        cost = -(-tail * split // sms) / split
        if cost < best_cost:
            best, best_cost = split, cost
    return best if best_cost <= _WGMMA_TAIL_MAX_COST else 1


def _wgmma_split_from(ctas: int, ksplit: int, tokens: int, stages: int, sms: int,
                      balance: int | None = None) -> tuple[int, int]:  # fmt: skip
    """(split_from, ksplit) of a gemm_4bit_wgmma launch of ``ctas`` tiles whose grid rule gave
    ``ksplit``: tiles split_from.. are split ksplit ways. Every tile where ksplit > 1; else the
    last wave's tiles ``balance`` ways (None: :func:`_wgmma_tail_split`'s rule; 1: none),
    trimmed so that no split is empty."""
    if ksplit > 1:
        if balance not in (None, 1):
            raise ValueError(f"a balanced last wave splits the tiles of an unsplit grid, got ksplit {ksplit}")
        return 0, ksplit
    if balance is None:
        balance = _wgmma_tail_split(ctas, tokens, stages, sms)
    if balance < 1:
        raise ValueError(f"a balanced last wave's split must be >= 1, got {balance}")
    if balance == 1:
        return ctas, 1
    if _wgmma_ctas_per_sm(tokens) != 1:
        raise ValueError(f"a balanced last wave needs one CTA an SM (128 or 256 tokens), got {tokens} tokens")
    tail = ctas % sms if ctas > sms else ctas
    if tail == 0:  # the waves are full
        return ctas, 1
    return ctas - tail, _nonempty_split(stages, balance)


def _wgmma_expression(tiled: bool, tokens: int, tma: bool, groups: int | None = None) -> str:
    """``gemm_4bit_wgmma``'s instantiation, with the format and NESTED left as ``{}``
    (trailing template arguments at their defaults are left out; ``groups`` None: the width's)."""
    if groups is not None and groups != _WGMMA_GROUPS[tokens]:
        return f"gemm_4bit_wgmma<{{}}, {{}}, {str(tiled).lower()}, {tokens}, {str(tma).lower()}, {groups}>"
    if tma:
        return f"gemm_4bit_wgmma<{{}}, {{}}, {str(tiled).lower()}, {tokens}, true>"
    if tokens == 64:
        return f"gemm_4bit_wgmma<{{}}, {{}}{_TILED_ARG[tiled]}>"
    return f"gemm_4bit_wgmma<{{}}, {{}}, {str(tiled).lower()}, {tokens}>"


def _wgmma_x_map(a_bits: Any, M: int, K: int, tokens: int) -> np.ndarray:
    """The X_TMA build's tensor map of A (M x K 16-bit values, row-major): boxes of 64 k (one
    stage, a 128-byte swizzle row) x ``tokens`` tokens (a CTA's), zeros past M and K. The
    kernel takes it by value; the pass that once wrote a swizzled copy of A for plain bulk
    copies cost 6% at 256 tokens on 8192 x 28672 (H100, run 150 of NOTES_matmul_4bit.md)."""
    return _tensor_map.rows_map(a_bits.data.ptr, M, K, tokens, _WGMMA_STAGE_K)


def _wgmma_out_map(out_bits: Any, M: int, N: int, tokens: int) -> np.ndarray | None:
    """The X_TMA build's tensor map of the output (M x N 16-bit values, row-major), which each
    warpgroup writes in one tensor store of its 64 rows x ``tokens`` tokens; None where TMA
    cannot address it (N % 8 != 0, or an output not 16-byte aligned: the threads store it
    then). The threads' own stores took ~6.4 us of a 256-token CTA's ~112 on 28672 x 8192
    (H100, run 155 of NOTES_matmul_4bit.md)."""
    if N % 8 or out_bits.data.ptr % 16:
        return None
    return _tensor_map.rows_map(out_bits.data.ptr, M, N, tokens, _WGMMA_ROWS // 2)  # a box: one warpgroup's row block


def _wgmma_path(path: str) -> tuple[int | None, int | None, int | None, int | None, bool | None]:
    """(tokens, ksplit, balance, groups, tma) of a
    "wgmma[-t<tokens>][-k<ksplit>][-b<split>][-g<groups>][-bulk|-threads]" path (-k: every tile
    split; -b: the last wave's tiles split, 1 for none; -g: warpgroups a CTA; -bulk: the X_TMA
    build, whose activations the TMA unit copies, -threads: the threads copy them); None where
    the default rule picks."""
    match = re.fullmatch(r"wgmma(?:-t(\d+))?(?:-k(\d+))?(?:-b(\d+))?(?:-g(\d+))?(?:-(bulk|threads))?", path)
    if match is None:
        raise ValueError(f"unknown fused path {path!r}")
    *numbers, copies = match.groups()
    tokens, ksplit, balance, groups = (None if v is None else int(v) for v in numbers)
    return tokens, ksplit, balance, groups, (None if copies is None else copies == "bulk")


def _wgmma_tma_routed(M: int, N: int, K: int) -> bool:
    """Whether the default tensor-core dispatch runs gemm_4bit_wgmma's X_TMA build."""
    if M <= 8 * _MMA_TOKEN_TILES[1] or not _wgmma_default(M, N, K):
        return False
    return _wgmma_tma_default(_wgmma_tokens(M, N, K))


def _wgmma_tma_default(tokens: int) -> bool:
    """Whether the default dispatch runs gemm_4bit_wgmma's X_TMA build (one tensor copy of the
    activations a stage, by the TMA unit) on CTAs of ``tokens`` tokens: on 256, where the
    threads' copies of 32 KB a stage cost the most. H100, run 49 of NOTES_matmul_4bit.md, us,
    bulk copies (from an image of A that a pass of its own wrote, since replaced by the
    tensor map: faster still, run 150) against the threads' copies: at
    256 tokens 28672 x 8192 245 / 276, 8192 x 28672 233 / 237, 11008 x 4096 64 / 71, 14336 x
    4096 65 / 73; at 512 tokens 28672 x 8192 501 / 582, 8192 x 28672 439 / 513. On 64- and
    128-token CTAs it is as fast or slower (64 tokens: 28672 x 8192 114.8 / 114.8, 8192 x
    28672 109.2 / 106.8; 128: 8192 x 28672 167 / 156, 11008 x 4096 48.6 / 45.7)."""
    return tokens == 256


# The time of a CTA's K stage with 64 / 128 / 256 tokens a CTA, each at its CTAs an SM,
# relative. H100, NOTES_matmul_4bit.md: 28672 x 8192 at 128 tokens (two waves either way),
# 228 us on 64-token CTAs against 176 on 128-token ones (run 36); at 256 tokens 377 us on
# 128-token CTAs (four waves) against 268-281 on 256-token ones (two), run 39.
_WGMMA_STAGE_COST = {64: 1.0, 128: 0.78, 256: 1.14}


def _wgmma_tokens(M: int, N: int, K: int) -> int:
    """The default dispatch's tokens a gemm_4bit_wgmma CTA: 64 up to 64 tokens, above that the
    width whose grid takes the least time by the waves of CTAs it needs (the default split)
    times their stages times _WGMMA_STAGE_COST. A wider CTA does more work a stage, but may
    leave a last wave emptier. It picked the fastest width at every point of H100 run 39, us,
    64 / 128 / 256 tokens a CTA: 28672 x 8192 at 128 tokens 229 / 177 / 267, at 192 341 / 349
    / 271, at 256 416 / 356 / 280; 8192 x 28672 at 192 345 / 278 / 230; 11008 x 4096 at 192
    57 / 88 / 71; 14336 x 4096 at 192 97 / 90 / 72; 4096 x 14336 at 256 99 / 83 / 77; 5120 x
    13824 at 256 176 / 139 / 91; 4096 x 4096 at 128 27 / 25 / 36."""
    return 64 if M <= 64 else _wgmma_tokens_above_64(M, N, K, _sm_count())


@functools.lru_cache(maxsize=4096)
def _wgmma_tokens_above_64(M: int, N: int, K: int, sms: int) -> int:
    # (Memoised: the default dispatch asks on every call of a routed shape.)
    stages = -(-K // _WGMMA_STAGE_K)

    def cost(tokens: int) -> float:
        _, _, ctas, ksplit, _ = _pick_wgmma(M, N, K, tokens=tokens)
        waves = -(-ctas * ksplit // (_wgmma_ctas_per_sm(tokens) * sms))
        return waves * -(-stages // ksplit) * _WGMMA_STAGE_COST[tokens]

    return min(_WGMMA_TOKEN_WIDTHS, key=cost)


_SMEM_LIMIT: dict[int, int] = {}  # CUfunction -> its dynamic shared-memory limit
_SMEM_LOCK = threading.Lock()


def _allow_smem(kernel: Any, nbytes: int) -> None:
    """Raise the kernel's dynamic shared-memory limit to at least ``nbytes`` (the driver's
    default is 48 KB less the kernel's static shared memory). The limit only grows, so a
    launch that needs less than an earlier one still fits."""
    function = kernel.kernel.ptr
    with _SMEM_LOCK:
        limit = _SMEM_LIMIT.get(function)
        if limit is None:
            limit = kernel.max_dynamic_shared_size_bytes
        if limit < nbytes:
            kernel.max_dynamic_shared_size_bytes = limit = nbytes
        _SMEM_LIMIT[function] = limit


def _mma_launch(a_bits, fmt, M, N, K, packed, qs, bias_bits, out_bits, path: str = "mma", tiled: bool = False):
    """(kernel, grid, block, args, shared bytes) of the tensor-core kernels.

    ``path``: "mma" (the default dispatch: ``gemm_4bit_stage`` up to 8 tokens on wide
    weights with long K, else ``gemm_4bit_small`` up to 16 tokens, and in 16-token chunks
    where :func:`_small_chunks_default` holds, above that ``gemm_4bit_wgmma`` where
    :func:`_wgmma_default` holds, else ``gemm_4bit_tile`` /
    ``gemm_4bit_tile_split`` for N >= _TILE_MIN_N, else ``gemm_4bit_mma``),
    "wgmma[-t<tokens>][-k<ksplit>][-b<split>][-g<groups>][-bulk|-threads]" (``gemm_4bit_wgmma``;
    tokens a CTA, the split of every tile or of the last wave's, warpgroups a CTA, and how the
    activations reach shared memory by the default rules, or forced), "stage" /
    "stage-<rt>x<stages>c<chunk>w<warps>" (``gemm_4bit_stage``),
    "mma-rt1" / "mma-rt2" (``gemm_4bit_small`` with that many row tiles a warp), "mma-frag"
    / "mma-frag-rt<1|2>" (``gemm_4bit_small`` reading A in fragment order, up to 16 tokens),
    "mma-w4" / "mma-w8" (``gemm_4bit_small`` with 4 / 8 warps a CTA), "mma-chunks"
    (``gemm_4bit_small`` for any M, in 16-token chunks above 16), "mma-wide"
    (``gemm_4bit_mma``), "tile" (the tile kernels, split by the default rule),
    "tile-<mt>x<rt>" (``gemm_4bit_tile``, unsplit) or "tile-<mt>x<rt>k<ksplit>" (split across
    ksplit CTAs).

    A ``gemm_4bit_tile_split`` launch also carries its workspace (float32 partial sums and
    zeroed arrival counters, :func:`_split_workspace`) in ``args``, allocated here from the
    current CuPy pool on the current stream (so a prepared launch never takes a split path).
    Fragment order launches ``permute_fragments`` here, on the current stream, and the
    kernel's A is that copy; the X_TMA build of ``gemm_4bit_wgmma`` takes tensor maps of A and
    of the output made here (so a prepared launch never takes those paths either).

    ``tiled``: ``packed`` is in tile order (:mod:`cupyquant.tiled_4bit`), every path but
    "stage": up to 16 tokens ``gemm_4bit_small`` (always 8 warps a CTA up to 8 tokens, H100
    run 32 of NOTES_matmul_4bit.md; 9..16 by :func:`_pick_mma`'s rule), above that as for
    the bitsandbytes layout (the TILED builds)."""
    from .rawkernels import get_function

    smem = 0
    warps = _MMA_WARPS
    tile_args: tuple[Any, ...] = ()
    if tiled and path.startswith("stage"):
        raise ValueError(f"gemm_4bit_stage reads the bitsandbytes layout only, got path {path!r} for a tiled weight")
    if path == "mma" and M > 8 * _MMA_TOKEN_TILES[1]:
        if _small_chunks_default(M, N, K):
            path = "mma-chunks"
        elif _wgmma_default(M, N, K):
            path = "wgmma"
        else:
            path = "tile" if N >= _TILE_MIN_N else "mma-wide"
    if path.startswith("wgmma"):  # forced parts of the path, the rest by the default rules
        tokens, forced, balance, groups, tma = _wgmma_path(path)
        if not _wgmma_supported():
            raise ValueError(f"gemm_4bit_wgmma needs a compute capability 9.0 GPU (H100 / H200), got "
                             f"{_compute_capability()}")  # fmt: skip
        tokens = _wgmma_tokens(M, N, K) if tokens is None else tokens
        tma = _wgmma_tma_default(tokens) if tma is None else tma
        expr, chunks, ctas, ksplit, groups = _pick_wgmma(M, N, K, forced, tiled, tokens, tma, groups)
        split_from, ksplit = _wgmma_split_from(ctas, ksplit, tokens, -(-K // _WGMMA_STAGE_K), _sm_count(), balance)
        kernel = get_function("gemm_4bit_wgmma.cu", expr.format(_MMA_STRUCT[fmt], str(qs.nested).lower()))
        if tokens in _WGMMA_SETMAXNREG:
            _check_launch_registers(kernel, tokens)
        threads, smem = _wgmma_threads(tokens, groups), _wgmma_smem(tokens)
        _allow_smem(kernel, smem)
        # The workspace is read only when K is split (tiles split_from..); unsplit launches pass
        # the output twice. (The partials are the multiplying warpgroups', not the scale warps'.)
        split_tiles = ctas - split_from
        accs, mma_threads = _wgmma_accs(tokens, groups), _wgmma_mma_threads(tokens, groups)
        workspace = _split_workspace(ksplit, split_tiles, accs, mma_threads) if ksplit > 1 else (out_bits, out_bits)
        x_map = _wgmma_x_map(a_bits, M, K, tokens) if tma else _tensor_map.zero_map()  # (unread without TMA)
        out_map = _wgmma_out_map(out_bits, M, N, tokens) if tma else None
        args = _mma_args(a_bits, fmt, M, N, K, packed, qs, bias_bits, out_bits, ksplit, chunks, *workspace,
                         np.int32(split_from), x_map, _tensor_map.zero_map() if out_map is None else out_map,
                         np.int32(out_map is not None))  # fmt: skip
        return kernel, (ctas, ksplit), (threads,), args, smem
    if path.startswith("tile"):
        mt = rt = ks = None
        if path != "tile":
            shape, _, forced = path[5:].partition("k")
            mt, rt = (int(v) for v in shape.split("x"))
            ks = int(forced) if forced else None
        kernel, chunks, ctas, ksplit, smem, mt, rt = _pick_tile(M, N, K, mt, rt, ks, tiled)
        if ksplit > 1:
            grid = (ctas, ksplit)
            tile_args = _split_workspace(ksplit, ctas, 4 * mt * rt)  # float32 accumulators a thread
        else:  # gemm_4bit_tile deals its row groups out over up to one wave of CTAs
            row_groups = -(-((N + 15) // 16) // rt)
            kernel = get_function("gemm_4bit.cu", kernel.format(_MMA_STRUCT[fmt], str(qs.nested).lower()))
            _allow_smem(kernel, smem)
            grid = (_tile_ctas(row_groups, chunks, _blocks_per_sm(kernel.kernel.ptr, 32 * _MMA_WARPS, smem)),)
            args = _mma_args(a_bits, fmt, M, N, K, packed, qs, bias_bits, out_bits, 1, chunks)
            return kernel, grid, (32 * _MMA_WARPS,), args, smem
    elif path.startswith("stage") or (path == "mma" and _stage_default(M, N, K, tiled)):
        # "stage" or "stage-<rt>x<stages>c<chunk>w<warps>": gemm_4bit_stage
        config = _stage_config(M, path[6:] if path.startswith("stage-") else None)
        tiles, rt, stages, chunk, warps = config
        smem = _stage_smem(rt, stages, chunk, warps)
        kernel = get_function("gemm_4bit.cu", f"gemm_4bit_stage<{_MMA_STRUCT[fmt]}, {str(qs.nested).lower()}, "
                              f"{tiles}, {rt}, {stages}, {chunk}, {warps}>")  # fmt: skip
        _allow_smem(kernel, smem)
        ksplit, ctas = _stage_grid(config, N, K, _blocks_per_sm(kernel.kernel.ptr, 32 * warps, smem))
        return kernel, (ctas,), (32 * warps,), _mma_args(a_bits, fmt, M, N, K, packed, qs, bias_bits, out_bits,
                                                         ksplit, 1), smem  # fmt: skip
    else:
        chunked = path == "mma-chunks"
        if path not in ("mma", "mma-wide", "mma-chunks") and M > 8 * _MMA_TOKEN_TILES[1]:
            raise ValueError(f"path {path!r} forces gemm_4bit_small, which takes up to 16 tokens a CTA, got M = {M} "
                             f"(\"mma-chunks\" runs more in 16-token chunks)")  # fmt: skip
        rt = _SMALL_PATH_RT.get(path)
        frag = path.startswith("mma-frag") or (path in ("mma", *_SMALL_PATH_WARPS) and _frag_default(M, N))
        warps = _SMALL_PATH_WARPS.get(path, 8 if tiled and M <= 8 else None)
        kernel, tiles, chunks, ksplit, ctas, warps = _pick_mma(M, N, K, rt, path == "mma-wide", frag, warps, tiled,
                                                               chunked)  # fmt: skip
        grid = (ctas,)
        if frag:  # A into fragment order first (same stream), the kernel reads that copy
            a_bits = _fragment_order(a_bits, M, K, tiles * chunks)
    kernel = get_function("gemm_4bit.cu", kernel.format(_MMA_STRUCT[fmt], str(qs.nested).lower()))
    if smem:
        _allow_smem(kernel, smem)
    args = _mma_args(a_bits, fmt, M, N, K, packed, qs, bias_bits, out_bits, ksplit, chunks, *tile_args)
    return kernel, grid, (32 * warps,), args, smem


def _small_chunks_default(M: int, N: int, K: int) -> bool:
    """Whether the default tensor-core dispatch runs 17.._SMALL_CHUNKS_MAX_M tokens on
    ``gemm_4bit_small`` in 16-token chunks ("mma-chunks"): weights of at most
    _SMALL_CHUNKS_MAX_N rows and _SMALL_CHUNKS_MAX_K columns."""
    return 8 * _MMA_TOKEN_TILES[1] < M <= _SMALL_CHUNKS_MAX_M and N <= _SMALL_CHUNKS_MAX_N and K <= _SMALL_CHUNKS_MAX_K


def _stage_default(M: int, N: int, K: int, tiled: bool = False) -> bool:
    """Whether the default tensor-core dispatch runs ``gemm_4bit_stage`` (_STAGE_CONFIGS):
    1..8 tokens of a row-major weight with long K and enough row tiles an SM. It reads the
    row-major layout only; tiled weights take gemm_4bit_small with 8 warps (faster there,
    run 32 of NOTES_matmul_4bit.md)."""
    return not tiled and M <= 8 and K >= _STAGE_MIN_K and -(-N // 16) >= _STAGE_MIN_ROW_TILES_PER_SM * _sm_count()


def _frag_default(M: int, N: int) -> bool:
    """Whether the default tensor-core dispatch reads A in fragment order (_FRAG_MIN_N)."""
    return 8 < M <= 8 * _MMA_TOKEN_TILES[1] and N >= _FRAG_MIN_N


def _fragment_order(a_bits: Any, M: int, K: int, tiles: int) -> Any:
    """A (M x K 16-bit) copied into gemm_4bit_small's fragment order for ``tiles`` token
    tiles (a fresh array from the current pool, written on the current stream)."""
    from .rawkernels import get_function

    units = -(-K // _MMA_SEGMENT) * tiles * 128
    out = _xp.cupy().empty(units * 8, dtype=np.uint16)
    kernel = get_function("gemm_4bit.cu", "permute_fragments")
    kernel((-(-units // 256),), (256,), (a_bits, out, np.int32(M), np.int32(K), np.int32(tiles), np.int32(units)))
    return out


def _gemv_args(a_bits, fmt, M, N, K, packed, qs, bias_bits, out_bits) -> tuple[Any, ...]:
    """The argument list every fused kernel starts with (A, bias and out at 0, 8 and 9); the
    CUDA-core GEMVs take exactly these."""
    has_bias = bias_bits is not None
    return (
        a_bits, *_kernel_common(fmt, packed, qs), bias_bits if has_bias else out_bits, out_bits,
        np.int32(M), np.int32(N), np.int32(K), np.int32(qs.blocksize.bit_length() - 1), np.int32(has_bias),
    )  # fmt: skip


def _mma_args(a_bits, fmt, M, N, K, packed, qs, bias_bits, out_bits, ksplit, chunks, *extra) -> tuple[Any, ...]:
    """The argument list every tensor-core kernel takes: :func:`_gemv_args`, then the K split,
    the token chunks and any workspace."""
    base = _gemv_args(a_bits, fmt, M, N, K, packed, qs, bias_bits, out_bits)
    return (*base, np.int32(ksplit), np.int32(chunks), *extra)


def _split_workspace(ksplit: int, ctas: int, frag: int, threads: int = 32 * _MMA_WARPS) -> tuple[Any, Any]:
    """(partial, counters) of a split-K launch (``gemm_4bit_tile_split``, ``gemm_4bit_wgmma``):
    float32 partial sums, ``frag`` accumulators a thread of ``threads`` threads of each of the
    ``ksplit * ctas`` CTAs, and one arrival counter a tile, zeroed here (a memset on the
    current stream, capturable) and left zeroed by the kernel. From the current CuPy pool, so
    stream-ordered like the output."""
    cp = _xp.cupy()
    partial = cp.empty(ksplit * ctas * frag * threads, dtype=np.float32)
    return partial, cp.zeros(ctas, dtype=np.uint32)


def _gemv_rows(M: int, N: int, sms: int) -> int:
    """Weight rows a warp of gemv_4bit for M activation rows and N weight rows on ``sms`` SMs."""
    if M > 1 and -(-N // (_GEMV_WARPS * _GEMV_ROWS_WIDE)) >= sms:
        return _GEMV_ROWS_WIDE
    return _GEMV_ROWS


def _gemv_launch(a_bits, fmt, M, N, K, packed, qs, bias_bits, out_bits, aligned: bool, tiled: bool = False):
    """(kernel, grid, block, args, shared bytes) of the CUDA-core GEMV; ``tiled`` (aligned
    only): ``packed`` in tile order."""
    from .rawkernels import get_function

    if tiled and not aligned:
        raise ValueError("the CUDA-core GEMV reads a tiled weight only with K % 32 == 0 and 16-byte aligned A and B")
    mr = 1 if M == 1 else 4
    rows = _gemv_rows(M, N, _sm_count())
    flags = f"{str(aligned).lower()}{_TILED_ARG[tiled]}"
    expr = f"gemv_4bit<{_GEMV_STRUCT[fmt]}, {str(qs.nested).lower()}, {mr}, {rows}, {flags}>"
    kernel = get_function("gemv_4bit.cu", expr)
    grid = (-(-N // (_GEMV_WARPS * rows)), -(-M // mr))
    args = _gemv_args(a_bits, fmt, M, N, K, packed, qs, bias_bits, out_bits)
    return kernel, grid, (32 * _GEMV_WARPS,), args, 0


def _half_pick(N: int, K: int, sms: int, smem_per_sm: int) -> tuple[int, int, int, bool]:
    """The gemv_4bit_half configuration for an (N, K) weight on ``sms`` SMs.

    A warp's work is whole rows, so the grid runs in waves of ``ctas * sms`` CTAs and the
    last wave decides much of the time: of the staged configurations whose CTAs fit
    ``smem_per_sm`` bytes an SM, the one whose grid fills the most of its last wave, ties
    (to 1%) to more rows a warp (fewer activation reads a weight byte). H100, graph us
    (NOTES_matmul_4bit.md, run 17), the pick first: 4096 x 4096 2x2c3 7.3 (4x2c2 7.8, 4x1c3
    8.6); 11008 x 4096 4x1c3 12.7 (2x2c3 13.6, 4x2c2 15.7); 28672 x 8192 2x2c3 47.4 (4x2c2
    49.6, 4x1c3 49.4); 8192 x 28672 4x2c2 46.2 (the only one whose staged A fits). Where no
    staged copy fits, the unstaged configuration."""
    staged_bytes = 128 * -(-K // 64)
    best, best_key = _HALF_CONFIGS[-1], None
    for config in _HALF_CONFIGS:
        rows, _, ctas, staged = config
        if not staged or ctas * (_HALF_STATIC_SMEM + staged_bytes + _CTA_RESERVED_SMEM) > smem_per_sm:
            continue
        grid, slots = -(-N // (_HALF_WARPS * rows)), ctas * sms
        key = (round(grid / (-(-grid // slots) * slots), 2), rows)
        if best_key is None or key > best_key:
            best, best_key = config, key
    return best


def _half_config(path: str, N: int, K: int) -> tuple[int, int, int, bool]:
    """(rows, unroll, ctas, staged) of a "half" (picked for the shape) or a forced
    "half-<rows>x<unroll>c<ctas>[s]" path."""
    if path == "half":
        return _half_pick(N, K, _sm_count(), _smem_per_sm())
    rows, _, rest = path[5:].partition("x")
    unroll, _, ctas = rest.partition("c")
    config = (int(rows), int(unroll), int(ctas.rstrip("s")), ctas.endswith("s"))
    if config not in _HALF_CONFIGS:
        raise ValueError(f"gemv_4bit_half is built for (rows, unroll, ctas, staged) in {_HALF_CONFIGS}, got {config}")
    return config


def _half_path(config: tuple[int, int, int, bool]) -> str:
    rows, unroll, ctas, staged = config
    return f"half-{rows}x{unroll}c{ctas}{'s' if staged else ''}"


def _half_applies(fmt: str, M: int, N: int, K: int, aligned: bool) -> bool:
    return fmt != "float32" and M == 1 and aligned and N * K < _HALF_MAX_ELEMENTS


def _half_launch(a_bits, fmt, M, N, K, packed, qs, bias_bits, out_bits, path: str = "half", tiled: bool = False):
    """(kernel, grid, block, args, shared bytes) of gemv_4bit_half (one fp16 / bf16 token);
    ``tiled``: ``packed`` in tile order."""
    from .rawkernels import get_function

    rows, unroll, ctas, staged = _half_config(path, N, K)
    grid = -(-N // (_HALF_WARPS * rows))
    order = _half_order(tiled, _prologue_first(grid, ctas, _HALF_WARPS * rows, K))
    flags = f"{str(qs.nested).lower()}, {rows}, {unroll}, {ctas}, {str(staged).lower()}{order}"
    kernel = get_function("gemv_4bit.cu", f"gemv_4bit_half<{_GEMV_STRUCT[fmt]}, {flags}>")
    smem = 128 * -(-K // 64) if staged else 0
    limit = _xp.device_attribute("MaxSharedMemoryPerBlockOptin")
    if _HALF_STATIC_SMEM + smem > limit:
        raise ValueError(f"{path!r} stages A in {smem} bytes of shared memory (K = {K}); with the byte table that "
                         f"exceeds the {limit} bytes a block may have")  # fmt: skip
    if smem:
        _allow_smem(kernel, smem)
    args = _gemv_args(a_bits, fmt, M, N, K, packed, qs, bias_bits, out_bits)
    return kernel, (grid,), (32 * _HALF_WARPS,), args, smem


# The most packed weight bytes a CTA of the one-token kernels for which they issue their
# prologue's loads first: where a CTA's stream of weights is short, the prologue's latency
# is what its multiplies wait for; a longer stream does better started at once. H100, run 46
# of NOTES_matmul_4bit.md, us, one fp16 token, row-major / tiled, weights first -> prologue
# first (bytes a CTA): 4096 x 4096 (16 rows, 32 KB) 7.35 / 7.23 -> 6.95 / 6.42; 11008 x
# 4096 (32 rows, 64 KB) 12.66 / 12.61 -> 12.20 / 11.89; 4096 x 14336 (16 rows, 112 KB)
# 16.39 / 16.20 -> 16.36 / 15.86; 14336 x 4096 tiled (64 rows, 128 KB) 15.91 -> 15.62; but
# 8192 x 16384 (32 rows, 256 KB) 29.23 / 28.48 -> 29.99 / 29.07 and 8192 x 28672 (448 KB)
# 46.89 / 46.31 -> 47.74 / 47.47.
_PROLOGUE_FIRST_MAX_CTA_BYTES = 128 * 1024


def _half_order(tiled: bool, first: bool) -> str:
    """gemv_4bit_half's trailing template arguments: TILED, then PROLOGUE_FIRST where ``first``."""
    return f", {str(tiled).lower()}, true" if first else _TILED_ARG[tiled]


def _tgemv_order(fmt: str, first: bool, wide: bool = False) -> str:
    """gemv_4bit_tiled's trailing template arguments: PROLOGUE_FIRST where ``first``, then
    AHEAD for bf16 (_TGEMV_SHORT_PROLOGUE_AHEAD); a ``wide`` build (_TGEMV_WIDE_CONFIG) spells
    all three out (AHEAD _TGEMV_SHORT_PROLOGUE_AHEAD in either format where ``first``,
    otherwise its default, the configuration's UNROLL), then WIDE."""
    if wide:
        ahead = _TGEMV_SHORT_PROLOGUE_AHEAD if first else _TGEMV_WIDE_CONFIG[1]
        return f", {str(first).lower()}, {ahead}, true"
    if fmt == "bfloat16" and first:
        return f", true, {_TGEMV_SHORT_PROLOGUE_AHEAD}"
    return ", true" if first else ""


def _prologue_first(grid: int, ctas: int, rows: int, K: int) -> bool:
    """Whether the one-token kernels take their PROLOGUE_FIRST build (gemv_4bit.cu) for a grid
    of ``grid`` CTAs of ``rows`` weight rows, ``ctas`` an SM: where the grid is one wave (a
    later wave's CTAs do better starting their weights at once: 28672 x 8192 tiled 49.8 us,
    50.5 with the prologue first) and a CTA's weights are at most
    _PROLOGUE_FIRST_MAX_CTA_BYTES."""
    return grid <= ctas * _sm_count() and rows * K // 2 <= _PROLOGUE_FIRST_MAX_CTA_BYTES


def _launch_mma(a_bits, fmt, M, N, K, packed, qs, bias_bits, out_bits, path: str = "mma", tiled: bool = False) -> None:
    kernel, grid, block, args, smem = _mma_launch(a_bits, fmt, M, N, K, packed, qs, bias_bits, out_bits, path, tiled)
    kernel(grid, block, args, shared_mem=smem)


def _launch_gemv(a_bits, fmt, M, N, K, packed, qs, bias_bits, out_bits, aligned: bool, tiled: bool = False) -> None:
    kernel, grid, block, args, _ = _gemv_launch(a_bits, fmt, M, N, K, packed, qs, bias_bits, out_bits, aligned, tiled)
    kernel(grid, block, args)


# Positions of the per-call pointers in both kernels' argument lists.
_ARG_A, _ARG_BIAS, _ARG_OUT = 0, 8, 9


_CTYPE_OF = {"int32": ctypes.c_int32, "int64": ctypes.c_int64, "uint32": ctypes.c_uint32, "float32": ctypes.c_float}


class FusedLaunch:
    """A fused 4-bit matmul launch prepared once for one weight, format and M.

    The kernel, grid and every weight-side argument are fixed in a ctypes parameter block;
    a call writes only the activation, bias and output addresses into it and launches on
    the given stream (cuLaunchKernel copies the parameters, so the block is reused). The
    per-call host cost is that one driver call. The prepared arguments assume a 16-byte
    aligned, contiguous A of M x K values (check with :meth:`accepts`). Launches that need a
    buffer a call (a split-K workspace, A in fragment order) or tensor maps of A and the
    output (the X_TMA build of ``gemm_4bit_wgmma``) are never prepared (:func:`prepare_fused`).
    """

    __slots__ = ("_function", "_dims", "_values", "_params", "_lock", "_keep")

    def __init__(self, kernel: Any, grid: tuple, block: tuple, args: tuple, keep: tuple, shared_mem: int = 0) -> None:
        self._function = kernel.kernel.ptr  # the compiled CUfunction of the current device
        self._dims = (*grid, *(1,) * (3 - len(grid)), *block, *(1,) * (3 - len(block)), shared_mem)
        self._values = [
            ctypes.c_uint64(a.data.ptr) if _xp.is_cupy_array(a)
            else ctypes.create_string_buffer(a.tobytes(), a.nbytes) if np.asarray(a).dtype == _tensor_map.MAP_DTYPE
            else _CTYPE_OF[np.asarray(a).dtype.name](a.item())
            for a in args
        ]  # fmt: skip
        self._params = (ctypes.c_void_p * len(args))(*(ctypes.addressof(v) for v in self._values))
        self._lock = threading.Lock()  # the parameter block is shared by the threads using this weight
        self._keep = keep  # the arrays whose addresses the arguments hold stay alive

    @staticmethod
    def accepts(a_ptr: int) -> bool:
        return a_ptr % 16 == 0

    def __call__(self, a_ptr: int, bias_ptr: int | None, out_ptr: int, stream_ptr: int) -> None:
        """Launch on the CUDA stream ``stream_ptr`` of the prepared device, with raw pointers."""
        values = self._values
        with self._lock:
            values[_ARG_A].value = a_ptr
            values[_ARG_OUT].value = out_ptr
            values[_ARG_BIAS].value = out_ptr if bias_ptr is None else bias_ptr
            _xp.cupy().cuda.driver.launchKernel(
                self._function, *self._dims, stream_ptr, ctypes.addressof(self._params), 0
            )


def prepare_fused(fmt: str, M: int, packed: Any, quant_state: QuantState, has_bias: bool,
                  tiled: bool = False) -> FusedLaunch | None:  # fmt: skip
    """A :class:`FusedLaunch` for ``M`` rows of ``fmt`` activations against the CuPy
    weight ``packed`` / ``quant_state`` (bitsandbytes layout; ``tiled``: the tile order of
    :mod:`cupyquant.tiled_4bit`), or None where the fused kernels do not apply (M above
    :func:`fused_max_m`, empty shapes; a tiled weight at an odd address) or the launch needs
    a buffer a call (split K, A in fragment order) or tensor maps of A and the output. Call
    inside the weight's device context."""
    N, K = _weight_shape(quant_state)
    aligned = K % 32 == 0 and packed.data.ptr % 16 == 0  # A: FusedLaunch.accepts, per call
    if M < 1 or N == 0 or K == 0 or not _fused_applies(fmt, M, N, K, aligned):
        return None
    if tiled and not aligned:
        return None  # the general path copies the weight into the bitsandbytes layout
    cp = _xp.cupy()
    # Stand-ins with the right dtype for the per-call pointers (replaced at each call).
    a_stub = cp.empty(0, dtype=_xp.storage_dtype(fmt))
    bias_stub = a_stub if has_bias else None
    operands = (a_stub, fmt, M, N, K, packed, quant_state, bias_stub, a_stub)
    if tiled and _tgemv_applies(fmt, M, N, K, aligned):
        kernel, grid, block, args, smem = _tgemv_launch(*operands)
    elif _half_applies(fmt, M, N, K, aligned):
        kernel, grid, block, args, smem = _half_launch(*operands, tiled=tiled)
    elif fmt != "float32" and aligned:
        if _frag_default(M, N) or _wgmma_tma_routed(M, N, K):
            # A is copied into fragment order a call, into a buffer from the pool on the
            # call's stream, or named by a tensor map that holds its address, which the
            # prepared block does not rewrite: the general path does those.
            return None
        kernel, grid, block, args, smem = _mma_launch(*operands, tiled=tiled)
        if len(grid) > 1 and grid[1] > 1:
            # gemm_4bit_tile_split (K split over grid.y) needs a workspace per launch: one kept
            # here would be shared by concurrent streams and recorded into CUDA graphs that
            # outlive it. The general path allocates it per call, in stream order.
            return None
    else:
        launch = _gemv_launch(a_stub, fmt, M, N, K, packed, quant_state, bias_stub, a_stub, aligned, tiled)
        kernel, grid, block, args, smem = launch
    return FusedLaunch(kernel, grid, block, args, keep=(packed, quant_state, args), shared_mem=smem)


def _tgemv_fits(config: tuple[int, int, int], K: int, smem_per_sm: int) -> bool:
    """Whether ``config``'s CTAs an SM fit ``smem_per_sm`` bytes with A (K values) staged."""
    return config[2] * (_TGEMV_STATIC_SMEM + 2 * K + _CTA_RESERVED_SMEM) <= smem_per_sm


def _tgemv_pick(N: int, K: int, smem_per_sm: int) -> tuple[int, int, int] | None:
    """The gemv_4bit_tiled configuration for a tiled (N, K) weight: the first of the shape's
    preferences whose CTAs fit ``smem_per_sm`` bytes with A staged; None where none does
    (gemv_4bit_half serves those). H100, graph us, the preferred configuration first
    (NOTES_matmul_4bit.md, run 37): under 512 strips (8192 rows) one strip a CTA, 4096 x
    4096 1x2c3 7.3 (2x3c2 7.8), 4096 x 14336 16.3 (1x3c2 15.3, 2x3c2 18.2); K >= 8192 two
    strips at 3 tiles in flight, 28672 x 8192 49.6 (2x2c3 50.4, 1x2c3 50.8), 8192 x 28672
    46.7 (2x4c2 46.7, 1x3c2 48.8); shorter K, from 800 strips four, 14336 x 4096 16.1 (2x2c3
    18.7), else two at 3 CTAs an SM, 11008 x 4096 12.7 (4x4c2 15.4)."""
    strips = N // 16
    if strips < 512:
        preferred = ((1, 2, 3), (1, 3, 2))
    elif K >= 8192:
        preferred = ((2, 3, 2),)
    elif strips >= 800:
        preferred = ((4, 4, 2),)
    else:
        preferred = ((2, 2, 3), (2, 3, 2))
    return next((c for c in preferred if _tgemv_fits(c, K, smem_per_sm)), None)


def _tgemv_applies(fmt: str, M: int, N: int, K: int, aligned: bool) -> bool:
    """gemv_4bit_tiled's domain: gemv_4bit_half's, on a tiled weight, with A staged."""
    return _half_applies(fmt, M, N, K, aligned) and _tgemv_pick(N, K, _smem_per_sm()) is not None


def _tgemv_wide(config: tuple[int, int, int], N: int, K: int, smem_per_sm: int, sms: int) -> bool:
    """Whether gemv_4bit_tiled takes its WIDE build for a tiled (N, K) weight in ``config``:
    the wide configuration, where two of its CTAs (each the 64 KB table and A's 2K bytes)
    fit an SM and hold the grid in one wave. H100, one token, us, narrow / wide (fp16, bf16;
    NOTES_matmul_4bit.md runs 123-125): 4096 x 4096 6.45 / 6.36, 6.40 / 6.17; 2048 x 4096
    5.16 / 4.95, 5.29 / 4.91; 4096 x 11008 12.88 / 12.39, 12.62 / 12.08. Three wide CTAs an
    SM leave L1 too little room (11008 x 4096 on 2-strip CTAs 11.95 / 12.21), and two waves
    lose outright (5120 x 5120: 8.7 / 10.9)."""
    per_cta = _TGEMV_WIDE_STATIC_SMEM + _TGEMV_WIDE_TABLE + 2 * K + _CTA_RESERVED_SMEM
    grid = -(-(N // 16) // config[0])
    return config == _TGEMV_WIDE_CONFIG and 2 * per_cta <= smem_per_sm and grid <= 2 * sms


def _tgemv_config(path: str, N: int, K: int) -> tuple[int, int, int, bool]:
    """(strips, unroll, ctas, wide) of "tgemv" (picked for the shape) or a forced
    "tgemv-<strips>x<unroll>c<ctas>" (the narrow table) or "...w" (the wide one)."""
    if path == "tgemv":
        config = _tgemv_pick(N, K, _smem_per_sm())
        if config is None:
            raise ValueError(f"gemv_4bit_tiled stages A in shared memory; K = {K} is too long for it")
        return (*config, _tgemv_wide(config, N, K, _smem_per_sm(), _sm_count()))
    match = re.fullmatch(r"tgemv-(\d+)x(\d+)c(\d+)(w?)", path)
    config = tuple(int(v) for v in match.groups()[:3]) if match else None
    if config not in _TGEMV_CONFIGS:
        raise ValueError(f"gemv_4bit_tiled is built for (strips, unroll, ctas) in {_TGEMV_CONFIGS}, got path {path!r}")
    wide = match.group(4) == "w"
    if wide and config != _TGEMV_WIDE_CONFIG:
        raise ValueError(f"gemv_4bit_tiled's wide table is built for {_TGEMV_WIDE_CONFIG} only, got path {path!r}")
    return (*config, wide)


def _tgemv_launch(a_bits, fmt, M, N, K, packed, qs, bias_bits, out_bits, path: str = "tgemv"):
    """(kernel, grid, block, args, shared bytes) of gemv_4bit_tiled (one fp16 / bf16 token,
    ``packed`` in tile order)."""
    from .rawkernels import get_function

    strips, unroll, ctas, wide = _tgemv_config(path, N, K)
    grid = -(-(N // 16) // strips)
    order = _tgemv_order(fmt, _prologue_first(grid, ctas, 16 * strips, K), wide)
    flags = f"{str(qs.nested).lower()}, {strips}, {unroll}, {ctas}{order}"
    kernel = get_function("gemv_4bit.cu", f"gemv_4bit_tiled<{_GEMV_STRUCT[fmt]}, {flags}>")
    smem = 2 * K + (_TGEMV_WIDE_TABLE if wide else 0)
    limit = _xp.device_attribute("MaxSharedMemoryPerBlockOptin")
    if (_TGEMV_WIDE_STATIC_SMEM if wide else _TGEMV_STATIC_SMEM) + smem > limit:
        raise ValueError(f"{path!r} stages A in {smem} bytes of shared memory (K = {K}); with the byte table that "
                         f"exceeds the {limit} bytes a block may have")  # fmt: skip
    _allow_smem(kernel, smem)
    args = _gemv_args(a_bits, fmt, M, N, K, packed, qs, bias_bits, out_bits)
    return kernel, (grid,), (32 * _HALF_WARPS,), args, smem


def _aligned(K: int, *arrays: Any) -> bool:
    return K % 32 == 0 and all(a.data.ptr % 16 == 0 for a in arrays)


def _matmul_fused(a_bits, fmt, M, N, K, packed, qs, bias_bits, out_bits, path: str | None = None,
                  tiled: bool = False) -> None:  # fmt: skip
    """The fused kernels. ``path`` forces one (tests, benchmarks): "half" / "half-<rows>x<unroll>c<ctas>[s]"
    (``gemv_4bit_half``, one fp16 / bf16 token), "tgemv" / "tgemv-<strips>x<unroll>c<ctas>"
    (``gemv_4bit_tiled``, one fp16 / bf16 token on a tiled weight), "gemv", "mma" (the
    tensor-core dispatch), "mma-rt1" / "mma-rt2" (``gemm_4bit_small``, row tiles a warp, up
    to 16 tokens; "mma-chunks": any M, in 16-token chunks), "mma-frag" (``gemm_4bit_small``
    on A in fragment order, up to 16 tokens),
    "stage" / "stage-<rt>x<stages>c<chunk>w<warps>" (``gemm_4bit_stage``, up
    to 8 tokens), "mma-wide" (``gemm_4bit_mma``), "tile" / "tile-<mt>x<rt>"
    (``gemm_4bit_tile``); None picks the best that applies. ``tiled``: ``packed`` is in tile
    order (aligned; not the "stage" paths)."""
    if path is not None and path != "gemv" and not path.startswith(("half", "tgemv", "mma", "tile", "stage", "wgmma")):
        raise ValueError(f"unknown fused path {path!r}")
    if path is not None and path.startswith("tgemv") and not tiled:
        raise ValueError(f"path {path!r} (gemv_4bit_tiled) needs a tiled weight")
    aligned = _aligned(K, a_bits, packed)
    if path is None:
        path = "half" if _half_applies(fmt, M, N, K, aligned) else "mma" if fmt != "float32" and aligned else "gemv"
        if path == "half" and tiled and _tgemv_applies(fmt, M, N, K, aligned):
            path = "tgemv"
    if path.startswith("tgemv"):
        if not _half_applies(fmt, M, N, K, aligned):
            raise ValueError("gemv_4bit_tiled needs one row of fp16 / bf16 activations, 16-byte aligned A and B, "
                             "and N * K < 2^37")  # fmt: skip
        kernel, grid, block, args, smem = _tgemv_launch(a_bits, fmt, M, N, K, packed, qs, bias_bits, out_bits, path)
        kernel(grid, block, args, shared_mem=smem)
    elif path.startswith("half"):
        if not _half_applies(fmt, M, N, K, aligned):
            raise ValueError("gemv_4bit_half needs one row of fp16 / bf16 activations, K % 32 == 0, 16-byte "
                             "aligned A and B, and N * K < 2^37")  # fmt: skip
        launch = _half_launch(a_bits, fmt, M, N, K, packed, qs, bias_bits, out_bits, path, tiled)
        kernel, grid, block, args, smem = launch
        kernel(grid, block, args, shared_mem=smem)
    elif path.startswith(("mma", "tile", "stage", "wgmma")):
        if fmt == "float32" or not aligned:
            raise ValueError(
                "the tensor-core kernels need fp16/bf16 activations, K % 32 == 0 and 16-byte aligned A and B"
            )
        _launch_mma(a_bits, fmt, M, N, K, packed, qs, bias_bits, out_bits, path, tiled)
    else:
        _launch_gemv(a_bits, fmt, M, N, K, packed, qs, bias_bits, out_bits, aligned, tiled)


def _matmul_dequant_gemm(a_bits, fmt, M, N, K, packed, qs, bias_bits, out_bits, tiled: bool = False) -> None:
    """Dequantize W to A's format, then cublasGemmEx (float32 compute) into ``out_bits``;
    ``tiled``: ``packed`` in tile order (the dequantize kernel reads it in place)."""
    from . import _gpu

    cp = _xp.cupy()
    weight = cp.empty(N * K, dtype=_xp.storage_dtype(fmt))
    scales = _gpu_scales(qs, qs.absmax.size)
    _gpu.dequantize_4bit(packed, fmt, qs.blocksize, qs.quant_type, scales, weight, K if tiled else 0)
    beta = _ZERO
    if bias_bits is not None:
        out_bits.reshape(M, N)[...] = bias_bits  # C = bias, beta = 1: the bias is added in float32
        beta = _ONE
    # Row-major out (M, N) is column-major out^T (N, M) = W (N, K) @ A^T (K, M); W row-major is
    # column-major W^T with ld K (so op T), A row-major is column-major A^T with ld K (op N).
    dtype = _CUDA_R[fmt]
    _cublas.gemm_ex(
        _cublas.CUBLAS_OP_T, _cublas.CUBLAS_OP_N, N, M, K, _ONE.ctypes.data, weight.data.ptr, dtype, K,
        a_bits.data.ptr, dtype, K, beta.ctypes.data, out_bits.data.ptr, dtype, N, _cublas.CUBLAS_COMPUTE_32F,
    )  # fmt: skip


def _kernel_expressions(source: str) -> list[str]:
    """Every instantiation the launchers above can ask of ``source``."""
    nested = ("false", "true")
    if source == "gemv_4bit.cu":
        rows = ((1, _GEMV_ROWS), (4, _GEMV_ROWS), (4, _GEMV_ROWS_WIDE))
        return [f"gemv_4bit<{f}, {n}, {mr}, {r}, {a}>"
                for f in _GEMV_STRUCT.values() for n in nested for mr, r in rows for a in nested] + [
            f"gemv_4bit<{f}, {n}, {mr}, {r}, true, true>"
            for f in _GEMV_STRUCT.values() for n in nested for mr, r in rows] + [
            f"gemv_4bit_half<{f}, {n}, {r}, {u}, {c}, {str(st).lower()}{t}>"
            for f in ("Float16", "BFloat16") for n in nested for r, u, c, st in _HALF_CONFIGS
            for t in (_half_order(tiled, first) for tiled in (False, True) for first in (False, True))] + [
            f"gemv_4bit_tiled<{_GEMV_STRUCT[f]}, {n}, {st}, {u}, {c}{_tgemv_order(f, first, wide)}>"
            for f in ("float16", "bfloat16") for n in nested for st, u, c in _TGEMV_CONFIGS for first in (False, True)
            for wide in ((False, True) if (st, u, c) == _TGEMV_WIDE_CONFIG else (False,))]  # fmt: skip
    if source == "gemm_4bit_wgmma.cu":
        return [
            _wgmma_expression(tiled, tokens, tma, groups).format(f, n)
            for tokens, tma, groups in _WGMMA_BUILDS for tiled in (False, True) for f in _MMA_STRUCT.values()
            for n in nested]  # fmt: skip
    out = ["permute_fragments"]
    frag_flags = ("false", "true")
    for f in _MMA_STRUCT.values():
        for n in nested:
            out += [f"gemm_4bit_small<{f}, {n}, {mt}, {rt}, {a}, {w}{t}>"
                    for mt in (1, 2) for rt in (1, 2) for a in frag_flags for w in (4, 8)
                    for t in _TILED_ARG.values()]  # fmt: skip
            out += [f"gemm_4bit_small<{f}, {n}, {mt}, {rt}, {a}, 8, {t}, true>"
                    for mt in (1, 2) for rt in (1, 2) for a in frag_flags for t in ("false", "true")]  # fmt: skip
            out += [f"gemm_4bit_small<{f}, {n}, 2, 2, {a}, 8, {t}, {e}, {_SMALL_BATCH_TWO_TILES}>"
                    for a in frag_flags for t in ("false", "true") for e in ("false", "true")]  # fmt: skip
            out += [f"gemm_4bit_small<{f}, {n}, 2, 2, {a}, 8, {t}, true, {_SMALL_BATCH_TWO_TILES}, true>"
                    for a in frag_flags for t in ("false", "true")]  # fmt: skip
            out += [f"gemm_4bit_stage<{f}, {n}, {', '.join(map(str, c))}>" for c in _STAGE_CONFIGS]
            out += [f"gemm_4bit_mma<{f}, {n}, {mt}{t}>" for mt in _MMA_TOKEN_TILES for t in _TILED_ARG.values()]
            out += [f"gemm_4bit_tile<{f}, {n}, {mt}, {rt}{t}>" for mt, rt in _TILE_CONFIGS for t in _TILED_ARG.values()]
            out += [f"gemm_4bit_tile_split<{f}, {n}, {mt}, {rt}{t}>"
                    for mt, rt in _TILE_SPLIT_CONFIGS for t in _TILED_ARG.values()]  # fmt: skip
    return out


def _register() -> None:
    from .rawkernels import register_expressions

    for source in ("gemv_4bit.cu", "gemm_4bit.cu", "gemm_4bit_wgmma.cu"):
        register_expressions(source, functools.partial(_kernel_expressions, source))


_register()


# ---------------------------------------------------------------------------------------
# public array API
# ---------------------------------------------------------------------------------------
def matmul_4bit(A: Any, B: Any, quant_state: QuantState | None = None, out: Any = None, bias: Any = None) -> Any:
    """``A @ dequantize(B, quant_state)^T (+ bias)``.

    Args:
        A: (..., K) float32 / float16 / bfloat16 activations (NumPy or CuPy).
        B: the packed weight from ``quantize_4bit`` of an (N, K) matrix (any storage
            dtype, C-contiguous), or a :class:`~cupyquant.Tiled4bit` of it (faster at 2..16
            fp16 / bf16 tokens, see :mod:`cupyquant.tiled_4bit`).
        quant_state: B's QuantState (``shape == (N, K)``); for a Tiled4bit, None or its own.
        out: optional C-contiguous (..., N) output of A's dtype.
        bias: optional (N,) of A's dtype.

    Returns:
        (..., N) array of A's dtype: float32 accumulation (for one fp16 / bf16 row, of
        32-element chunk sums taken in A's dtype), rounded once to A's dtype.
    """
    _check_array(A, "A")
    tiled = isinstance(B, Tiled4bit)
    if tiled:
        if quant_state is not None and quant_state is not B.quant_state:
            raise ValueError(f"quant_state must be None or B.quant_state (the state B was tiled with) for a Tiled4bit "
                             f"B, got another {type(quant_state).__name__}")  # fmt: skip
        B, quant_state = B.data, B.quant_state
    elif quant_state is None:
        raise TypeError("quant_state is required unless B is a Tiled4bit")
    _check_array(B, "B")
    fmt = _xp.float_format(A)
    if A.ndim < 1:
        raise ValueError("A must have at least one dimension (..., K)")
    K = A.shape[-1]
    N, _ = _check_operands(K, quant_state)
    _xp.same_module(A, B, "A", "B")
    xp = _xp.array_module(A)
    lead = A.shape[:-1]
    M = int(np.prod(lead, dtype=np.int64))
    if bias is not None:
        _check_array(bias, "bias")
        _xp.same_module(A, bias, "A", "bias")
        if bias.size != N or _xp.float_format(bias, "bias") != fmt:
            raise ValueError(f"bias must be ({N},) of {fmt}, got {bias.shape} of {bias.dtype}")
    if out is not None:
        _check_array(out, "out")
        _xp.same_module(A, out, "A", "out")
        if out.shape != (*lead, N) or _xp.float_format(out, "out") != fmt or not out.flags.c_contiguous:
            raise ValueError(f"out must be a contiguous {(*lead, N)} array of {fmt}, got {out.shape} of {out.dtype}")
    if not B.flags.c_contiguous:
        raise ValueError("B (packed codes) must be C-contiguous")
    with _xp.device_of(A):
        result = out if out is not None else xp.empty((*lead, N), dtype=A.dtype)
        a_bits = xp.ascontiguousarray(_xp.storage_view(A)).reshape(-1)
        bias_bits = None if bias is None else xp.ascontiguousarray(_xp.storage_view(bias)).reshape(-1)
        matmul_4bit_bits(a_bits, fmt, M, B.reshape(-1).view(xp.uint8), quant_state, bias_bits,
                         _xp.storage_view(result).reshape(-1), tiled)  # fmt: skip
    return result


def gemv_4bit(A: Any, B: Any, quant_state: QuantState | None = None, out: Any = None, bias: Any = None) -> Any:
    """:func:`matmul_4bit` for a single row of activations (A has M = 1 rows)."""
    _check_array(A, "A")
    rows = int(np.prod(A.shape[:-1], dtype=np.int64)) if A.ndim else 0
    if rows != 1:
        raise ValueError(f"gemv_4bit needs exactly one row of activations (M = 1), got A of shape {A.shape}")
    return matmul_4bit(A, B, quant_state, out=out, bias=bias)
