"""Run one LLM.int8 linear forward a few times, for a profiler to pick a launch.

    PYTHONPATH=. ncu --clock-control none --kernel-name regex:int8_linear --launch-skip 3 \
        --launch-count 1 python3 benchmarks/profile_int8.py N K M THRESHOLD

fp16 activations with 6 outlier columns (as benchmarks/bench_int8.py), no bias, "auto".
"""

from __future__ import annotations

import sys

import cupy as cp
import numpy as np

from cupyquant import _reference_int8 as ref8
from cupyquant import int8 as I8


def main() -> int:
    N, K, M = (int(v) for v in sys.argv[1:4])
    threshold = float(sys.argv[4])
    rng = np.random.default_rng(0)
    cb, scb, _ = ref8.quantize_rows(rng.standard_normal((N, K)).astype(np.float32))
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[:, rng.permutation(K)[:6]] *= 10
    a = cp.asarray(x.astype(np.float16).view(np.uint16).reshape(-1))
    gcb, gscb = cp.asarray(cb.reshape(-1)), cp.asarray(scb)
    for _ in range(6):
        I8.int8_linear_bits(a, "float16", M, K, gcb, gscb, N, None, None, threshold)
    cp.cuda.Device().synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
