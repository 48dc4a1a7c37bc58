"""gemm_4bit_wgmma, the 4-bit product on Hopper's warpgroup MMA: its grid rule on the CPU, and on
an H100 / H200 its results against the float64 reference, tile order against row-major, and
split-K determinism."""

from __future__ import annotations

import functools
import importlib
import shutil
import subprocess
import types

import numpy as np
import pytest

import cupyquant as cq
from cupyquant import rawkernels

from .test_matmul_4bit import TOLERANCE, make_case, reference, rel_error, replays_equal_eager, run_gpu, to_gpu

mm = importlib.import_module("cupyquant.matmul_4bit")


def test_wgmma_split_rule(monkeypatch):
    monkeypatch.setattr(mm, "_sm_count", lambda: 132)
    # (chunks, CTAs a split, ksplit, warpgroups a CTA)
    # 28672 x 8192 at 64 tokens: 224 CTAs already fill two an SM but for 40; no split.
    assert mm._pick_wgmma(64, 28672, 8192)[1:] == (1, 224, 1, 1)
    # 8192 x 28672: 64 CTAs, 448 stages: split 4 (256 CTAs).
    assert mm._pick_wgmma(64, 8192, 28672)[1:] == (1, 64, 4, 1)
    # 4096 x 4096: 32 CTAs, 64 stages: the split keeps 16 stages each, so 4 (not 8); 128
    # CTAs, one an SM, so on two warpgroups.
    assert mm._pick_wgmma(40, 4096, 4096)[1:] == (1, 32, 4, 2)
    # Token chunks of 64 multiply the CTAs.
    assert mm._pick_wgmma(130, 4096, 4096)[1:] == (3, 96, 2, 1)
    # A forced split is trimmed so that no split is empty: 5 stages in shares of 2 -> 3 splits.
    assert mm._pick_wgmma(17, 37, 320, ksplit=4)[3] == 3
    expr, *_ = mm._pick_wgmma(17, 64, 256, tiled=True, groups=1)
    assert expr == "gemm_4bit_wgmma<{}, {}, true>"
    with pytest.raises(ValueError, match="ksplit must be >= 1, got 0"):
        mm._pick_wgmma(17, 64, 256, ksplit=0)
    # 128 tokens a CTA (two warpgroups) fill an SM with one CTA: 28672 x 8192 at 512 tokens,
    # 896 CTAs, no split; 8192 x 28672 at 128 tokens: 64 CTAs, split 2.
    assert mm._pick_wgmma(512, 28672, 8192, tokens=128)[1:] == (4, 896, 1, 2)
    assert mm._pick_wgmma(128, 8192, 28672, tokens=128)[1:] == (1, 64, 2, 2)
    expr, *_ = mm._pick_wgmma(300, 64, 256, tokens=128)
    assert expr == "gemm_4bit_wgmma<{}, {}, false, 128>"
    expr, *_ = mm._pick_wgmma(300, 64, 256, tiled=True, tokens=128)
    assert expr == "gemm_4bit_wgmma<{}, {}, true, 128>"
    # 256 tokens a CTA: 28672 x 8192 at 512 tokens, 448 CTAs.
    assert mm._pick_wgmma(512, 28672, 8192, tokens=256)[1:] == (2, 448, 1, 2)
    with pytest.raises(ValueError, match=r"built for \(64, 128, 256\) tokens a CTA, got 512"):
        mm._pick_wgmma(17, 64, 256, tokens=512)


def test_wgmma_two_groups_rule(monkeypatch):
    # 64-token CTAs run on two warpgroups (one CTA an SM) where that split is more than half
    # the one-warpgroup build's (two CTAs an SM); wider CTAs always have two, and the TMA
    # build its own.
    monkeypatch.setattr(mm, "_sm_count", lambda: 132)
    assert mm._wgmma_groups(64, tma=False) == mm._wgmma_groups(64, tma=True) == 1
    assert mm._wgmma_groups(128, tma=False) == mm._wgmma_groups(256, tma=True) == 2
    # (ksplit, warpgroups) of (tokens, tiles, stages, tma, forced warpgroups)
    split = mm._wgmma_default_split
    assert split(64, 32, 64, False, None) == (4, 2)  # 4096 x 4096: 128 CTAs either way
    assert split(64, 33, 64, False, None) == (4, 2)  # 4224 x 4096: 132
    assert split(64, 40, 64, False, None) == (3, 2)  # 5120 x 4096: split 4 on one, 3 on two
    assert split(64, 40, 80, False, None) == (3, 2)  # 5120 x 5120: 5 against 3
    assert split(64, 24, 128, False, None) == (5, 2)  # 3072 x 8192: 8 against 5
    assert split(64, 48, 64, False, None) == (4, 1)  # 6144 x 4096: 4 against 2
    assert split(64, 64, 128, False, None) == (4, 1)  # 8192 x 8192: 4 against 2
    assert split(64, 224, 128, False, None) == (1, 1)  # 28672 x 8192: more tiles than SMs
    assert split(64, 40, 64, True, None) == (4, 1)  # the TMA build keeps its warpgroup
    assert split(64, 40, 64, False, 1) == (4, 1)  # forced: the split for the warpgroups
    assert split(64, 64, 128, False, 2) == (2, 2)
    assert split(128, 64, 128, False, None) == (2, 2)
    assert mm._pick_wgmma(64, 4224, 4096)[1:] == (1, 33, 4, 2)
    assert mm._pick_wgmma(64, 5120, 4096)[1:] == (1, 40, 3, 2)
    assert mm._pick_wgmma(64, 5120, 4096, groups=1)[1:] == (1, 40, 4, 1)
    # A forced split takes two warpgroups where its grid holds one CTA an SM.
    assert mm._pick_wgmma(64, 5120, 4096, ksplit=3)[1:] == (1, 40, 3, 2)
    assert mm._pick_wgmma(64, 5120, 4096, ksplit=4)[1:] == (1, 40, 4, 1)
    expr, *_ = mm._pick_wgmma(40, 4096, 4096, tiled=True)
    assert expr == "gemm_4bit_wgmma<{}, {}, true, 64, false, 2>"
    # Forced either way at 64 tokens; the launch constants follow the warpgroups.
    assert mm._pick_wgmma(64, 28672, 8192, groups=2)[1:] == (1, 224, 1, 2)
    assert mm._pick_wgmma(40, 4096, 4096, groups=1)[0] == "gemm_4bit_wgmma<{}, {}>"
    assert (mm._wgmma_threads(64, 2), mm._wgmma_accs(64, 2), mm._wgmma_mma_threads(64, 2)) == (288, 32, 256)
    assert (mm._wgmma_threads(64), mm._wgmma_accs(64), mm._wgmma_mma_threads(64)) == (160, 64, 128)
    with pytest.raises(ValueError, match="1 or 2 warpgroups at 64 tokens a CTA and 2 above, got 1 at 128"):
        mm._pick_wgmma(130, 4096, 4096, tokens=128, groups=1)
    with pytest.raises(ValueError, match="got 3 at 64"):
        mm._pick_wgmma(40, 4096, 4096, groups=3)
    with pytest.raises(ValueError, match="TMA build has 1 warpgroup.* at 64 tokens a CTA, got 2"):
        mm._pick_wgmma(40, 4096, 4096, tma=True, groups=2)


def test_wgmma_default_rule(monkeypatch):
    monkeypatch.setattr(mm, "_sm_count", lambda: 132)
    monkeypatch.setattr(mm, "_wgmma_supported", lambda: True)
    # From 33 tokens on weights of 4096+ rows, K split or not (the fused range bounds M), and
    # on 2048+ rows where K >= 8192.
    for M, N, K in ((33, 8192, 28672), (128, 8192, 28672), (192, 8192, 28672), (64, 28672, 8192),
                    (96, 11008, 4096), (40, 4096, 4096), (64, 4096, 4096), (33, 2048, 8192), (128, 3072, 8192),
                    (64, 2560, 10240)):  # fmt: skip
        assert mm._wgmma_default(M, N, K), (M, N, K)
    # Not below 33 tokens, not on weights under 4096 rows with K < 8192 nor under 2048, not off Hopper.
    for M, N, K in ((32, 8192, 28672), (32, 4096, 4096), (40, 4095, 4096), (64, 1024, 4096), (64, 3072, 8160),
                    (64, 2047, 8192), (32, 2048, 8192)):  # fmt: skip
        assert not mm._wgmma_default(M, N, K), (M, N, K)
    monkeypatch.setattr(mm, "_wgmma_supported", lambda: False)
    assert not mm._wgmma_default(64, 8192, 28672)


def test_fused_range_on_hopper(monkeypatch):
    # On an H100 / H200 gemm_4bit_wgmma takes weights of 4096+ rows up to 512 tokens where K
    # >= 8192, the weight has 8192+ rows and 512 tokens on 256-token CTAs fill 80% of their
    # waves; else up to 256 where K >= 8192 or the weight has 8192+ rows, else up to 128, and
    # up to 128 on 2048..4095 rows with K >= 8192; elsewhere (and with no GPU) 192 from 8192
    # rows, else 32.
    monkeypatch.setattr(mm._xp, "gpu_available", lambda: True)
    monkeypatch.setattr(mm, "_wgmma_supported", lambda: True)
    monkeypatch.setattr(mm, "_sm_count", lambda: 132)
    shapes = ((4096, 4096), (4095, 4096), (8192, 28672), (28672, 8192), (4096, 14336), (11008, 4096), (4095, 8192),
              (2048, 8192), (2047, 8192), (3072, 4096))  # fmt: skip
    assert [mm.fused_max_m("float16", N, K) for N, K in shapes] == [128, 32, 512, 512, 256, 256, 128, 128, 32, 32]
    # 11008 x 8192 at 512 tokens: 172 CTAs on 132 SMs, 65% of two waves; 8192 x 8192: 128 CTAs.
    assert mm.fused_max_m("float16", 11008, 8192) == 256 and mm.fused_max_m("float16", 8192, 8192) == 512
    assert mm.fused_max_m("float16", 14336, 4096) == 256  # K < 8192
    assert mm.fused_max_m("bfloat16", 4096, 4096) == 128
    assert mm.fused_max_m("float32", 4096, 4096) == 4  # the CUDA-core GEMV's range
    assert mm.fused_max_m("float16", 28672, 8192, current_device=False) == 192  # the CPU path's
    monkeypatch.setattr(mm, "_wgmma_supported", lambda: False)
    assert [mm.fused_max_m("float16", N, K) for N, K in shapes] == [32, 32, 192, 192, 32, 192, 32, 32, 32, 32]


def test_wgmma_tokens_rule(monkeypatch):
    # 64 tokens a CTA up to 64 tokens; above, the width whose grid takes the fewest waves of
    # cost-weighted stages: the fastest measured at each point of runs 36 and 39 of
    # NOTES_matmul_4bit.md (64 where wider CTAs would leave a last wave mostly empty).
    monkeypatch.setattr(mm, "_sm_count", lambda: 132)
    picks = {(64, 28672, 8192): 64, (65, 28672, 8192): 128, (128, 28672, 8192): 128, (160, 28672, 8192): 256,
             (256, 28672, 8192): 256, (192, 11008, 4096): 64, (192, 8192, 28672): 256, (192, 14336, 4096): 256,
             (96, 4096, 4096): 128, (128, 4096, 4096): 128, (256, 4096, 14336): 256, (100, 8192, 28672): 128,
             (256, 5120, 13824): 256}  # fmt: skip
    assert {shape: mm._wgmma_tokens(*shape) for shape in picks} == picks


def test_default_dispatch_reaches_the_wgmma_launcher(monkeypatch):
    # The launch the default tensor-core path builds where _wgmma_default holds, with the GPU
    # calls stubbed: gemm_4bit_wgmma, grid (CTAs, ksplit), block, shared memory, and the split
    # workspace (accumulators a thread, warpgroup threads).
    from cupyquant import rawkernels

    monkeypatch.setattr(mm, "_sm_count", lambda: 132)
    monkeypatch.setattr(mm, "_wgmma_supported", lambda: True)
    monkeypatch.setattr(rawkernels, "get_function", lambda f, e: (f, e))
    monkeypatch.setattr(mm, "_allow_smem", lambda kernel, nbytes: None)
    monkeypatch.setattr(mm, "_check_launch_registers", lambda kernel, tokens: None)
    workspaces = []
    monkeypatch.setattr(mm, "_split_workspace", lambda *shape: workspaces.append(shape) or ("partial", "counters"))
    maps, out_maps, tails = [], [], []
    # The workspace and split_from; the maps and the store flag are kept in tails.
    monkeypatch.setattr(mm, "_mma_args", lambda *args: tails.append(args[-3:]) or args[-6:-3])
    monkeypatch.setattr(mm, "_wgmma_x_map", lambda a, M, K, tokens: maps.append((M, K, tokens)) or "map")
    monkeypatch.setattr(mm, "_wgmma_out_map", lambda out, M, N, tokens: out_maps.append((M, N, tokens)) or "out map")
    a_bits, packed, qs, _ = make_case(64, 256, 1, "float16")
    qs.shape = (8192, 28672)
    kernel, grid, block, args, smem = mm._mma_launch(a_bits, "float16", 64, 8192, 28672, packed, qs, None, a_bits)
    assert kernel == ("gemm_4bit_wgmma.cu", "gemm_4bit_wgmma<MmaHalf, true>")
    assert grid == (64, 4) and block == (160,) and args == ("partial", "counters", 0) and smem == mm._wgmma_smem(64)
    # Above 64 tokens, 128 a CTA on two warpgroups (here split in 2).
    kernel, grid, block, args, smem = mm._mma_launch(a_bits, "float16", 100, 8192, 28672, packed, qs, None, a_bits)
    assert kernel == ("gemm_4bit_wgmma.cu", "gemm_4bit_wgmma<MmaHalf, true, false, 128>")
    assert grid == (64, 2) and block == (288,) and args == ("partial", "counters", 0) and smem == mm._wgmma_smem(128)
    assert maps == []  # the threads copy the activations of 64- and 128-token CTAs
    # Above 128, 256 a CTA on two warpgroups and a scale warpgroup (split in 2), the TMA unit
    # copying the activations through a tensor map of A.
    kernel, grid, block, args, smem = mm._mma_launch(a_bits, "float16", 200, 8192, 28672, packed, qs, None, a_bits)
    assert kernel == ("gemm_4bit_wgmma.cu", "gemm_4bit_wgmma<MmaHalf, true, false, 256, true>")
    assert grid == (64, 2) and block == (384,) and args == ("partial", "counters", 0) and smem == mm._wgmma_smem(256)
    assert workspaces == [(4, 64, 64, 128), (2, 64, 64, 256), (2, 64, 128, 256)]
    assert maps == [(200, 28672, 256)] and out_maps == [(200, 8192, 256)]
    # The threads' builds get zero maps and store their output themselves; the TMA build stores
    # through out's map.
    zero = mm._tensor_map.zero_map()
    assert all(t[0] is zero and t[1] is zero and t[2] == 0 for t in tails[:2])
    assert tails[2] == ("map", "out map", 1)
    # 4096 x 4096 at 40 tokens: 32 tiles split 4, one CTA an SM, so two warpgroups of 32
    # accumulators a thread.
    qs.shape = (4096, 4096)
    kernel, grid, block, args, smem = mm._mma_launch(a_bits, "float16", 40, 4096, 4096, packed, qs, None, a_bits)
    assert kernel == ("gemm_4bit_wgmma.cu", "gemm_4bit_wgmma<MmaHalf, true, false, 64, false, 2>")
    assert grid == (32, 4) and block == (288,) and smem == mm._wgmma_smem(64)
    assert workspaces[-1] == (4, 32, 32, 256)
    kernel, grid, block, *_ = mm._mma_launch(a_bits, "float16", 40, 4096, 4096, packed, qs, None, a_bits,
                                             path="wgmma-g1")  # fmt: skip
    assert kernel == ("gemm_4bit_wgmma.cu", "gemm_4bit_wgmma<MmaHalf, true>") and grid == (32, 4) and block == (160,)
    # A forced path may ask for either copy.
    kernel, *_ = mm._mma_launch(a_bits, "float16", 200, 8192, 28672, packed, qs, None, a_bits, path="wgmma-threads")
    assert kernel == ("gemm_4bit_wgmma.cu", "gemm_4bit_wgmma<MmaHalf, true, false, 256>")
    kernel, *_ = mm._mma_launch(a_bits, "float16", 100, 8192, 28672, packed, qs, None, a_bits, path="wgmma-bulk")
    assert kernel == ("gemm_4bit_wgmma.cu", "gemm_4bit_wgmma<MmaHalf, true, false, 128, true>")
    assert maps == [(200, 28672, 256), (100, 28672, 128)]
    # 512 tokens on 28672 x 8192: 448 unsplit tiles, the last wave's 52 split in 2 (the grid's
    # second row holds their second halves; the whole tiles' CTAs there return at once).
    workspaces.clear()
    qs.shape = (28672, 8192)
    kernel, grid, block, args, smem = mm._mma_launch(a_bits, "float16", 512, 28672, 8192, packed, qs, None, a_bits)
    assert kernel == ("gemm_4bit_wgmma.cu", "gemm_4bit_wgmma<MmaHalf, true, false, 256, true>")
    assert grid == (448, 2) and args == ("partial", "counters", 396) and workspaces == [(2, 52, 128, 256)]


class _FakeOut:
    """An output array's address, as the launcher reads it (``.data.ptr``)."""

    def __init__(self, ptr):
        self.data = type("Pointer", (), {"ptr": ptr})()


def test_wgmma_out_map_only_where_tma_can_address_out(monkeypatch):
    # out's tensor map: rows of N 16-bit values, boxes of 64 rows x the CTA's tokens; none
    # where the row stride (N % 8) or the address is not a multiple of 16 bytes.
    made = []
    monkeypatch.setattr(mm._tensor_map, "rows_map", lambda *args: made.append(args) or "map")
    assert mm._wgmma_out_map(_FakeOut(0x10000), 300, 28672, 256) == "map"
    assert made == [(0x10000, 300, 28672, 256, 64)]
    assert mm._wgmma_out_map(_FakeOut(0x10000), 300, 300, 256) is None
    assert mm._wgmma_out_map(_FakeOut(0x10002), 300, 28672, 256) is None
    assert len(made) == 1


def test_wgmma_source_is_built_for_sm90a_only():
    assert rawkernels.compile_options("gemm_4bit_wgmma.cu")[-1] == "-arch=sm_90a"
    assert rawkernels.compile_options("gemm_4bit.cu") == rawkernels.COMPILE_OPTIONS
    expressions = rawkernels.expressions("gemm_4bit_wgmma.cu")
    # 3 widths x 2 activation copies, and 64 tokens on two warpgroups; x 2 layouts x 2 formats
    # x nested or not.
    assert len(expressions) == 7 * 8 and "gemm_4bit_wgmma<MmaBFloat16, true, true>" in expressions
    assert "gemm_4bit_wgmma<MmaBFloat16, false, true, 64, false, 2>" in expressions
    assert "gemm_4bit_wgmma<MmaHalf, true, false, 64, true>" in expressions
    assert "gemm_4bit_wgmma<MmaHalf, false, true, 128>" in expressions
    assert "gemm_4bit_wgmma<MmaBFloat16, true, false, 256>" in expressions


@pytest.fixture
def hopper(cp, monkeypatch):
    """CuPy on a compute capability 9.0 device; the test must launch gemm_4bit_wgmma."""
    if not mm._wgmma_supported():
        pytest.skip("gemm_4bit_wgmma runs on compute capability 9.0 only")
    seen = []
    real_get = rawkernels.get_function
    monkeypatch.setattr(rawkernels, "get_function", lambda f, e: seen.append(e) or real_get(f, e))
    yield cp
    assert any(e.startswith("gemm_4bit_wgmma<") for e in seen), seen


def test_unknown_fused_path_is_refused():
    # A misspelt path must not fall through to the CUDA-core GEMV, nor to the default split.
    a_bits, packed, qs, _ = make_case(64, 256, 17, "float16")
    with pytest.raises(ValueError, match="unknown fused path 'wmma'"):
        mm._matmul_fused(a_bits, "float16", 17, 64, 256, packed, qs, None, a_bits, path="wmma")
    for path in (
        "wgmma2",
        "wgmma-k",
        "wgmma-x3",
        "wgmma-t",
        "wgmma-t64-t64",
        "wgmma-k2-t128",
        "wgmma-k2-k2",
        "wgmma-t128-k2-k2",
        "wgmma-bulk-k2",
        "wgmma-t64-bulk-threads",
        "wgmma-copies",
        "wgmma-b2-k2",
        "wgmma-b",
        "wgmma-bulk-b2",
        "wgmma-g",
        "wgmma-g2-k2",
        "wgmma-bulk-g2",
    ):
        with pytest.raises(ValueError, match=f"unknown fused path '{path}'"):
            mm._mma_launch(a_bits, "float16", 17, 64, 256, packed, qs, None, a_bits, path=path)


def test_wgmma_balanced_last_wave_rule():
    # 28672 x 8192 at 512 tokens on 256-token CTAs: 448 tiles on 132 SMs, three full waves and
    # 52 tiles; split 2 (104 CTAs, one round of half a tile) beats 3 (156: two rounds of a
    # third) and ties 4, and 5+ would leave shares under 32 of the 128 stages.
    assert mm._wgmma_tail_split(448, 256, 128, 132) == 2
    assert mm._wgmma_split_from(448, 1, 256, 128, 132) == (396, 2)
    # 224 tiles (256 tokens): 92 past the first wave; split 2 takes two rounds of half a tile,
    # no better than the wave it replaces.
    assert mm._wgmma_tail_split(224, 256, 128, 132) == 1
    # Full waves, a single wave, short K (one share of 32 stages), and two CTAs an SM: none.
    assert mm._wgmma_tail_split(396, 256, 128, 132) == 1
    assert mm._wgmma_tail_split(100, 256, 128, 132) == 1
    assert mm._wgmma_tail_split(140, 128, 63, 132) == 1
    assert mm._wgmma_tail_split(280, 64, 128, 132) == 1
    assert mm._wgmma_split_from(448, 1, 256, 128, 132, balance=1) == (448, 1)
    # Forced: the last wave's tiles, trimmed so that no split is empty (5 stages in shares of
    # 2 -> 3); every tile where one wave holds them all; a split grid keeps its split.
    assert mm._wgmma_split_from(15, 1, 128, 5, 4, balance=4) == (12, 3)
    assert mm._wgmma_split_from(3, 1, 128, 65, 4, balance=2) == (0, 2)
    assert mm._wgmma_split_from(16, 1, 128, 65, 4, balance=2) == (16, 1)
    assert mm._wgmma_split_from(64, 4, 64, 448, 132) == (0, 4)
    with pytest.raises(ValueError, match="splits the tiles of an unsplit grid, got ksplit 4"):
        mm._wgmma_split_from(64, 4, 64, 448, 132, balance=2)
    with pytest.raises(ValueError, match="needs one CTA an SM .* got 64 tokens"):
        mm._wgmma_split_from(300, 1, 64, 128, 132, balance=2)
    with pytest.raises(ValueError, match="split must be >= 1, got 0"):
        mm._wgmma_split_from(300, 1, 256, 128, 132, balance=0)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_wgmma_launch_constants_match_the_kernel(tmp_path):
    # The launcher's shared-memory bytes, block size and split-K partials a CTA are the
    # kernel's kSmemBytes, kThreads and kBlocks * kAccs * kMmaThreads, for every TOKENS (a
    # shortfall would go unnoticed: the kernel would address memory past its allocation, or
    # wait at a barrier for threads never launched).
    source = tmp_path / "smem.cu"
    kernel = rawkernels.KERNEL_DIR / "gemm_4bit_wgmma.cu"
    shapes = sorted({(t, g) for t, _, g in mm._WGMMA_BUILDS})  # (tokens, warpgroups) of the builds
    prints = " ".join(f'{{ using S = WgmmaShape<{t}, {g}>; std::printf("%d %d %d %d %d ", S::kSmemBytes, '
                      f"S::kThreads, S::kBlocks * S::kAccs * S::kMmaThreads, S::kScaleRegs, S::kMmaRegs); }}"
                      for t, g in shapes)  # fmt: skip
    source.write_text(f'#include "{kernel}"\n#include <cstdio>\nint main() {{ {prints} }}\n')
    exe = tmp_path / "smem"
    build = [shutil.which("nvcc"), "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a",
             f"-I{rawkernels.KERNEL_DIR}", str(source), "-o", str(exe)]  # fmt: skip
    subprocess.run(build, check=True, capture_output=True, timeout=600)
    printed = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=60).stdout
    values = [int(v) for v in printed.split()]
    expected = []
    for i, (t, g) in enumerate(shapes):
        threads = mm._wgmma_threads(t, g)
        expected += [mm._wgmma_smem(t), threads, mm._wgmma_accs(t, g) * mm._wgmma_mma_threads(t, g)]
        scale_regs, mma_regs = values[5 * i + 3 : 5 * i + 5]
        if t in mm._WGMMA_SETMAXNREG:  # the registers launched with: all an SM has, over the CTA, in 8s
            launch = mm._WGMMA_SETMAXNREG[t]
            assert launch == 65536 // threads // 8 * 8
            released = (threads - mm._wgmma_mma_threads(t)) * (launch - scale_regs)
            taken = mm._wgmma_mma_threads(t) * (mma_regs - launch)
            assert scale_regs < launch < mma_regs and taken <= released
        else:
            assert scale_regs == mma_regs == 0
    assert [v for i, v in enumerate(values) if i % 5 < 3] == expected


def test_setmaxnreg_kernel_needs_its_launch_registers():
    # 256 tokens a CTA: setmaxnreg hands 168 - 80 registers of the scale warpgroup's threads
    # to the others (208 - 168 each); a build with fewer would hang, so it is refused.
    short = types.SimpleNamespace(num_regs=160)
    with pytest.raises(RuntimeError, match="compiled to 168 registers a thread .* got 160"):
        mm._check_launch_registers(short, 256)
    exact = types.SimpleNamespace(num_regs=168)
    mm._check_launch_registers(exact, 256)
    assert id(exact) in mm._CHECKED_KERNELS
    mm._CHECKED_KERNELS.discard(id(exact))


def test_wgmma_refused_off_hopper(monkeypatch):
    monkeypatch.setattr(mm, "_compute_capability", lambda: "80")
    a_bits, packed, qs, _ = make_case(64, 256, 17, "float16")
    with pytest.raises(ValueError, match=r"compute capability 9.0 GPU \(H100 / H200\), got 80"):
        mm._mma_launch(a_bits, "float16", 17, 64, 256, packed, qs, None, a_bits, path="wgmma")


# (N, K): aligned; odd N and K % 64 == 32 (a half-empty last stage, blocks straddling rows);
# 65 K stages with split shares cut by K; 300 rows (a partial 128-row CTA); 272 x 1024 tiles;
# one stage, half empty (K = 32) and full (K = 64).
WGMMA_SHAPES = ((64, 256), (37, 96), (130, 4128), (300, 640), (272, 1024), (48, 32), (40, 64))
# (These grids are small: the 64-token paths run two warpgroups unless -g1 says one.)
WGMMA_PATHS = ("wgmma", "wgmma-k1", "wgmma-k3", "wgmma-t64", "wgmma-t64-g1", "wgmma-t64-k3-g1", "wgmma-t128",
               "wgmma-t128-k1", "wgmma-t128-k3", "wgmma-t256-k1", "wgmma-t256-k3", "wgmma-k3-bulk",
               "wgmma-t128-k1-bulk", "wgmma-t256-k1-bulk", "wgmma-t256-k3-bulk")  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("path", WGMMA_PATHS)
@pytest.mark.parametrize("M", (1, 17, 40, 64, 65, 130, 300, 513))
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
@pytest.mark.parametrize("shape", WGMMA_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gpu_wgmma_sweep(hopper, path, M, fmt, shape):
    N, K = shape
    a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, seed=M + N)
    out = run_gpu(hopper, a_bits, fmt, M, packed, qs, bias_bits, path=path)
    assert rel_error(out, fmt, reference(a_bits, fmt, M, packed, qs, bias_bits)) < TOLERANCE[fmt]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
@pytest.mark.parametrize("blocksize", cq.BLOCKSIZES_4BIT)
@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
@pytest.mark.parametrize("bias", (False, True), ids=("nobias", "bias"))
def test_gpu_wgmma_formats(hopper, fmt, quant_type, blocksize, nested, bias):
    for N, K in ((37, 96), (130, 640)):
        a_bits, packed, qs, bias_bits = make_case(N, K, 33, fmt, quant_type, blocksize, nested, bias, seed=blocksize)
        paths = [f"wgmma-t{tokens}-k{split}" for tokens in (64, 128, 256) for split in (1, 2)]
        paths += [f"wgmma-t64-k{split}-g1" for split in (1, 2)]
        for path in paths + [f"wgmma-t{tokens}-k2-bulk" for tokens in (64, 128, 256)]:
            out = run_gpu(hopper, a_bits, fmt, 33, packed, qs, bias_bits, path=path)
            err = rel_error(out, fmt, reference(a_bits, fmt, 33, packed, qs, bias_bits))
            assert err < TOLERANCE[fmt], f"{N}x{K} {path}: {err}"


def _run_tiled(cp, a_bits, fmt, M, packed, qs, bias_bits, path):
    """``path`` on the tile-ordered copy of ``packed``."""
    ga, gp, gqs, gb = to_gpu(cp, a_bits, packed, qs, bias_bits)
    N, K = qs.shape
    tiled = cq.tile_4bit(gp, gqs)
    out = cp.empty(M * N, dtype=ga.dtype)
    mm._matmul_fused(ga, fmt, M, N, K, tiled.data, gqs, gb, out, path=path, tiled=True)
    return cp.asnumpy(out)


@pytest.mark.gpu
@pytest.mark.parametrize("path", WGMMA_PATHS)
@pytest.mark.parametrize("M", (17, 64, 130))
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
def test_gpu_wgmma_tiled_equals_row_major(hopper, path, M, fmt, nested):
    # Tile order changes only where the weight bytes are read: the same bits come out.
    for N, K in ((272, 1024), (144, 4224)):
        a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, nested=nested, seed=M)
        row_major = run_gpu(hopper, a_bits, fmt, M, packed, qs, bias_bits, path=path)
        tiled = _run_tiled(hopper, a_bits, fmt, M, packed, qs, bias_bits, path)
        np.testing.assert_array_equal(tiled.view(np.uint16), row_major.view(np.uint16))
        assert rel_error(tiled, fmt, reference(a_bits, fmt, M, packed, qs, bias_bits)) < TOLERANCE[fmt]


@pytest.mark.gpu
@pytest.mark.parametrize("path", ("wgmma-t128-k2", "wgmma-t128-k3", "wgmma-t256-k2", "wgmma-t256-k3-bulk"))
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
def test_gpu_wgmma_tiled_odd_shares(hopper, path, fmt):
    # K splits whose shares start on odd stages (the second half of a 128-k tile): 18 stages
    # in shares of 9, 14 in shares of 5; the tiled build steps its weight copies by parity.
    for N, K in ((272, 1152), (144, 896)):
        a_bits, packed, qs, bias_bits = make_case(N, K, 130, fmt, nested=True, seed=K)
        row_major = run_gpu(hopper, a_bits, fmt, 130, packed, qs, bias_bits, path=path)
        tiled = _run_tiled(hopper, a_bits, fmt, 130, packed, qs, bias_bits, path)
        np.testing.assert_array_equal(tiled.view(np.uint16), row_major.view(np.uint16))
        assert rel_error(tiled, fmt, reference(a_bits, fmt, 130, packed, qs, bias_bits)) < TOLERANCE[fmt]


@pytest.mark.gpu
@pytest.mark.parametrize("tiled", (False, True), ids=("row-major", "tiled"))
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
def test_gpu_wgmma_bulk_equals_threads(hopper, tiled, fmt):
    # The X_TMA build (tensor copies by the TMA unit) changes only how the activations reach
    # shared memory: the same bits as the threads' copies, for every width, split and partial
    # chunk.
    cases = (
        (((272, 1024), 70), ((304, 4224), 513), ((144, 128), 33))
        if tiled
        else (((272, 1024), 70), ((300, 4128), 513), ((37, 96), 33))
    )
    for (N, K), M in cases:
        a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, seed=N + M)
        run = functools.partial(_run_tiled if tiled else run_gpu, hopper, a_bits, fmt, M, packed, qs, bias_bits)
        for tokens in (64, 128, 256):
            for split in ("-k1", "-k3", ""):
                threads = run(path=f"wgmma-t{tokens}{split}-threads")
                bulk = run(path=f"wgmma-t{tokens}{split}-bulk")
                np.testing.assert_array_equal(bulk.view(np.uint16), threads.view(np.uint16), err_msg=f"{tokens}{split}")
        assert rel_error(bulk, fmt, reference(a_bits, fmt, M, packed, qs, bias_bits)) < TOLERANCE[fmt]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
def test_gpu_wgmma_tensor_store_writes_out_only(hopper, fmt):
    # The X_TMA build stores each row block's box through out's tensor map: nothing past N
    # (a partial row group) or M (a partial token chunk) is written, nor around out; an out
    # that TMA cannot address (not 16-byte aligned) gets the threads' stores. The same bits
    # as the threads' build either way, split or not.
    N, K, M = 272, 1024, 300
    a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, seed=23)
    ga, gp, gqs, gb = to_gpu(hopper, a_bits, packed, qs, bias_bits)
    sentinel = 0x7E00 if fmt == "float16" else 0x7FC0
    dtype = np.float16 if fmt == "float16" else np.uint16
    for offset in (8, 1):  # elements: 16 bytes (the map), 2 bytes (the threads)
        for split in ("-k1", "-k2"):
            results = {}
            for copies in ("threads", "bulk"):
                whole = hopper.full(M * N + 64, sentinel, dtype=np.uint16)
                end = offset + M * N
                out = whole[offset:end].view(dtype)
                assert (out.data.ptr % 16 == 0) == (offset == 8)
                mm._matmul_fused(ga, fmt, M, N, K, gp, gqs, gb, out, path=f"wgmma-t256{split}-{copies}")
                around = hopper.asnumpy(hopper.concatenate((whole[:offset], whole[end:])))
                assert (around == sentinel).all(), (offset, split, copies)
                results[copies] = hopper.asnumpy(out.view(np.uint16))
            np.testing.assert_array_equal(results["bulk"], results["threads"], err_msg=f"{offset} {split}")
    expected = reference(a_bits, fmt, M, packed, qs, bias_bits)
    assert rel_error(results["bulk"].view(dtype), fmt, expected) < TOLERANCE[fmt]


@pytest.mark.gpu
@pytest.mark.parametrize("tiled", (False, True), ids=("row-major", "tiled"))
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
def test_gpu_wgmma_two_groups_equal_one(hopper, tiled, fmt, nested):
    # Two warpgroups (one 64-row block each) change only which warps decode and multiply a
    # row block: at the same split, the same bits as one warpgroup, for partial tiles and
    # chunks, K % 64 == 32, splits cut short, and 64-token chunks side by side.
    cases = (((272, 1024), 40), ((144, 4224), 130)) if tiled else (((300, 4128), 40), ((37, 96), 64), ((130, 640), 70))
    for (N, K), M in cases:
        a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, nested=nested, seed=N + M)
        run = functools.partial(_run_tiled if tiled else run_gpu, hopper, a_bits, fmt, M, packed, qs, bias_bits)
        for split in ("-k1", "-k3"):
            one = run(path=f"wgmma-t64{split}-g1")
            two = run(path=f"wgmma-t64{split}-g2")
            np.testing.assert_array_equal(two.view(np.uint16), one.view(np.uint16), err_msg=f"{N}x{K} {split}")
        assert rel_error(two, fmt, reference(a_bits, fmt, M, packed, qs, bias_bits)) < TOLERANCE[fmt]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
def test_gpu_default_dispatch_takes_two_groups(hopper, monkeypatch, fmt):
    # 4096 x 4096 at 40 tokens: 32 tiles split 4 on the card's SMs (132 on an H100 / H200)
    # take two warpgroups by default, with the one-warpgroup build's bits.
    M, N, K = 40, 4096, 4096
    picks = []
    pick = mm._pick_wgmma
    monkeypatch.setattr(mm, "_pick_wgmma", lambda *a, **k: picks.append(pick(*a, **k)) or picks[-1])
    a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, seed=9)
    out = run_gpu(hopper, a_bits, fmt, M, packed, qs, bias_bits)
    assert picks[-1][1:] == (1, 32, 4, 2 if mm._sm_count() >= 128 else 1)
    one = run_gpu(hopper, a_bits, fmt, M, packed, qs, bias_bits, path="wgmma-g1")
    np.testing.assert_array_equal(out.view(np.uint16), one.view(np.uint16))
    assert rel_error(out, fmt, reference(a_bits, fmt, M, packed, qs, bias_bits)) < TOLERANCE[fmt]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
def test_gpu_default_dispatch_takes_two_groups_at_their_split(hopper, monkeypatch, fmt):
    # 5120 x 4096 at 40 tokens on 132 SMs: 40 tiles split 4 with one warpgroup (two CTAs an
    # SM) or 3 with two (one an SM). The default takes two at split 3, with the bits of the
    # one-warpgroup build at that split.
    monkeypatch.setattr(mm, "_sm_count", lambda: 132)
    M, N, K = 40, 5120, 4096
    assert mm._pick_wgmma(M, N, K)[1:] == (1, 40, 3, 2)
    picks = []
    pick = mm._pick_wgmma
    monkeypatch.setattr(mm, "_pick_wgmma", lambda *a, **k: picks.append(pick(*a, **k)) or picks[-1])
    a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, seed=11)
    out = run_gpu(hopper, a_bits, fmt, M, packed, qs, bias_bits)
    assert picks[-1][1:] == (1, 40, 3, 2)
    one = run_gpu(hopper, a_bits, fmt, M, packed, qs, bias_bits, path="wgmma-t64-k3-g1")
    np.testing.assert_array_equal(out.view(np.uint16), one.view(np.uint16))
    assert rel_error(out, fmt, reference(a_bits, fmt, M, packed, qs, bias_bits)) < TOLERANCE[fmt]


def _tile_blocks(M, N, tokens):
    """(tile, token slice, row slice) of gemm_4bit_wgmma's tiles: tile = row group * chunks + chunk."""
    chunks = -(-M // tokens)
    for group in range(-(-N // 128)):
        for chunk in range(chunks):
            tokens_of = slice(chunk * tokens, (chunk + 1) * tokens)
            yield group * chunks + chunk, tokens_of, slice(128 * group, 128 * (group + 1))


@pytest.mark.gpu
@pytest.mark.parametrize("tiled", (False, True), ids=("row-major", "tiled"))
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
@pytest.mark.parametrize("copies", ("threads", "bulk"))
@pytest.mark.parametrize("tokens", (128, 256))
def test_gpu_wgmma_balanced_last_wave(hopper, monkeypatch, tiled, fmt, copies, tokens):
    # On 4 counted SMs, 640 rows at 300 tokens: 5 row groups x 3 or 2 token chunks = 15 or 10
    # tiles, the last wave's 3 or 2 split. The whole tiles come out with the bits of the
    # unsplit launch, the split ones with those of the launch that splits every tile the same
    # way, and the default rule (on 7 or 9 SMs: one tile past the full waves) splits it in 2.
    monkeypatch.setattr(mm, "_sm_count", lambda: 4)
    M, N, K = 300, 640, 4224  # 66 stages: shares of 33 / 22 / 17 stages (K % 128 == 0 for tiles)
    a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, seed=tokens)
    launch = functools.partial(_run_tiled if tiled else run_gpu, hopper, a_bits, fmt, M, packed, qs, bias_bits)
    run = lambda path: launch(path=path).view(np.uint16).reshape(M, N)  # noqa: E731
    path = f"wgmma-t{tokens}"
    whole = run(f"{path}-k1-{copies}")
    tiles = 5 * -(-M // tokens)
    for balance in (2, 3, 4):
        split_from, ksplit = mm._wgmma_split_from(tiles, 1, tokens, 66, 4, balance)
        assert split_from == tiles - tiles % 4 and ksplit == balance
        balanced = run(f"{path}-b{balance}-{copies}")
        split = run(f"{path}-k{balance}-{copies}")
        for tile, tokens_of, rows in _tile_blocks(M, N, tokens):
            expected = split if tile >= split_from else whole
            np.testing.assert_array_equal(balanced[tokens_of, rows], expected[tokens_of, rows],
                                          err_msg=f"balance {balance}, tile {tile}")  # fmt: skip
    bits = balanced.view(np.float16) if fmt == "float16" else balanced
    assert rel_error(bits, fmt, reference(a_bits, fmt, M, packed, qs, bias_bits)) < TOLERANCE[fmt]
    monkeypatch.setattr(mm, "_sm_count", lambda: 7 if tokens == 128 else 9)  # one tile past the full waves
    assert mm._wgmma_split_from(tiles, 1, tokens, 66, mm._sm_count()) == (tiles - 1, 2)
    np.testing.assert_array_equal(run(f"{path}-{copies}"), run(f"{path}-b2-{copies}"))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
def test_gpu_wgmma_split_deterministic(hopper, fmt):
    # The last CTA of a tile sums the splits in split order: the same bits every run.
    a_bits, packed, qs, bias_bits = make_case(300, 4128, 70, fmt, seed=5)
    first = run_gpu(hopper, a_bits, fmt, 70, packed, qs, bias_bits, path="wgmma-k5")
    for _ in range(3):
        np.testing.assert_array_equal(run_gpu(hopper, a_bits, fmt, 70, packed, qs, bias_bits, path="wgmma-k5"), first)
    assert rel_error(first, fmt, reference(a_bits, fmt, 70, packed, qs, bias_bits)) < TOLERANCE[fmt]


@pytest.mark.gpu
@pytest.mark.parametrize("tiled", (False, True), ids=("row-major", "tiled"))
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
def test_gpu_default_dispatch_takes_wgmma(hopper, tiled, fmt):
    # 8192 x 2048 at 40 tokens: within the fused range of weights of >= 8192 rows, so the
    # default rule picks gemm_4bit_wgmma; 64 CTAs, so it splits K (in 2).
    M, N, K = 40, 8192, 2048
    assert M <= mm.fused_max_m(fmt, N, K)
    assert mm._wgmma_default(M, N, K)
    a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, seed=7)
    if tiled:
        ga, gp, gqs, gb = to_gpu(hopper, a_bits, packed, qs, bias_bits)
        out = hopper.asnumpy(mm.matmul_4bit_bits(ga, fmt, M, cq.tile_4bit(gp, gqs).data, gqs, gb, tiled=True))
    else:
        out = run_gpu(hopper, a_bits, fmt, M, packed, qs, bias_bits)
    assert rel_error(out, fmt, reference(a_bits, fmt, M, packed, qs, bias_bits)) < TOLERANCE[fmt]


@pytest.mark.gpu
@pytest.mark.parametrize("M", (40, 128))
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
def test_gpu_default_dispatch_takes_wgmma_narrow_long_k(hopper, fmt, M):
    # 2048 x 8192: under 4096 rows but K >= 8192, so 33..128 tokens run gemm_4bit_wgmma (the
    # hopper fixture checks it launched), not dequantize + cuBLAS.
    N, K = 2048, 8192
    assert M <= mm.fused_max_m(fmt, N, K) and mm._wgmma_default(M, N, K)
    a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, seed=11)
    out = run_gpu(hopper, a_bits, fmt, M, packed, qs, bias_bits)
    assert rel_error(out, fmt, reference(a_bits, fmt, M, packed, qs, bias_bits)) < TOLERANCE[fmt]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
def test_gpu_default_dispatch_takes_128_tokens(hopper, monkeypatch, fmt):
    # 8192 x 2048 at 100 tokens: one 128-token chunk (64 CTAs, split 2 on 132 SMs) beats two
    # 64-token chunks by the wave rule, so the default launches the two-warpgroup kernel.
    M, N, K = 100, 8192, 2048
    assert mm._wgmma_tokens(M, N, K) == 128
    seen = []
    real_get = rawkernels.get_function
    monkeypatch.setattr(rawkernels, "get_function", lambda f, e: seen.append(e) or real_get(f, e))
    a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, seed=17)
    out = run_gpu(hopper, a_bits, fmt, M, packed, qs, bias_bits)
    assert f"gemm_4bit_wgmma<{mm._MMA_STRUCT[fmt]}, true, false, 128>" in seen, seen
    assert rel_error(out, fmt, reference(a_bits, fmt, M, packed, qs, bias_bits)) < TOLERANCE[fmt]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ((4096, 8192), (8192, 2048)), ids=("long-k", "wide"))
def test_gpu_256_token_fused_range(hopper, monkeypatch, shape):
    # K >= 8192 or 8192+ rows on an H100 / H200: up to 256 tokens fused (gemm_4bit_wgmma, 256
    # tokens a CTA), 257 dequantize + cuBLAS; both against the reference.
    N, K = shape
    assert mm.fused_max_m("float16", N, K) == 256 and mm._wgmma_tokens(256, N, K) == 256
    seen = []  # (the hopper fixture's wrapper, wrapped again)
    real_get = rawkernels.get_function
    monkeypatch.setattr(rawkernels, "get_function", lambda f, e: seen.append(e) or real_get(f, e))
    ran = []
    for name in ("_matmul_fused", "_matmul_dequant_gemm"):
        real = getattr(mm, name)
        monkeypatch.setattr(mm, name, lambda *a, real=real, name=name, **k: ran.append(name) or real(*a, **k))
    for M, expected in ((256, "_matmul_fused"), (257, "_matmul_dequant_gemm")):
        ran.clear()
        a_bits, packed, qs, bias_bits = make_case(N, K, M, "float16", seed=M)
        ga, gp, gqs, gb = to_gpu(hopper, a_bits, packed, qs, bias_bits)
        out = hopper.asnumpy(mm.matmul_4bit_bits(ga, "float16", M, gp, gqs, gb))
        assert ran == [expected], (M, ran)
        err = rel_error(out, "float16", reference(a_bits, "float16", M, packed, qs, bias_bits))
        assert err < TOLERANCE["float16"], (M, err)
    assert "gemm_4bit_wgmma<MmaHalf, true, false, 256, true>" in seen, seen


def _default_wgmma_case(cp, fmt="float16", M=40, N=8192, K=2048):
    """A shape the default dispatch sends to gemm_4bit_wgmma (64 CTAs, K split in 2), on the GPU."""
    assert mm._wgmma_default(M, N, K)
    a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, seed=11)
    return (a_bits, packed, qs, bias_bits), to_gpu(cp, a_bits, packed, qs, bias_bits)


@pytest.mark.gpu
def test_gpu_wgmma_default_is_not_prepared(hopper):
    # The split launch needs a workspace a call: prepare_fused leaves it to the general path.
    (_, _, _, _), (ga, gp, gqs, gb) = _default_wgmma_case(hopper)
    assert mm.prepare_fused("float16", 40, gp, gqs, True) is None
    mm.matmul_4bit_bits(ga, "float16", 40, gp, gqs, gb)  # the launch the spy of `hopper` checks


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ("float16", "bfloat16"))
def test_gpu_wgmma_unsplit_is_prepared(hopper, fmt):
    # 4096 x 1024 at 40 tokens: 32 CTAs, but 16 stages are too few to split, so the default
    # wgmma launch is unsplit and prepare_fused keeps it; it gives the general path's bits.
    M, N, K = 40, 4096, 1024
    assert M <= mm.fused_max_m(fmt, N, K) and mm._wgmma_default(M, N, K)
    assert mm._pick_wgmma(M, N, K)[3] == 1
    a_bits, packed, qs, bias_bits = make_case(N, K, M, fmt, seed=13)
    ga, gp, gqs, gb = to_gpu(hopper, a_bits, packed, qs, bias_bits)
    launch = mm.prepare_fused(fmt, M, gp, gqs, True)
    assert launch is not None and launch.accepts(ga.data.ptr)
    prepared = hopper.full(M * N, np.nan, dtype=np.float16)
    launch(ga.data.ptr, gb.data.ptr, prepared.data.ptr, hopper.cuda.get_current_stream().ptr)
    general = mm.matmul_4bit_bits(ga, fmt, M, gp, gqs, gb)
    np.testing.assert_array_equal(hopper.asnumpy(prepared).view(np.uint16), hopper.asnumpy(general).view(np.uint16))
    assert rel_error(hopper.asnumpy(general), fmt, reference(a_bits, fmt, M, packed, qs, bias_bits)) < TOLERANCE[fmt]


@pytest.mark.gpu
def test_gpu_wgmma_graph_capture(hopper):
    # The default dispatch's wgmma launch under capture: the split workspace is allocated and
    # its counters zeroed inside the graph; two replays give the eager result bit for bit.
    (a_bits, packed, qs, bias_bits), (ga, gp, gqs, gb) = _default_wgmma_case(hopper)
    M, N = 40, 8192
    out = hopper.zeros(M * N, dtype=np.float16)
    eager = replays_equal_eager(hopper, lambda: mm.matmul_4bit_bits(ga, "float16", M, gp, gqs, gb, out), out)
    assert rel_error(eager, "float16", reference(a_bits, "float16", M, packed, qs, bias_bits)) < TOLERANCE["float16"]


@pytest.mark.gpu
def test_gpu_wgmma_tma_graph_capture(hopper, monkeypatch):
    # 256 tokens on 8192 x 2048: 256-token CTAs whose activations the TMA unit copies, K split
    # in 2. The launch (its tensor map a parameter) and the split workspace are captured; two
    # replays give the eager result bit for bit.
    M, N, K = 256, 8192, 2048
    assert mm._wgmma_tma_routed(M, N, K) and mm._pick_wgmma(M, N, K, tokens=256)[3] == 2
    maps = []
    real_map = mm._wgmma_x_map
    monkeypatch.setattr(mm, "_wgmma_x_map", lambda *a: maps.append(a[1:]) or real_map(*a))
    a_bits, packed, qs, bias_bits = make_case(N, K, M, "float16", seed=19)
    ga, gp, gqs, gb = to_gpu(hopper, a_bits, packed, qs, bias_bits)
    out = hopper.zeros(M * N, dtype=np.float16)
    eager = replays_equal_eager(hopper, lambda: mm.matmul_4bit_bits(ga, "float16", M, gp, gqs, gb, out), out)
    assert maps == [(M, K, 256)] * 2  # eagerly, then under capture
    # The map holds A's address: prepare_fused leaves the launch to the general path.
    assert mm.prepare_fused("float16", M, gp, gqs, True) is None and len(maps) == 2
    assert rel_error(eager, "float16", reference(a_bits, "float16", M, packed, qs, bias_bits)) < TOLERANCE["float16"]
