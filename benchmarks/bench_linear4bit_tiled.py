"""``Linear4bit`` in the bitsandbytes layout (``untile_()``) against tiles (``tile_()``).

Tiles are a CUDA layer's default for fp16 / bf16 compute, the bitsandbytes layout for float32.

The forward of the layer (NF4 bs64 nested, no bias) with fp16 compute at 1 / 16 / 64 / 128
tokens and float32 compute at 1 / 4 tokens (the CUDA-core GEMV) on PERFORMANCE.md's
shapes, microseconds a call by CUDA-graph replay of 20 calls (median of repeats). Layers
are rotated among copies that together exceed ~400 MB, so the 50 MB L2 does not hold the
weight; both layouts are timed in the same run.

    python benchmarks/bench_linear4bit_tiled.py
"""

from __future__ import annotations

import copy
import math

import torch
from _graph_timing import time_graph
from torch import nn

import cupyquant.torch as cqt

ROTATION_BYTES = 400e6
SHAPES = ((28672, 8192), (8192, 28672), (4096, 4096), (11008, 4096))
TOKENS = {torch.float16: (1, 16, 64, 128), torch.float32: (1, 4)}
REPEATS = 10


def _layers(n: int, k: int, dtype: torch.dtype) -> tuple[list[nn.Module], list[nn.Module]]:
    """Copies of one quantized layer, in the bitsandbytes layout and tiled."""
    linear = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.float16)
    base = cqt.Linear4bit.from_linear(linear, quant_type="nf4", compute_dtype=dtype)
    copies = max(2, math.ceil(ROTATION_BYTES / (n * k / 2)))
    plain = [copy.deepcopy(base).untile_() for _ in range(copies)]
    return plain, [copy.deepcopy(base).tile_() for _ in range(copies)]


def main() -> None:
    torch.manual_seed(0)
    print(f"GPU: {torch.cuda.get_device_name()}")
    for dtype, tokens in TOKENS.items():
        name = str(dtype).removeprefix("torch.")
        print(f"Linear4bit forward, NF4 bs64 nested, {name} compute; us a call (graph replay): "
              "bitsandbytes layout / tiles")  # fmt: skip
        print(f"{'N x K':>13} " + " ".join(f"{'M=' + str(m):>15}" for m in tokens))
        with torch.inference_mode():
            for n, k in SHAPES:
                plain, tiled = _layers(n, k, dtype)
                cells = []
                for m in tokens:
                    x = torch.randn(m, k, device="cuda", dtype=dtype)
                    cells.append(f"{time_graph(plain, x, REPEATS):6.1f} / {time_graph(tiled, x, REPEATS):6.1f}")
                print(f"{n:>6}x{k:<6} " + " ".join(f"{c:>15}" for c in cells), flush=True)
                del plain, tiled
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
