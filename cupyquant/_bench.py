"""Quantize / dequantize throughput on the current GPU (``cupyquant bench``).

The same measurement as ``benchmarks/bench_quant.py``, packaged so an installed
cupyquant can run it: each op is timed with CUDA events around ``calls`` back-to-back
calls, median of ``repeats``, on a float16 matrix; GB/s counts bytes read + written,
and a device-to-device copy of the same matrix, measured in the same run, is the ceiling.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from . import _xp
from .blockwise import dequantize_4bit, dequantize_blockwise, quantize_4bit, quantize_blockwise

__all__ = ["BenchRow", "gpu_name", "run"]


@dataclass(frozen=True)
class BenchRow:
    """One timed op: label, microseconds per call, bytes read + written per call."""

    label: str
    us: float
    nbytes: int

    @property
    def gbps(self) -> float:
        """Throughput in GB/s (10^9 bytes)."""
        return self.nbytes / self.us / 1e3


def gpu_name() -> str:
    """The current CUDA device's name."""
    cp = _xp.cupy()
    return cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()


def _time_us(fn: Callable[[], object], calls: int, repeats: int) -> float:
    """Median microseconds per call over ``repeats`` runs of ``calls`` calls (after a warm-up)."""
    cp = _xp.cupy()
    for _ in range(3):
        fn()
    cp.cuda.Device().synchronize()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    samples = []
    for _ in range(repeats):
        start.record()
        for _ in range(calls):
            fn()
        stop.record()
        stop.synchronize()
        samples.append(cp.cuda.get_elapsed_time(start, stop) * 1000 / calls)
    return statistics.median(samples)


def run(rows: int = 8192, cols: int = 28672, calls: int = 10, repeats: int = 10) -> list[BenchRow]:
    """Time the blockwise ops on a (rows, cols) float16 matrix; the first row is the copy ceiling.

    Needs a usable GPU (``cupyquant._xp.gpu_available()``).
    """
    for name, value in (("rows", rows), ("cols", cols), ("calls", calls), ("repeats", repeats)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    cp = _xp.cupy()
    n = rows * cols
    x = cp.random.default_rng(0).standard_normal((rows, cols), dtype=cp.float32).astype(cp.float16)
    result = []
    copy_dst = cp.empty_like(x)
    result.append(BenchRow("device-to-device copy (ceiling)", _time_us(lambda: copy_dst.__setitem__(Ellipsis, x),
                                                                        calls, repeats), 4 * n))  # fmt: skip
    absmax_bytes = 4 * ((n + 63) // 64)
    for nested in (False, True):
        label = " nested" if nested else ""
        packed, state = quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=nested)
        t = _time_us(lambda nested=nested: quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=nested),
                     calls, repeats)  # fmt: skip
        result.append(BenchRow(f"quantize_4bit nf4 bs64{label}", t, 2 * n + n // 2 + absmax_bytes))
        out = cp.empty_like(x)
        t = _time_us(lambda p=packed, s=state, o=out: dequantize_4bit(p, s, out=o), calls, repeats)
        read_absmax = absmax_bytes // 4 if nested else absmax_bytes
        result.append(BenchRow(f"dequantize_4bit nf4 bs64{label}", t, n // 2 + read_absmax + 2 * n))
    q, state8 = quantize_blockwise(x, blocksize=256)
    t = _time_us(lambda: quantize_blockwise(x, blocksize=256), calls, repeats)
    result.append(BenchRow("quantize_blockwise 8-bit bs256", t, 2 * n + n + 4 * ((n + 255) // 256)))
    out = cp.empty_like(x)
    t = _time_us(lambda: dequantize_blockwise(q, state8, out=out), calls, repeats)
    result.append(BenchRow("dequantize_blockwise 8-bit bs256", t, n + 4 * ((n + 255) // 256) + 2 * n))
    return result
