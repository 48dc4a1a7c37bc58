"""Quantize / dequantize throughput on the GPU (PERFORMANCE.md's first table).

Each op is timed with CUDA events around 10 back-to-back calls, median of 10 runs, on an
8192 x 28672 fp16 matrix (470 MB: far larger than the 50 MB L2, so no rotation is
needed). GB/s counts bytes read + written. The device-to-device copy of the same matrix
is measured in the same run as the ceiling. The measurement itself lives in
``cupyquant._bench`` (also behind ``cupyquant bench``); this script prints its table.

    PYTHONPATH=. python3 benchmarks/bench_quant.py [--rows 8192 --cols 28672]
"""

from __future__ import annotations

import argparse

from cupyquant import _bench

N_CALLS = 10
N_REPEATS = 10


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--cols", type=int, default=28672)
    args = parser.parse_args()
    n = args.rows * args.cols
    rows = _bench.run(args.rows, args.cols, N_CALLS, N_REPEATS)
    print(
        f"GPU: {_bench.gpu_name()}; {args.rows} x {args.cols} float16 ({n / 1e6:.0f} M elements); "
        f"median of {N_REPEATS} x {N_CALLS} calls, CUDA events"
    )
    print("| op | us | GB/s (read + written) | of copy bandwidth |")
    print("|---|---:|---:|---:|")
    copy_gbs = rows[0].gbps
    for row in rows:
        print(f"| {row.label} | {row.us:,.0f} | {row.gbps:,.0f} | {row.gbps / copy_gbs:.0%} |")


if __name__ == "__main__":
    main()
