"""CuPy launchers for the blockwise kernels. Callers validate and allocate; these only
pick the template instantiation, check alignment and launch on the current stream.

Every array argument is a flat, C-contiguous CuPy array on the current device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _lut, codebooks
from ._xp import aligned, cupy, device_attribute
from .rawkernels import get_function, register_expressions

_FMT_STRUCT = {"float32": "Float32", "float16": "Float16", "bfloat16": "BFloat16"}
# Kernel code-choice modes (blockwise.cu): NF4 / FP4 tables, 8-bit table, 8-bit search.
_QUANT_ID = {"nf4": 0, "fp4": 1, "8bit": 2, "8bit_search": 3}
_THREADS = 256
_QUANT_VEC = 16  # elements per quantize thread
_DEQUANT_VEC = 32  # elements per dequantize thread (4 groups of 8)
_SOURCE = "blockwise.cu"

_HOST_TABLES = {
    "nf4_lut": _lut.nf4_table(),
    "fp4_lut": _lut.fp4_table(),
    "dynamic_lut": _lut.dynamic_table(),
    "nf4_values": codebooks.NF4_CODE,
    "fp4_values": codebooks.FP4_DEQUANT_TABLE,
    "dynamic": codebooks.dynamic_map(),
}


@functools.cache
def _table_on(name: str, device_id: int) -> Any:
    cp = cupy()
    with cp.cuda.Device(device_id):
        return cp.asarray(_HOST_TABLES[name])


def device_table(name: str) -> Any:
    """A codebook or lookup table as a CuPy array on the current device (cached)."""
    return _table_on(name, cupy().cuda.Device().id)


def _resident_blocks(threads: int) -> int:
    """Blocks that fill the current device once: SMs x (2048 threads / threads per block)."""
    return device_attribute("MultiProcessorCount") * max(1, 2048 // threads)


def code8_lookup(code: Any, is_default: bool) -> tuple[str, Any]:
    """How the 8-bit kernel finds codes of ``code``: ``("8bit", bucket table)`` when the
    code fits the exponent buckets, else ``("8bit_search", code)``. A custom code is
    read back to the host once to build its table (a device sync)."""
    if is_default:
        return "8bit", device_table("dynamic_lut")
    table = _lut.code8_table(code.get())
    if table is None:
        return "8bit_search", code
    return "8bit", cupy().asarray(table)


def _grid(work_items: int, per_block: int) -> tuple[int]:
    return (max(1, -(-work_items // per_block)),)


@dataclass(frozen=True)
class Scales:
    """Per-block scales: plain float32 absmax, or the nested (double-quantized) form."""

    absmax: Any = None
    qabsmax: Any = None
    code2: Any = None
    nested_absmax: Any = None
    offset: Any = None

    @property
    def nested(self) -> bool:
        return self.qabsmax is not None

    def kernel_args(self) -> tuple[Any, ...]:
        dummy = device_table("nf4_values")  # stands in for the pointers the variant ignores
        if self.nested:
            return (dummy, self.qabsmax, self.code2, self.nested_absmax, self.offset)
        return (self.absmax, dummy, dummy, dummy, dummy)


def _write_through(out: Any, alignment: int, launch) -> None:
    """Run ``launch(target)`` into ``out``, or into an aligned temporary copied to ``out``."""
    if out.data.ptr % alignment == 0:
        launch(out)
    else:
        tmp = cupy().empty_like(out)
        launch(tmp)
        out[...] = tmp


def quantize_blockwise(bits: Any, fmt: str, blocksize: int, quant: str, absmax: Any, out: Any,
                       table: Any = None, offset: Any = None) -> None:  # fmt: skip
    """Quantize ``bits`` (n elements) into ``out`` (packed u8 for 4-bit, u8[n] for 8-bit)
    and ``absmax`` (float32[blocks]). ``quant``: "nf4", "fp4", or "8bit" / "8bit_search"
    with ``table`` from :func:`code8_lookup`. ``offset``: float32 0-d array subtracted
    first (for nested absmax)."""
    n = bits.size
    if n == 0:
        return
    if quant in ("nf4", "fp4"):
        table = device_table(f"{quant}_lut")
    has_offset = offset is not None
    expr = f"quantize_blockwise<{_FMT_STRUCT[fmt]}, {blocksize}, {_QUANT_ID[quant]}, {str(has_offset).lower()}>"
    kernel = get_function(_SOURCE, expr)
    threads = max(_THREADS, blocksize // _QUANT_VEC)
    chunks = -(-n // (threads * _QUANT_VEC))
    grid = (min(chunks, _resident_blocks(threads)),)
    bits = aligned(bits, 16)
    off = offset if has_offset else table

    def launch(target: Any) -> None:
        kernel(grid, (threads,), (bits, table, off, absmax, target, np.int64(n)))

    _write_through(out, 8 if quant in ("nf4", "fp4") else 16, launch)


def dequantize_4bit(packed: Any, fmt: str, blocksize: int, quant_type: str, scales: Scales, out: Any,
                    tile_k: int = 0) -> None:  # fmt: skip
    """Decode ``out.size`` elements of packed 4-bit codes into ``out`` (storage of ``fmt``).
    ``tile_k`` > 0: ``packed`` is an (out.size / tile_k, tile_k) weight in tile order
    (:mod:`cupyquant.tiled_4bit`); ``out`` is row-major either way."""
    n = out.size
    if n == 0:
        return
    tiled = ", true" if tile_k else ""
    expr = f"dequantize_4bit<{_FMT_STRUCT[fmt]}, {blocksize}, {str(scales.nested).lower()}{tiled}>"
    kernel = get_function(_SOURCE, expr)
    packed = aligned(packed, 4)
    table = device_table(f"{quant_type}_values")
    grid = _grid(-(-n // _DEQUANT_VEC), _THREADS)

    def launch(target: Any) -> None:
        kernel(grid, (_THREADS,), (packed, table, *scales.kernel_args(), target, np.int64(n), np.int32(tile_k)))

    _write_through(out, 16, launch)


def dequantize_8bit(q: Any, code: Any, fmt: str, blocksize: int, scales: Scales, out: Any) -> None:
    """Decode ``q`` (u8[n]) with the 256-value ``code`` into ``out`` (storage of ``fmt``)."""
    n = out.size
    if n == 0:
        return
    expr = f"dequantize_8bit<{_FMT_STRUCT[fmt]}, {blocksize}, {str(scales.nested).lower()}>"
    kernel = get_function(_SOURCE, expr)
    q = aligned(q, 8)
    grid = _grid(-(-n // _DEQUANT_VEC), _THREADS)

    def launch(target: Any) -> None:
        kernel(grid, (_THREADS,), (q, code, *scales.kernel_args(), target, np.int64(n)))

    _write_through(out, 16, launch)


def absmax_offset(absmax: Any) -> Any:
    """The nested offset as a float32 0-d array: mean summed in float64, rounded once."""
    cp = cupy()
    if absmax.size == 0:
        return cp.zeros((), dtype=cp.float32)
    return cp.mean(absmax, dtype=cp.float64).astype(cp.float32)


def _kernel_expressions() -> list[str]:
    """Every instantiation the launchers above can ask for."""
    out = []
    for fmt in _FMT_STRUCT.values():
        for bs in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            modes = ("nf4", "fp4", "8bit", "8bit_search") if bs >= 64 else ("nf4", "fp4")
            out += [f"quantize_blockwise<{fmt}, {bs}, {_QUANT_ID[m]}, false>" for m in modes]
            for nested in ("false", "true"):
                out.append(f"dequantize_4bit<{fmt}, {bs}, {nested}>")
                out.append(f"dequantize_4bit<{fmt}, {bs}, {nested}, true>")
                if bs >= 64:
                    out.append(f"dequantize_8bit<{fmt}, {bs}, {nested}>")
    out.append(f"quantize_blockwise<Float32, 256, {_QUANT_ID['8bit']}, true>")
    return out


register_expressions(_SOURCE, _kernel_expressions)
