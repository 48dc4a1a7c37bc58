"""Per-call cost of ``cupyquant.torch.Linear4bit.forward`` at small M on the GPU.

PERFORMANCE.md's target: eager (no graph) M = 1, 4096 x 4096 NF4 in <= 20 us a call
(bitsandbytes 0.50.2: 29 us). At that size the kernel is a few microseconds, so the eager
number is mostly the Python + DLPack path; the CUDA-graph replay shows the GPU time alone.

Printed per mode: microseconds a call from CUDA events (median of repeats), the host time
to issue a call (perf_counter, no sync inside: the Python overhead), effective GB/s of
weight bytes, and the ratio to torch fp16 ``nn.Linear`` measured in the same run. Layers
are rotated among copies that together exceed ~400 MB, so the 50 MB L2 does not hold them.

    python benchmarks/bench_linear4bit_overhead.py [--n 4096 --k 4096 --m 1 --dtype fp16]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
from _graph_timing import time_graph
from torch import nn

import cupyquant.torch as cqt

ROTATION_BYTES = 400e6
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _layers(kind: str, n: int, k: int, dtype: torch.dtype, quant_type: str, nested: bool) -> list[nn.Module]:
    """Enough copies of one layer ("4bit" or "dense" torch) to exceed ROTATION_BYTES of weights."""
    weight_bytes = n * k / 2 if kind == "4bit" else n * k * dtype.itemsize
    copies = max(2, math.ceil(ROTATION_BYTES / weight_bytes))
    layers = []
    for _ in range(copies):
        linear = nn.Linear(k, n, bias=False, device="cuda")
        with torch.no_grad():
            linear.weight.copy_(torch.randn(n, k, device="cuda") / math.sqrt(k))
        if kind == "4bit":
            settings = {"compute_dtype": dtype, "quant_type": quant_type, "compress_statistics": nested}
            layers.append(cqt.Linear4bit.from_linear(linear, **settings))
        else:
            layers.append(linear.to(dtype))
    return layers


def _eager(layers: list[nn.Module], x: torch.Tensor, calls: int, repeats: int) -> tuple[float, float]:
    """(median us a call by CUDA events, median host us to issue a call)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    device_us, host_us = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start.record()
        t0 = time.perf_counter()
        for i in range(calls):
            layers[i % len(layers)](x)
        t1 = time.perf_counter()
        end.record()
        end.synchronize()
        device_us.append(start.elapsed_time(end) * 1e3 / calls)
        host_us.append((t1 - t0) * 1e6 / calls)
    return statistics.median(device_us), statistics.median(host_us)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="output features N")
    parser.add_argument("--k", type=int, default=4096, help="input features K")
    parser.add_argument("--m", type=int, nargs="+", default=[1], help="rows of activations")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp16")
    parser.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4")
    parser.add_argument("--plain", action="store_true", help="no nested absmax (default: nested)")
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 1
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    quantized = _layers("4bit", args.n, args.k, dtype, args.quant_type, not args.plain)
    dense = _layers("dense", args.n, args.k, dtype, args.quant_type, False)
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"Linear4bit {args.quant_type}{'' if args.plain else ' nested'} bs64, N x K = {args.n} x {args.k}, "
          f"{args.dtype} activations; {len(quantized)} / {len(dense)} rotated copies")  # fmt: skip
    header = f"{'M':>5} {'mode':<22} {'4bit us':>9} {'host us':>8} {'GB/s':>7} {'torch us':>9} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    weight_bytes = args.n * args.k / 2
    for m in args.m:
        x = torch.randn(m, args.k, device="cuda", dtype=dtype)
        modes = [("eager, inference_mode", torch.inference_mode), ("eager, grad enabled", torch.enable_grad)]
        for name, mode in modes:
            with mode():
                for layers in (quantized, dense):  # warm-up: compiles, handles, caches
                    for layer in layers:
                        layer(x)
                q_us, q_host = _eager(quantized, x, args.calls, args.repeats)
                d_us, _ = _eager(dense, x, args.calls, args.repeats)
            print(f"{m:>5} {name:<22} {q_us:>9.2f} {q_host:>8.2f} {weight_bytes / q_us / 1e3:>7.0f} "
                  f"{d_us:>9.2f} {q_us / d_us:>6.2f}")  # fmt: skip
        with torch.inference_mode():
            q_us, d_us = time_graph(quantized, x, args.repeats), time_graph(dense, x, args.repeats)
        print(f"{m:>5} {'graph replay':<22} {q_us:>9.2f} {'':>8} {weight_bytes / q_us / 1e3:>7.0f} "
              f"{d_us:>9.2f} {q_us / d_us:>6.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
