"""A 4-bit weight re-laid in 16-row x 128-column tiles, for faster products at 2..16 tokens.

The bitsandbytes layout stores W (N, K) row-major, two codes a byte. A warp of the fused
tensor-core kernels reads 16 rows x 128 columns at a time, and in that layout those bytes
lie in 16 runs of 64 bytes, one a row apart; DRAM serves such scattered runs well below
its peak. :func:`tile_4bit` stores the same bytes tile after tile, each tile's 16 rows of
64 bytes contiguous (1 KB), so every load of a warp reads 512 contiguous bytes:

    tile (r, s) = rows 16r .. 16r + 15, columns 128s .. 128s + 127
    byte offset of (row, column pair j of the tile) = ((r * K / 128 + s) * 16 + row % 16) * 64 + j

The scales (``quant_state``) are unchanged. H100, NF4, graph us (benchmarks/
NOTES_matmul_4bit.md, runs 31-33, 37 and 42): 28672 x 8192 at 16 tokens 59.8 against 70.1
in the bitsandbytes layout, 2 tokens 57.3 against 60.7; one token (gemv_4bit_tiled, a warp
reading whole tiles) 49.6 against 48.3, 8192 x 28672 46.7 against 46.6. Every kernel but
gemm_4bit_stage (which the dispatch never gives a tiled weight) has a build that reads the
tiles in place: float32 rows run the CUDA-core GEMV on them, gemm_4bit_small in 16-token
chunks and gemm_4bit_mma take the tokens above 16 that the bitsandbytes layout gives them
(17..32 on weights up to 8192 x 8192 the chunks, 12.3 us against 17.6 at 32 tokens on 4096
x 4096; on other weights under 8192 rows gemm_4bit_mma, more where there is no wgmma), and
past the fused switch point
(:func:`cupyquant.matmul_4bit.fused_max_m`) the dequantize kernel (28672 x 8192 at 4096
tokens 2944 against 2934 us). ``Linear4bit`` keeps its weight tiled on CUDA by default.
Checkpoints keep the bitsandbytes layout: :meth:`Tiled4bit.untile` gives it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _xp
from .blockwise import _check_array, check_state_4bit
from .quant_state import QuantState

__all__ = ["TILE_ROWS", "TILE_COLS", "Tiled4bit", "tile_4bit"]

TILE_ROWS = 16
TILE_COLS = 128


def tileable(shape: tuple[int, ...] | None) -> bool:
    """Whether tile order can hold a weight of ``shape``: 2-D (N, K), N % 16 == 0, K % 128 == 0."""
    return shape is not None and len(shape) == 2 and shape[0] % TILE_ROWS == 0 and shape[1] % TILE_COLS == 0


def check_tile_shape(shape: tuple[int, ...] | None) -> tuple[int, int]:
    """(N, K) of a weight that tile order can hold (see :func:`tileable`), else ValueError."""
    if not tileable(shape):
        raise ValueError(
            f"tile order needs a 2-D (N, K) weight with N % {TILE_ROWS} == 0 and K % {TILE_COLS} == 0, "
            f"got shape {shape}"
        )
    return int(shape[0]), int(shape[1])


def _tiled_shape(N: int, K: int) -> tuple[int, int, int, int]:
    """The packed (N, K / 2) bytes as (row tiles, rows a tile, column tiles, bytes a tile row)."""
    return N // TILE_ROWS, TILE_ROWS, K // TILE_COLS, TILE_COLS // 2


def tile_bytes(packed: Any, N: int, K: int) -> Any:
    """Flat bitsandbytes-layout codes of an (N, K) weight -> a new flat array in tile order."""
    xp = _xp.array_module(packed)
    return xp.ascontiguousarray(packed.reshape(_tiled_shape(N, K)).transpose(0, 2, 1, 3)).reshape(-1)


def untile_bytes(tiled: Any, N: int, K: int) -> Any:
    """The inverse of :func:`tile_bytes`: a new flat array in the bitsandbytes layout."""
    xp = _xp.array_module(tiled)
    rows, per_tile, cols, width = _tiled_shape(N, K)
    return xp.ascontiguousarray(tiled.reshape(rows, cols, per_tile, width).transpose(0, 2, 1, 3)).reshape(-1)


@dataclass(frozen=True, eq=False)
class Tiled4bit:
    """A quantized (N, K) weight in tile order (see the module docstring), with its state.

    ``data``: flat uint8, N * K / 2 bytes, NumPy or CuPy; ``quant_state``: the state of the
    weight it was made from (shape (N, K)). Pass it as ``B`` to :func:`cupyquant.matmul_4bit`
    (``quant_state`` None or this one).
    """

    data: Any
    quant_state: QuantState

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the weight."""
        return self.quant_state.shape

    def untile(self) -> Any:
        """The packed codes in the bitsandbytes layout (flat uint8, a new array)."""
        N, K = self.shape
        return untile_bytes(self.data, N, K)


def tile_4bit(B: Any, quant_state: QuantState) -> Tiled4bit:
    """``B`` (packed codes of an (N, K) weight from ``quantize_4bit``, bitsandbytes layout)
    as a :class:`Tiled4bit`. Needs N % 16 == 0 and K % 128 == 0. A copy: B is unchanged."""
    _check_array(B, "B")
    check_state_4bit(quant_state)
    if len(quant_state.shape) != 2:
        raise ValueError(f"tile_4bit needs a quantized 2-D (N, K) weight, got shape {quant_state.shape}")
    N, K = quant_state.shape
    if N % TILE_ROWS or K % TILE_COLS:
        raise ValueError(f"tile_4bit needs N % {TILE_ROWS} == 0 and K % {TILE_COLS} == 0, got (N, K) = ({N}, {K})")
    if not B.flags.c_contiguous:
        raise ValueError("B (packed codes) must be C-contiguous")
    packed = B.reshape(-1).view(np.uint8)
    if packed.size != N * K // 2:
        raise ValueError(f"B holds {packed.size} bytes but an ({N}, {K}) weight has {N * K // 2}")
    with _xp.device_of(packed):
        return Tiled4bit(tile_bytes(packed, N, K), quant_state)
