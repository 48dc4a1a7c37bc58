"""Quantize / dequantize throughput on the GPU (PERFORMANCE.md's first table).

Times each op with CUDA events around N_CALLS back-to-back calls, median of N_REPEATS,
on an 8192 x 28672 fp16 matrix (470 MB: far larger than the 50 MB L2, so no rotation
is needed). GB/s counts bytes read + written. The device-to-device copy of the same
matrix is measured in the same run as the ceiling.

    PYTHONPATH=. python3 benchmarks/bench_quant.py [--rows 8192 --cols 28672]
"""

from __future__ import annotations

import argparse
import statistics

import cupy as cp

import cupyquant as cq

N_CALLS = 10
N_REPEATS = 10


def time_us(fn) -> float:
    """Median microseconds per call over N_REPEATS runs of N_CALLS calls."""
    for _ in range(3):
        fn()
    cp.cuda.Device().synchronize()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    samples = []
    for _ in range(N_REPEATS):
        start.record()
        for _ in range(N_CALLS):
            fn()
        stop.record()
        stop.synchronize()
        samples.append(cp.cuda.get_elapsed_time(start, stop) * 1000 / N_CALLS)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--cols", type=int, default=28672)
    args = parser.parse_args()
    n = args.rows * args.cols
    x = cp.random.default_rng(0).standard_normal((args.rows, args.cols), dtype=cp.float32).astype(cp.float16)
    name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()

    rows = []
    copy_dst = cp.empty_like(x)
    t = time_us(lambda: copy_dst.__setitem__(Ellipsis, x))
    rows.append(("device-to-device copy (ceiling)", t, 4 * n))

    for nested in (False, True):
        label = " nested" if nested else ""
        packed, state = cq.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=nested)
        absmax_bytes = 4 * n // 64
        t = time_us(
            lambda nested=nested: cq.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=nested)
        )
        rows.append((f"quantize_4bit nf4 bs64{label}", t, 2 * n + n // 2 + absmax_bytes))
        out = cp.empty_like(x)
        t = time_us(lambda p=packed, s=state, o=out: cq.dequantize_4bit(p, s, out=o))
        read_absmax = n // 64 if nested else absmax_bytes
        rows.append((f"dequantize_4bit nf4 bs64{label}", t, n // 2 + read_absmax + 2 * n))

    q, s8 = cq.quantize_blockwise(x, blocksize=256)
    t = time_us(lambda: cq.quantize_blockwise(x, blocksize=256))
    rows.append(("quantize_blockwise 8-bit bs256", t, 2 * n + n + 4 * n // 256))
    out = cp.empty_like(x)
    t = time_us(lambda: cq.dequantize_blockwise(q, s8, out=out))
    rows.append(("dequantize_blockwise 8-bit bs256", t, n + 4 * n // 256 + 2 * n))

    print(
        f"GPU: {name}; {args.rows} x {args.cols} float16 ({n / 1e6:.0f} M elements); "
        f"median of {N_REPEATS} x {N_CALLS} calls, CUDA events"
    )
    print("| op | us | GB/s (read + written) | of copy bandwidth |")
    print("|---|---:|---:|---:|")
    copy_gbs = rows[0][2] / rows[0][1] / 1e3
    for label, us, nbytes in rows:
        gbs = nbytes / us / 1e3
        print(f"| {label} | {us:,.0f} | {gbs:,.0f} | {gbs / copy_gbs:.0%} |")


if __name__ == "__main__":
    main()
