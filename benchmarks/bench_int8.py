"""LLM.int8 on the GPU: Linear8bitLt forward and int8 row-wise quantization.

Linear8bitLt (has_fp16_weights=False, fp16 activations) against torch fp16 ``nn.Linear``
in the same run, for PERFORMANCE.md's shapes: microseconds a call from CUDA events around
replays of a CUDA graph of 20 calls (median of repeats), with layers rotated among copies
that together exceed ~400 MB so the 50 MB L2 does not hold the weights; eager times (100
back-to-back calls) too; every backend is captured, cuBLAS included (ctypes cublasGemmEx).
GB/s counts the weight, activation and output bytes of a call. M > 8 rows are run with
the int8 GEMM backends ("auto": up to M = 16 the medium-M kernel that streams the weights
once, from 17 cuBLAS int32 GEMM + dequantization kernel; "mmv": the medium-M kernel up to
64 rows; "flags": the cuBLAS path's many-row outlier form; "mma": this package's
tensor-core kernel with the fused dequantization).
Activations carry six outlier columns (x10), so threshold 6.0 runs the decomposition for
real.

    PYTHONPATH=. python3 benchmarks/bench_int8.py [--quick] [--repeats 10] [--rows 1,16,64]
        [--no-eager] [--no-quant] [--pieces]

``--pieces`` times the kernels of the cuBLAS and medium-M paths one by one (CuPy graph replays).

Targets (H100, PERFORMANCE.md): 4096 x 4096 M=1 <= 9 us (graph); 28672 x 8192 M=1 <= 95 us;
M=4096 faster than fp16 on both; threshold 6 <= 1.25x threshold 0 at every M; row-wise
quantization of 8192 x 28672 fp16 >= 2300 GB/s.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics

import torch
from _graph_timing import GRAPH_CALLS, time_cupy_graph, time_graph
from torch import nn

import cupyquant._gpu_int8 as g8
import cupyquant.int8 as cq8
from cupyquant.torch import int8 as T

ROTATION_BYTES = 400e6
SHAPES = [(4096, 4096), (28672, 8192)]  # (N, K): output x input features
ROWS = [1, 16, 32, 64, 256, 512, 4096]
OUTLIER_COLUMNS = 6


def _weights(n: int, k: int, bytes_per_weight: float) -> int:
    return max(1, math.ceil(ROTATION_BYTES / (n * k * bytes_per_weight)))


def _int8_layers(n: int, k: int, threshold: float) -> list[nn.Module]:
    layers = []
    for _ in range(_weights(n, k, 1)):
        layer = T.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=threshold, device="cuda")
        with torch.no_grad():
            layer.weight.data = torch.randn(n, k, device="cuda") / math.sqrt(k)
        layers.append(layer.cuda())  # quantizes on the GPU
    return layers


def _fp16_layers(n: int, k: int) -> list[nn.Module]:
    layers = []
    for _ in range(_weights(n, k, 2)):
        layer = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.float16)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(n, k, device="cuda") / math.sqrt(k))
        layers.append(layer)
    return layers


def _activations(m: int, k: int) -> torch.Tensor:
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    g = torch.Generator(device="cpu").manual_seed(0)
    cols = torch.randperm(k, generator=g)[:OUTLIER_COLUMNS].cuda()
    x[:, cols] *= 10
    return x


def _time_eager(layers: list[nn.Module], x: torch.Tensor, repeats: int, calls: int = 100) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start.record()
        for i in range(calls):
            layers[i % len(layers)](x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def _gbps(nbytes: float, us: float) -> float:
    return nbytes / (us * 1e-6) / 1e9


def _backends(m: int) -> list[str]:
    """Backends timed at M rows: "auto" (the gemv up to GEMV_AUTO_MAX_M rows, the medium-M
    kernel up to 16, cuBLAS from 17); up to 8 rows next to the gemv ("mma" names it there)
    and "mmv" (the medium-M kernel), at 9..16 next to the tensor-core GEMM ("mma"); from 17
    rows next to "flags" (its threshold-6 form for many rows: byte flags and
    int8_outlier_weights), at 17..64 also "mmv" (the medium-M kernel instead of cuBLAS)."""
    if m <= g8.GEMV_MAX_M:
        return ["auto", "mma", "mmv"]
    if m <= 16:
        return ["auto", "mma"]
    if m <= g8.MMV_MAX_M:
        return ["auto", "flags", "mmv"]
    return ["auto", "flags", "mma"]


_AUTO = {
    "CUBLAS_MIN_M": g8.CUBLAS_MIN_M,
    "_GATHER_MAX_READS": g8._GATHER_MAX_READS,
    "GEMV_AUTO_MAX_M": g8.GEMV_AUTO_MAX_M,
}


def _set_backend(name: str) -> None:
    """cupyquant's int8 GEMM backend, or "auto" with one choice changed ("mmv": the medium-M
    kernel at every M up to MMV_MAX_M, no gemv, no cuBLAS; "flags": the many-row outlier
    form at every M)."""
    g8.CUBLAS_MIN_M = g8.MMV_MAX_M + 1 if name == "mmv" else _AUTO["CUBLAS_MIN_M"]
    g8.GEMV_AUTO_MAX_M = 0 if name == "mmv" else _AUTO["GEMV_AUTO_MAX_M"]
    g8._GATHER_MAX_READS = 0 if name == "flags" else _AUTO["_GATHER_MAX_READS"]
    cq8.set_int8_gemm_backend("auto" if name in ("mmv", "flags") else name)


def bench_linear(shapes: list[tuple[int, int]], rows: list[int], repeats: int, eager_too: bool = True) -> None:
    print("\nLinear8bitLt forward (fp16 activations, no bias), us a call")
    header = (
        f"{'N x K':>13} {'M':>5} {'thr':>4} {'backend':>7} {'graph us':>9} {'eager us':>9} {'GB/s':>7} "
        f"{'fp16 us':>8} {'x fp16':>7} {'thr6/thr0':>9}"
    )
    print(header)
    print("-" * len(header))
    for n, k in shapes:
        fp16 = _fp16_layers(n, k)
        int8 = {t: _int8_layers(n, k, t) for t in (0.0, 6.0)}
        for m in rows:
            x = _activations(m, k)
            with torch.no_grad():
                fp16_us = time_graph(fp16, x, repeats)
                for backend in _backends(m):
                    _set_backend(backend)
                    base = None
                    for t in (0.0, 6.0):
                        eager = _time_eager(int8[t], x, max(3, repeats // 3)) if eager_too else math.nan
                        us = time_graph(int8[t], x, repeats)
                        base = us if t == 0.0 else base
                        nbytes = n * k + 4 * n + 2 * m * k + 2 * m * n
                        rel = f"{us / base:9.2f}" if t else f"{'':>9}"
                        print(
                            f"{n:>6} x {k:<5} {m:>5} {t:>4.0f} {backend:>7} {us:>9.1f} {eager:>9.1f} "
                            f"{_gbps(nbytes, us):>7.0f} {fp16_us:>8.1f} {us / fp16_us:>7.2f} {rel}"
                        )
            _set_backend("auto")
        del fp16, int8
        torch.cuda.empty_cache()


def bench_quant(repeats: int) -> None:
    print("\nint8 row-wise quantization (fp16 -> int8 + row absmax), 8192 x 28672")
    rows, k = 8192, 28672
    copies = 2  # 470 MB of fp16 each: L2 holds neither
    xs = [torch.randn(rows, k, device="cuda", dtype=torch.float16) for _ in range(copies)]
    for x in xs:
        x[:, :OUTLIER_COLUMNS] *= 10
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    nbytes = rows * k * 3 + 4 * rows
    for t in (0.0, 6.0):
        for x in xs:
            T.int8_vectorwise_quant(x, t)  # compile
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            start.record()
            for i in range(10):
                T.int8_vectorwise_quant(xs[i % copies], t)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / 10)
        us = statistics.median(times)
        note = "  (includes finding the outlier columns: one device sync)" if t else ""
        print(f"  threshold {t:.0f}: {us:8.1f} us  {_gbps(nbytes, us):7.0f} GB/s{note}")
    copy_us = []
    dst = torch.empty_like(xs[0])
    for _ in range(repeats):
        torch.cuda.synchronize()
        start.record()
        dst.copy_(xs[0])
        end.record()
        end.synchronize()
        copy_us.append(start.elapsed_time(end) * 1e3)
    us = statistics.median(copy_us)
    print(f"  reference device copy of the fp16 input: {us:8.1f} us  {_gbps(2 * 2 * rows * k, us):7.0f} GB/s")


def _with_gather_threads(threads: int, fn) -> None:
    """``fn()`` with int8_outlier_gather's CTAs of ``threads`` (256 or 1024) threads."""
    g8._GATHER_WIDE_M, kept = (1 << 30 if threads == 256 else 0), g8._GATHER_WIDE_M
    try:
        fn()
    finally:
        g8._GATHER_WIDE_M = kept


def _pieces(m: int, n: int, k: int) -> dict:
    """The cuBLAS path's kernels at (M, N, K) as callables, on random operands."""
    import cupy

    a = cupy.from_dlpack(_activations(m, k).detach()).view(cupy.uint16).reshape(-1)
    cb = cupy.random.randint(-127, 128, n * k, dtype=cupy.int8)
    scb = cupy.random.uniform(0.5, 1.5, n).astype(cupy.float32)
    ca = cupy.empty(m * k, dtype=cupy.int8)
    sca = cupy.empty(m, dtype=cupy.float32)
    acc = cupy.empty(m * n, dtype=cupy.int32)
    out = cupy.empty(m * n, dtype=cupy.uint16)
    rowbits = g8._row_quant_wide(a, "float16", m, k, 6.0, ca, sca, g8._ROW_BITS)
    flags = g8._row_quant_wide(a, "float16", m, k, 6.0, ca, sca, g8._BYTE_FLAGS)
    sparse = (a, cb, k, *g8.outlier_weights(cb, scb, flags, a, ca, m, n, k, "float16"))
    g8._cublas_int32(ca, cb, m, n, k, acc)
    found = g8.outlier_gather_arrays(m, n, k, "float16")
    g8.outlier_gather(rowbits, cb, scb, a, ca, m, n, k, "float16", found)
    gathered = (a, cb, k, ca, *found)
    gather_pieces = {
        "row_quant_wide thr6 rowbits": lambda: g8._row_quant_wide(a, "float16", m, k, 6.0, ca, sca, g8._ROW_BITS),
        **{
            f"outlier_gather {t}": lambda t=t: _with_gather_threads(
                t, lambda: g8.outlier_gather(rowbits, cb, scb, a, ca, m, n, k, "float16", found)
            )
            for t in (256, 1024)
        },
        **{
            f"mm_dequant_outliers subtract cpt={c}": (
                lambda c=c: g8.mm_dequant(acc, sca, scb, m, n, "float16", out, sparse=gathered, columns_per_thread=c)
            )
            for c in g8._SUBTRACT_COLUMN_CHOICES
        },
    }
    return {
        **gather_pieces,
        "row_quant thr0": lambda: g8.row_quant(a, "float16", m, k, 0.0, ca, sca),
        "row_quant_wide thr0": lambda: g8._row_quant_wide(a, "float16", m, k, 0.0, ca, sca, g8._NO_FLAGS),
        "row_quant_wide thr6 + memset": lambda: g8._row_quant_wide(a, "float16", m, k, 6.0, ca, sca, g8._BYTE_FLAGS),
        "outlier_weights": lambda: g8.outlier_weights(cb, scb, flags, a, ca, m, n, k, "float16"),
        "cuBLAS int32": lambda: g8._cublas_int32(ca, cb, m, n, k, acc),
        "mm_dequant": lambda: g8.mm_dequant(acc, sca, scb, m, n, "float16", out),
        **{
            f"mm_dequant_outliers cpt={c}": (
                lambda c=c: g8.mm_dequant(acc, sca, scb, m, n, "float16", out, sparse=sparse, columns_per_thread=c)
            )
            for c in g8._DEQUANT_COLUMN_CHOICES
        },
    }


def _mmv_pieces(m: int, n: int, k: int) -> dict:
    """The medium-M path's two kernels at (M, N, K), threshold 0 and 6, as callables; the
    weight rotated among copies past ~400 MB as in the layer timings."""
    import cupy

    a = cupy.from_dlpack(_activations(m, k).detach()).view(cupy.uint16).reshape(-1)
    copies = _weights(n, k, 1)
    cbs = [cupy.random.randint(-127, 128, n * k, dtype=cupy.int8) for _ in range(copies)]
    scb = cupy.random.uniform(0.5, 1.5, n).astype(cupy.float32)
    out = cupy.empty(m * n, dtype=cupy.uint16)
    mt = g8._mmv_tile(m, k)
    turn = itertools.count()

    def product(t: float):
        quant = g8._mmv_quant(a, "float16", m, k, t, mt)
        return lambda: g8._mmv_product(
            a, "float16", m, k, cbs[next(turn) % copies], scb, n, None, "Float16", False, t > 0, out, mt, quant
        )

    memset = " + memset" if mt > g8._MMV_TILES[0] else ""  # byte flags above MT = 16
    return {
        "quant thr0": lambda: g8._mmv_quant(a, "float16", m, k, 0.0, mt),
        f"quant thr6{memset}": lambda: g8._mmv_quant(a, "float16", m, k, 6.0, mt),
        "mmv thr0": product(0.0),
        "mmv thr6": product(6.0),
    }


def bench_pieces(repeats: int) -> None:
    """The cuBLAS and medium-M paths' kernels one by one (graph replays; activations stay in
    L2 where they fit; the medium-M weight is rotated)."""
    import cupy

    print("\ncuBLAS path pieces (fp16, 6 outlier columns), us a call")
    shapes = [(32, 4096, 4096), (64, 4096, 4096), (256, 4096, 4096), (64, 28672, 8192)]
    shapes += [(512, 4096, 4096), (4096, 4096, 4096), (512, 28672, 8192), (4096, 28672, 8192)]
    for m, n, k in shapes:
        timed = {name: time_cupy_graph([fn] * GRAPH_CALLS, repeats) for name, fn in _pieces(m, n, k).items()}
        line = ", ".join(f"{name} {us:.1f}" for name, us in timed.items())
        print(f"  M={m} N={n} K={k}: {line}")
    print("\nmedium-M path pieces (fp16, 6 outlier columns), us a call")
    for m, n, k in [(16, 4096, 4096), (64, 4096, 4096), (64, 28672, 8192)]:
        timed = {name: time_cupy_graph([fn] * GRAPH_CALLS, repeats) for name, fn in _mmv_pieces(m, n, k).items()}
        line = ", ".join(f"{name} {us:.1f}" for name, us in timed.items())
        print(f"  M={m} N={n} K={k}: {line}")
        cupy.get_default_memory_pool().free_all_blocks()  # the weight copies of this shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4096 x 4096 only, M in (1, 4096)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rows", help="comma-separated M values (default: all of ROWS)")
    parser.add_argument("--no-eager", action="store_true", help="graph replays only")
    parser.add_argument("--no-quant", action="store_true", help="skip the 8192 x 28672 quantization benchmark")
    parser.add_argument("--pieces", action="store_true", help="also time the cuBLAS / medium-M kernels one by one")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    props = torch.cuda.get_device_properties(0)
    print(f"GPU: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}")
    import cupy

    rotation = f"{ROTATION_BYTES / 1e6:.0f} MB"
    print(f"CuPy {cupy.__version__}; graph replays of {GRAPH_CALLS} calls, weights rotated past {rotation}")
    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = [1, 4096] if args.quick else ROWS
    if args.rows:
        rows = [int(r) for r in args.rows.split(",")]
    bench_linear(shapes, rows, args.repeats, eager_too=not args.no_eager)
    if args.pieces:
        bench_pieces(args.repeats)
    if not args.no_quant:
        bench_quant(args.repeats)


if __name__ == "__main__":
    main()
