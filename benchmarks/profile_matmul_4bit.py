"""Run one 4-bit linear forward a few times, for a profiler to pick a launch.

    PYTHONPATH=. ncu --clock-control none --kernel-name regex:gemm_4bit --launch-skip 3 \
        --launch-count 1 python3 benchmarks/profile_matmul_4bit.py N K M [path]

NF4, blocksize 64, nested absmax, fp16 activations (the benchmark's default weight).
"""

from __future__ import annotations

import importlib
import math
import sys

import cupy as cp

import cupyquant as cq

mm = importlib.import_module("cupyquant.matmul_4bit")


def main() -> int:
    N, K, M = (int(v) for v in sys.argv[1:4])
    path = sys.argv[4] if len(sys.argv) > 4 else None
    rng = cp.random.default_rng(0)
    W = (rng.standard_normal((N, K), dtype=cp.float32) / math.sqrt(K)).astype(cp.float16)
    packed, qs = cq.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    a = rng.standard_normal((M, K), dtype=cp.float32).astype(cp.float16).reshape(-1)
    out = cp.empty(M * N, dtype=cp.float16)
    flat = packed.reshape(-1)
    for _ in range(6):
        if path is None:
            mm.matmul_4bit_bits(a, "float16", M, flat, qs, None, out)
        else:
            mm._matmul_fused(a, "float16", M, N, K, flat, qs, None, out, path=path)
    cp.cuda.Device().synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
