"""4-bit linear forward ``out = x @ W^T``: cupyquant against torch fp16 (cuBLAS), one run.

Prints the GPU, then PERFORMANCE.md's table (NF4, blocksize 64, nested absmax, fp16
activations; bitsandbytes too where it is importable): microseconds per call from CUDA
events around CUDA-graph replays of 20 calls, each started after REST_SECONDS idle
(--steady: after WARM_SECONDS of its own replays, the power limit's steady state), the
weight copies rotated so the 50 MB L2 does not hold them; GB/s (bytes the call must move:
packed weights, scales, activations, output); the ratio to torch fp16 measured in the same
process; and the bandwidth floor (those bytes at the measured device-to-device copy rate).
Then the sweep that sets ``fused_max_m``: each fused kernel against dequantize + cuBLAS
over M, and the eager (no graph) per-call time.

    PYTHONPATH=. python3 benchmarks/bench_matmul_4bit.py [--quick] [--steady] [--stage] [--json FILE] [--sass DIR]
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cupy as cp
from _graph_timing import replay_for, time_cupy_graph

import cupyquant as cq

mm = importlib.import_module("cupyquant.matmul_4bit")

CALLS = 20  # calls per captured graph
REPEATS = 10  # timed replays; the median is reported
# How each timing of the table and the prefill rows starts: after REST_SECONDS idle (each a
# short burst from the same rest, as PERFORMANCE.md times), or with --steady after
# WARM_SECONDS of its own replays (the power limit's steady state). Timed straight after the
# other side, the second paid for the first's heat: H100, 28672 x 8192 at 512 tokens, fp16
# then 4-bit 330.8 / 554.7 us, 4-bit then fp16 453.3 / 337.7 (NOTES_matmul_4bit.md, run 54).
REST_SECONDS = 1.0
WARM_SECONDS = 0.0
ROTATE_BYTES = 400e6  # weight copies per shape: at least this many bytes

TABLE = (  # PERFORMANCE.md: (N, K), M values, targets in us (None: a ratio target)
    ((28672, 8192), (1, 16, 64, 512, 4096), (50, 60, 110, None, None)),
    ((8192, 28672), (1, 16, 64), (50, 60, 110)),
    ((4096, 4096), (1, 16, 64), (6, 8, 12)),
    ((11008, 4096), (1, 16), (14, 18)),
)
SWEEP_SHAPES = ((4096, 4096), (11008, 4096), (28672, 8192), (8192, 28672))
SWEEP_M = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256)
GEMV_SWEEP_M = (1, 2, 4, 8, 12, 16, 32)


def gpu_name() -> str:
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def time_at_steady_state() -> None:
    """--steady: every table and prefill timing after 1 s of its own replays, no rest."""
    global REST_SECONDS, WARM_SECONDS
    REST_SECONDS, WARM_SECONDS = 0.0, 1.0


def settling() -> str:
    return f"each after {WARM_SECONDS:g} s of its replays" if WARM_SECONDS else f"each after {REST_SECONDS:g} s idle"


def settled(timer, *args):
    """``timer(*args)`` (a timing function) started as REST_SECONDS / WARM_SECONDS say."""
    time.sleep(REST_SECONDS)
    return timer(*args, WARM_SECONDS)


def time_torch(calls, warm_seconds: float = 0.0) -> float:
    import torch

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for f in calls[:2]:
            f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in calls:
            f()
    graph.replay()
    torch.cuda.synchronize()
    replay_for(graph.replay, torch.cuda.synchronize, warm_seconds)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(REPEATS):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy rate through torch (an SM copy kernel), bytes read + written per second.

    (cudaMemcpyAsync in a graph goes through the copy engines: 2.72 TB/s on an H200 whose SM
    copies reach about 4.3 TB/s, so it is not the ceiling a kernel can reach.)
    """
    import torch

    n = 1 << 30  # 1 GiB
    src = torch.ones(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = time_torch([lambda: dst.copy_(src)] * 5)
    return 2 * n / (us * 1e-6)


class Weights:
    """Rotated copies of one NF4 (blocksize 64, nested) weight, plus the fp16 original for torch."""

    def __init__(self, N: int, K: int, quant_type="nf4", blocksize=64, nested=True):
        self.N, self.K = N, K
        rng = cp.random.default_rng(N * 7 + K)
        W = (rng.standard_normal((N, K), dtype=cp.float32) / math.sqrt(K)).astype(cp.float16)
        packed, qs = cq.quantize_4bit(W, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
        self.weight_bytes = packed.nbytes + qs.absmax.nbytes + (qs.state2.absmax.nbytes if nested else 0)
        count = max(2, min(CALLS, math.ceil(ROTATE_BYTES / self.weight_bytes)))
        self.copies = [(packed.reshape(-1).copy(), copy.deepcopy(qs)) for _ in range(count)]
        self.fp16 = W
        self._tiled = None
        del packed, qs

    def tiled_copies(self):
        """The copies' packed bytes in tile order (cupyquant.tile_4bit), made once."""
        if self._tiled is None:
            self._tiled = [cq.tile_4bit(packed, qs).data for packed, qs in self.copies]
        return self._tiled

    def torch_copies(self):
        import torch

        count = max(2, min(CALLS, math.ceil(ROTATE_BYTES / self.fp16.nbytes)))
        base = torch.from_dlpack(self.fp16)
        return [base.clone() for _ in range(count)]

    def bnb_copies(self, bnb):
        """The fp16 weight quantized by bitsandbytes (NF4, blocksize 64, nested): as many
        (packed, QuantState) copies as ours."""
        import torch

        packed, state = bnb.functional.quantize_4bit(torch.from_dlpack(self.fp16), blocksize=64,
                                                     compress_statistics=True, quant_type="nf4")  # fmt: skip
        return [(packed.clone(), copy.deepcopy(state)) for _ in self.copies]


def bitsandbytes_module():
    """bitsandbytes where it is importable (the table then times it too), else None."""
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes


def bnb_calls(bnb, copies, M: int, K: int):
    """bitsandbytes' 4-bit forward, as its Linear4bit calls it, on the rotated copies."""
    import torch

    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    count = len(copies)
    return [lambda c=copies[i % count]: bnb.matmul_4bit(x, c[0].t(), quant_state=c[1]) for i in range(CALLS)]


def ours_calls(w: Weights, M: int, fmt: str, path: str | None):
    rng = cp.random.default_rng(M)
    x = rng.standard_normal((M, w.K), dtype=cp.float32)
    a_bits = x.astype(cp.float16) if fmt == "float16" else (x.view(cp.uint32) >> 16).astype(cp.uint16)
    if fmt == "float32":
        a_bits = x.reshape(-1)
    a_bits = a_bits.reshape(-1)
    out = cp.empty(M * w.N, dtype=cp.float32 if fmt == "float32" else (cp.float16 if fmt == "float16" else cp.uint16))

    if path == "tiled":  # the default dispatch on tile-ordered copies (cupyquant.tile_4bit)
        tiled = w.tiled_copies()
        return [lambda i=i: mm.matmul_4bit_bits(a_bits, fmt, M, tiled[i % len(tiled)], w.copies[i % len(tiled)][1],
                                                None, out, tiled=True) for i in range(CALLS)]  # fmt: skip

    if path is not None and path.startswith("tiled-"):  # a forced path on the tile-ordered copies
        tiled, forced = w.tiled_copies(), path[6:]
        return [lambda i=i: mm._matmul_fused(a_bits, fmt, M, w.N, w.K, tiled[i % len(tiled)],
                                             w.copies[i % len(tiled)][1], None, out, path=forced, tiled=True)
                for i in range(CALLS)]  # fmt: skip

    def make(i):
        packed, qs = w.copies[i % len(w.copies)]
        if path is None:
            return lambda: mm.matmul_4bit_bits(a_bits, fmt, M, packed, qs, None, out)
        if path == "dequant":
            return lambda: mm._matmul_dequant_gemm(a_bits, fmt, M, w.N, w.K, packed, qs, None, out)
        return lambda: mm._matmul_fused(a_bits, fmt, M, w.N, w.K, packed, qs, None, out, path=path)

    return [make(i) for i in range(CALLS)]


def torch_calls(copies, M: int, K: int):
    import torch

    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    count = len(copies)
    return [lambda W=copies[i % count]: torch.nn.functional.linear(x, W) for i in range(CALLS)]


def moved_bytes(w: Weights, M: int, act_bytes: int = 2) -> int:
    return w.weight_bytes + M * w.K * act_bytes + M * w.N * act_bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="table only, no sweeps")
    parser.add_argument("--tile", action="store_true", help="first the gemm_4bit_tile sweep (sets fused_max_m)")
    parser.add_argument("--split", action="store_true", help="after the table, the split-K sweep (narrow weights)")
    parser.add_argument("--stage", action="store_true", help="first the gemm_4bit_stage sweep (up to 16 tokens)")
    parser.add_argument("--half", action="store_true", help="first the one-token gemv_4bit_half sweep")
    parser.add_argument("--compare", help="first: these comma-separated forced paths side by side (fp16)")
    parser.add_argument("--rows", default="1,2,4,8,16", help="M values of --compare")
    parser.add_argument("--no-table", action="store_true", help="skip PERFORMANCE.md's table")
    parser.add_argument("--prefill", action="store_true", help="after the table, 128 and 256 tokens on its shapes")
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--steady", action="store_true", help="time the table and prefill rows after 1 s of replays")
    parser.add_argument("--sass", help="dump the kernels' SASS (nvcc + cuobjdump) into this folder")
    args = parser.parse_args()
    if args.steady:
        time_at_steady_state()
    stream = cp.cuda.Stream(non_blocking=True)
    results: dict = {"gpu": gpu_name(), "table": [], "sweep": [], "gemv_sweep": []}
    bw = copy_bandwidth()
    results["copy_bandwidth"] = bw
    print(f"GPU: {results['gpu']}   device-to-device copy: {bw / 1e12:.2f} TB/s (read + write)")
    if args.compare:
        compare(results, stream, args.compare.split(","), [int(m) for m in args.rows.split(",")])
        save(args.json, results)
    if args.half:
        half_sweep(results, stream, lambda: save(args.json, results))
    if args.stage:
        stage_sweep(results, stream, lambda: save(args.json, results))
    if args.tile:
        tile_sweep(results, stream, lambda: save(args.json, results))
    if not args.no_table:
        table(results, bw, stream)
    save(args.json, results)
    if args.prefill:
        prefill(results, stream)
        save(args.json, results)
    if args.split:
        split_sweep(results, stream, lambda: save(args.json, results))
    if not args.quick:
        sweep(results, stream, lambda: save(args.json, results))
        eager(results)
    save(args.json, results)
    if args.sass:
        dump_sass(Path(args.sass))
    return 0


def table(results: dict, bw: float, stream) -> None:
    """PERFORMANCE.md's table: our default dispatch against torch fp16, with the bandwidth floor."""
    print(
        f"4-bit linear forward, NF4 bs64 nested, fp16 activations; us per call (graph replay of 20 calls, {settling()})"
    )
    print("tiled: the same weight as cupyquant.tile_4bit (16-row x 128-column tiles), fused rows only")
    bnb = bitsandbytes_module()
    print(f"bnb: bitsandbytes {bnb.__version__} (matmul_4bit)" if bnb else "bnb: bitsandbytes is not importable")
    header = (f"{'N x K':>13} {'M':>5} {'fp16':>8} {'bnb':>8} {'4bit':>8} {'tiled':>8} {'x fp16':>7} {'GB/s':>6} "
              f"{'floor':>7} {'x floor':>7} {'target':>7}  path")  # fmt: skip
    print(header)
    for (N, K), ms, targets in TABLE:
        w = Weights(N, K)
        t_copies = w.torch_copies()
        b_copies = w.bnb_copies(bnb) if bnb else None
        for M, target in zip(ms, targets, strict=True):
            t16 = settled(time_torch, torch_calls(t_copies, M, K))
            tb = settled(time_torch, bnb_calls(bnb, b_copies, M, K)) if bnb else None
            ours = settled(measure, ours_calls(w, M, "float16", None), stream)
            nbytes = moved_bytes(w, M)
            floor = nbytes / bw * 1e6
            fused = M <= mm.fused_max_m("float16", N, K)
            path = "fused" if fused else "dequant+cuBLAS"
            tiled = settled(measure, ours_calls(w, M, "float16", "tiled"), stream) if fused else None
            target_s = f"{target}" if target is not None else ("1.25x" if M == 512 else "1.1x")
            row = dict(N=N, K=K, M=M, torch_fp16_us=t16, bnb_us=tb, ours_us=ours, tiled_us=tiled,
                       gbps=nbytes / ours * 1e-3, floor_us=floor, path=path, target=target_s)  # fmt: skip
            results["table"].append(row)
            tiled_s = f"{tiled:8.1f}" if tiled is not None else f"{'-':>8}"
            bnb_s = f"{tb:8.1f}" if tb is not None else f"{'-':>8}"
            print(f"{N:>6}x{K:<6} {M:>5} {t16:8.1f} {bnb_s} {ours:8.1f} {tiled_s} {ours / t16:7.2f} "
                  f"{nbytes / ours * 1e-3:6.0f} {floor:7.1f} {ours / floor:7.2f} {target_s:>7}  {path}")  # fmt: skip
        del t_copies, b_copies, w
        cp.get_default_memory_pool().free_all_blocks()


PREFILL_ROWS = (128, 256)


def prefill(results: dict, stream) -> None:
    """Prefill-sized batches on the table's shapes: the default dispatch against torch fp16 and
    against dequantize + cuBLAS (the path past the fused switch point)."""
    print(f"\nprefill batches, NF4 bs64 nested, fp16 activations; us per call (graph replay of 20 calls, {settling()})")
    print(f"{'N x K':>13} {'M':>5} {'fp16':>8} {'4bit':>8} {'dequant':>8} {'x fp16':>7}  path")
    results.setdefault("prefill", [])
    for (N, K), _, _ in TABLE:
        w = Weights(N, K)
        t_copies = w.torch_copies()
        for M in PREFILL_ROWS:
            t16 = settled(time_torch, torch_calls(t_copies, M, K))
            ours = settled(measure, ours_calls(w, M, "float16", None), stream)
            dequant = settled(measure, ours_calls(w, M, "float16", "dequant"), stream)
            path = "fused" if M <= mm.fused_max_m("float16", N, K) else "dequant+cuBLAS"
            row = dict(N=N, K=K, M=M, torch_fp16_us=t16, ours_us=ours, dequant_us=dequant, path=path)
            results["prefill"].append(row)
            print(f"{N:>6}x{K:<6} {M:>5} {t16:8.1f} {ours:8.1f} {dequant:8.1f} {ours / t16:7.2f}  {path}")
        del t_copies, w
        cp.get_default_memory_pool().free_all_blocks()


def save(path: str | None, results: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(results, indent=1))


def measure(calls, stream, warm_seconds: float = 0.0) -> float:
    try:
        return time_cupy_graph(calls, REPEATS, stream, warm_seconds)
    except Exception as exc:  # noqa: BLE001 - report and go on with the other variants
        print(f"  failed: {type(exc).__name__}: {exc}")
        return float("nan")


def sweep(results: dict, stream, checkpoint) -> None:
    print("\nfused vs dequantize + cuBLAS (us per call), NF4 bs64 nested")
    print(f"{'N x K':>13} {'fmt':>8} {'M':>5} {'mma':>8} {'rt1':>8} {'rt2':>8} {'gemv':>8} {'dequant':>8}")
    nan = float("nan")
    for N, K in SWEEP_SHAPES:
        w = Weights(N, K)
        for fmt in ("float16", "bfloat16"):
            for M in SWEEP_M:
                small = M <= 16
                row = dict(N=N, K=K, fmt=fmt, M=M)
                row["mma_us"] = measure(ours_calls(w, M, fmt, "mma"), stream)
                row["rt1_us"] = measure(ours_calls(w, M, fmt, "mma-rt1"), stream) if small else nan
                row["rt2_us"] = measure(ours_calls(w, M, fmt, "mma-rt2"), stream) if small else nan
                row["gemv_us"] = measure(ours_calls(w, M, fmt, "gemv"), stream) if small else nan
                row["dequant_us"] = measure(ours_calls(w, M, fmt, "dequant"), stream)
                results["sweep"].append(row)
                print(f"{N:>6}x{K:<6} {fmt:>8} {M:>5} {row['mma_us']:8.1f} {row['rt1_us']:8.1f} {row['rt2_us']:8.1f} "
                      f"{row['gemv_us']:8.1f} {row['dequant_us']:8.1f}")  # fmt: skip
        if (N, K) in ((4096, 4096), (28672, 8192)):
            for M in GEMV_SWEEP_M:
                gemv = measure(ours_calls(w, M, "float32", "gemv"), stream)
                deq = measure(ours_calls(w, M, "float32", "dequant"), stream)
                results["gemv_sweep"].append(dict(N=N, K=K, fmt="float32", M=M, gemv_us=gemv, dequant_us=deq))
                print(f"{N:>6}x{K:<6} {'float32':>8} {M:>5} {'':>8} {'':>8} {'':>8} {gemv:8.1f} {deq:8.1f}")
        del w
        cp.get_default_memory_pool().free_all_blocks()
        checkpoint()


STAGE_SWEEP_M = (1, 2, 4, 8, 16)


def stage_sweep(results: dict, stream, checkpoint) -> None:
    """gemm_4bit_stage in each instantiated configuration against
    gemm_4bit_small (rt1, rt2) and the default dispatch ("mma"), fp16 activations, us per
    call; the default's GB/s in brackets."""
    print("\ngemm_4bit_stage vs gemm_4bit_small (us per call), NF4 bs64 nested, fp16")
    results.setdefault("stage_sweep", [])
    for N, K in SWEEP_SHAPES:
        w = Weights(N, K)
        for M in STAGE_SWEEP_M:
            tiles = 1 if M <= 8 else 2
            paths = ["mma", "mma-rt1", "mma-rt2"]
            paths += [f"stage-{rt}x{st}c{c}w{w}" for mt, rt, st, c, w in mm._STAGE_CONFIGS if mt == tiles]
            row = dict(N=N, K=K, M=M)
            for p in paths:
                row[p] = measure(ours_calls(w, M, "float16", p), stream)
            results["stage_sweep"].append(row)
            gbps = moved_bytes(w, M) / row["mma"] * 1e-3
            print(f"{N:>6}x{K:<6} {M:>3}  " + "  ".join(f"{p} {row[p]:.1f}" for p in paths) + f"  [{gbps:.0f} GB/s]")
        del w
        cp.get_default_memory_pool().free_all_blocks()
        checkpoint()


def compare(results: dict, stream, paths: list[str], rows: list[int]) -> None:
    """Forced fused paths side by side on the sweep shapes, fp16, us per call."""
    print(f"\nforced paths (us per call), NF4 bs64 nested, fp16: {', '.join(paths)}")
    results.setdefault("compare", [])
    for N, K in SWEEP_SHAPES:
        w = Weights(N, K)
        for M in rows:
            row = dict(N=N, K=K, M=M)
            for p in paths:
                row[p] = measure(ours_calls(w, M, "float16", p), stream)
            results["compare"].append(row)
            print(f"{N:>6}x{K:<6} {M:>4}  " + "  ".join(f"{p} {row[p]:.1f}" for p in paths))
        del w
        cp.get_default_memory_pool().free_all_blocks()


def half_sweep(results: dict, stream, checkpoint) -> None:
    """One fp16 / bf16 token: gemv_4bit_half as picked for the shape ("half") and in each
    instantiated configuration, against the tensor-core dispatch ("mma"), us per call; the
    best one's GB/s in brackets."""
    print("\ngemv_4bit_half vs the tensor-core kernels (us per call, one token), NF4 bs64 nested")
    results.setdefault("half_sweep", [])
    paths = ["mma", "half"] + [mm._half_path(c) for c in mm._HALF_CONFIGS]
    for N, K in SWEEP_SHAPES:
        w = Weights(N, K)
        for fmt in ("float16", "bfloat16"):
            row = dict(N=N, K=K, M=1, fmt=fmt)
            for p in paths:
                row[p] = measure(ours_calls(w, 1, fmt, p), stream)
            results["half_sweep"].append(row)
            gbps = moved_bytes(w, 1) / min(row[p] for p in paths) * 1e-3
            print(f"{N:>6}x{K:<6} {fmt[:4]}  " + "  ".join(f"{p} {row[p]:.1f}" for p in paths) + f"  [{gbps:.0f} GB/s]")
        del w
        cp.get_default_memory_pool().free_all_blocks()
        checkpoint()


TILE_SWEEP_M = (17, 32, 64, 96, 128, 192, 256, 512)
TILE_SWEEP_SHAPES = ((28672, 8192), (8192, 28672), (4096, 4096), (11008, 4096))


def tile_sweep(results: dict, stream, checkpoint) -> None:
    """gemm_4bit_tile in each instantiated (token tiles, row tiles) configuration against the
    default dispatch, dequantize + cuBLAS and torch fp16, fp16 activations."""
    paths = [f"tile-{mt}x{rt}" for mt, rt in mm._TILE_CONFIGS]
    print("\ngemm_4bit_tile configurations vs dequantize + cuBLAS and torch fp16 (us per call), NF4 bs64 nested")
    print(f"{'N x K':>13} {'M':>5} " + " ".join(f"{p[5:]:>7}" for p in paths) + f" {'mma':>7} {'wide':>7} "
          f"{'dequant':>7} {'fp16':>7}")  # fmt: skip
    results.setdefault("tile_sweep", [])
    for N, K in TILE_SWEEP_SHAPES:
        w = Weights(N, K)
        t_copies = w.torch_copies()
        for M in TILE_SWEEP_M:
            row = dict(N=N, K=K, M=M)
            for p in paths:
                row[p] = measure(ours_calls(w, M, "float16", p), stream)
            row["mma"] = measure(ours_calls(w, M, "float16", "mma"), stream)
            row["wide"] = measure(ours_calls(w, M, "float16", "mma-wide"), stream) if M <= 64 else float("nan")
            row["dequant"] = measure(ours_calls(w, M, "float16", "dequant"), stream)
            row["fp16"] = time_torch(torch_calls(t_copies, M, K))
            results["tile_sweep"].append(row)
            print(f"{N:>6}x{K:<6} {M:>5} " + " ".join(f"{row[p]:7.1f}" for p in paths) +
                  f" {row['mma']:7.1f} {row['wide']:7.1f} {row['dequant']:7.1f} {row['fp16']:7.1f}")  # fmt: skip
        del t_copies, w
        cp.get_default_memory_pool().free_all_blocks()
        checkpoint()


SPLIT_SWEEP_M = (17, 32, 48, 64, 128, 192, 256)
SPLIT_SWEEP_SHAPES = ((8192, 28672), (4096, 4096), (11008, 4096))
SPLIT_SWEEP_PATHS = ("mma", "tile", "tile-8x2k4", "tile-4x2k4", "mma-wide", "dequant")


def split_sweep(results: dict, stream, checkpoint) -> None:
    """gemm_4bit_tile with split-K across CTAs on the weights of few rows: the default dispatch
    ("mma", whatever fused_max_m says), the tile kernel with the default split ("tile"), two
    forced splits, gemm_4bit_mma ("mma-wide", up to 64 tokens), dequantize + cuBLAS and torch
    fp16; fp16 activations, us per call."""
    print("\nsplit-K sweep (us per call), NF4 bs64 nested, fp16")
    print(f"{'N x K':>13} {'M':>5} " + " ".join(f"{p:>10}" for p in SPLIT_SWEEP_PATHS) + f" {'fp16':>7}  default")
    results.setdefault("split_sweep", [])
    for N, K in SPLIT_SWEEP_SHAPES:
        w = Weights(N, K)
        t_copies = w.torch_copies()
        for M in SPLIT_SWEEP_M:
            row = dict(N=N, K=K, M=M)
            for p in SPLIT_SWEEP_PATHS:
                skip = p == "mma-wide" and M > 64
                row[p] = float("nan") if skip else measure(ours_calls(w, M, "float16", p), stream)
            row["fp16"] = time_torch(torch_calls(t_copies, M, K))
            _, _, ctas, ks, _, mt, rt = mm._pick_tile(M, N, K)
            row["default"] = f"{mt}x{rt} ctas {ctas} k{ks}"
            results["split_sweep"].append(row)
            print(f"{N:>6}x{K:<6} {M:>5} " + " ".join(f"{row[p]:10.1f}" for p in SPLIT_SWEEP_PATHS) +
                  f" {row['fp16']:7.1f}  {row['default']}")  # fmt: skip
            checkpoint()
        del t_copies, w
        cp.get_default_memory_pool().free_all_blocks()


def eager(results: dict) -> None:
    w = Weights(4096, 4096)
    packed, qs = w.copies[0]
    a = cp.random.default_rng(0).standard_normal((1, 4096), dtype=cp.float32).astype(cp.float16)
    for _ in range(5):
        cq.matmul_4bit(a, packed, qs)
    cp.cuda.Device().synchronize()
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        cq.matmul_4bit(a, packed, qs)
    cp.cuda.Device().synchronize()
    us = (time.perf_counter() - t0) / n * 1e6
    results["eager_m1_4096_us"] = us
    print(f"\neager cupyquant.matmul_4bit, M=1, 4096 x 4096: {us:.1f} us per call (wall clock, {n} calls)")


SASS_INSTANCES = {
    "gemm_4bit.cu": ("gemm_4bit_small<MmaHalf, true, 1, 1, false, 4>",
                     "gemm_4bit_small<MmaBFloat16, true, 2, 2, true, 8>",
                     "gemm_4bit_mma<MmaHalf, true, 8>", "gemm_4bit_tile<MmaHalf, true, 8, 2>",
                     "gemm_4bit_tile_split<MmaHalf, true, 8, 2>"),
    "gemv_4bit.cu": ("gemv_4bit<Float16, true, 1, 4, true>", "gemv_4bit<Float32, true, 4, 2, true>"),
}  # fmt: skip


def dump_sass(folder: Path) -> None:
    """nvcc -arch=sm_90 -cubin on a file that instantiates the templates, then cuobjdump -sass."""
    folder.mkdir(parents=True, exist_ok=True)
    kernels = Path(mm.__file__).parent / "rawkernels"
    for source, instances in SASS_INSTANCES.items():
        with tempfile.TemporaryDirectory() as tmp:
            unit = Path(tmp) / "unit.cu"
            unit.write_text(explicit_instantiations(source, instances))
            cubin = Path(tmp) / "unit.cubin"
            cmd = ["nvcc", "-arch=sm_90", "-std=c++17", "-cubin", "-Xptxas", "-v", f"-I{kernels}", str(unit), "-o",
                   str(cubin)]  # fmt: skip
            build = subprocess.run(cmd, capture_output=True, text=True)
            (folder / f"{source}.ptxas.txt").write_text(build.stdout + build.stderr)
            if build.returncode == 0:
                sass = subprocess.run(["cuobjdump", "-sass", str(cubin)], capture_output=True, text=True)
                (folder / f"{source}.sass").write_text(sass.stdout + sass.stderr)
    print(f"SASS and ptxas reports in {folder}", file=sys.stderr)


def explicit_instantiations(source: str, instances) -> str:
    """A translation unit that includes ``source`` and instantiates ``instances`` (for nvcc)."""
    kernels = Path(mm.__file__).parent / "rawkernels"
    text = [f'#include "{kernels / source}"']
    if source == "gemm_4bit.cu":
        sig = ("(const u16*, const u8*, const float*, const float*, const u8*, const float*, const float*, "
               "const float*, const u16*, u16*, int, int, int, int, int, int, int);")  # fmt: skip
        split_sig = sig.replace("int);", "int, float*, u32*);")  # gemm_4bit_tile_split's workspace
        text += [
            f"template __global__ void {i}{split_sig if i.startswith('gemm_4bit_tile_split') else sig}"
            for i in instances
        ]
    else:
        for inst in instances:
            params = inst.split("<", 1)[1][:-1]
            fmt = params.split(",")[0]
            storage = f"{fmt}::storage"
            sig = (f"(const {storage}*, const u8*, const float*, const float*, const u8*, const float*, "
                   f"const float*, const float*, const {storage}*, {storage}*, int, int, int, int, int);")  # fmt: skip
            text.append(f"template __global__ void gemv_4bit<{params}>{sig}")
    return "\n".join(text) + "\n"


if __name__ == "__main__":
    sys.exit(main())
