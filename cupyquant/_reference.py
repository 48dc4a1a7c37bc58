"""Vectorised NumPy implementations: the executable spec and the CPU path.

Every function takes flat (1-D) arrays. Float inputs arrive in their storage form
(bfloat16 as uint16 bits) with a format name, see ``cupyquant._xp.FLOAT_FORMATS``.
The CUDA kernels in ``rawkernels/`` reproduce these results bit for bit, so every
arithmetic step here is a single float32 operation, in the kernels' order.
"""

from __future__ import annotations

import numpy as np

from .codebooks import (
    FP4_DEQUANT_TABLE,
    FP4_MAGNITUDE_INDEX,
    FP4_THRESHOLDS,
    NF4_CODE,
    NF4_THRESHOLDS,
    dynamic_map,
)

NESTED_BLOCKSIZE = 256  # double quantization always compresses absmax in blocks of 256

_F32 = np.float32


# ---------------------------------------------------------------------------------------
# float formats
# ---------------------------------------------------------------------------------------
def to_float32(bits: np.ndarray, fmt: str) -> np.ndarray:
    """Widen a float32 / float16 / bfloat16 (uint16 bits) array to float32, exactly."""
    if fmt == "bfloat16":
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return bits.astype(np.float32, copy=False)


def from_float32(x: np.ndarray, fmt: str) -> np.ndarray:
    """Round float32 to the storage form of ``fmt``, round-to-nearest-even.

    bfloat16 follows ``cvt.rn.bf16.f32``: NaN becomes the canonical 0x7FFF.
    """
    if fmt == "float32":
        return x.astype(np.float32, copy=False)
    if fmt == "float16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16)
    u = x.astype(np.float32, copy=False).view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.where(np.isnan(x), np.uint32(0x7FFF), rounded).astype(np.uint16)


# ---------------------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------------------
def num_blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


def _pad_to_blocks(x: np.ndarray, blocksize: int) -> np.ndarray:
    """``x`` as (blocks, blocksize), the short last block padded with zeros."""
    nb = num_blocks(x.size, blocksize)
    if x.size == nb * blocksize:
        return x.reshape(nb, blocksize)
    padded = np.zeros(nb * blocksize, dtype=x.dtype)
    padded[: x.size] = x
    return padded.reshape(nb, blocksize)


def block_absmax(x32: np.ndarray, blocksize: int) -> np.ndarray:
    """max |x| per block, float32. NaN is ignored (fmaxf semantics); an all-NaN block gives 0."""
    blocks = _pad_to_blocks(x32, blocksize)
    return np.fmax.reduce(np.abs(blocks), axis=1, initial=_F32(0.0)).astype(np.float32)


def scale_by_blocks(x32: np.ndarray, absmax: np.ndarray, blocksize: int) -> np.ndarray:
    """``x * (1 / absmax[block])`` in float32, zero-padded to whole blocks, flat.

    A zero absmax gives 1/0 = inf and 0 * inf = NaN, which every code maps to index 0.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        recip = _F32(1.0) / absmax
        return (_pad_to_blocks(x32, blocksize) * recip[:, None]).reshape(-1)


# ---------------------------------------------------------------------------------------
# 4-bit
# ---------------------------------------------------------------------------------------
def codes_nf4(scaled: np.ndarray) -> np.ndarray:
    """NF4 index = number of NF4 thresholds ``scaled`` exceeds (strict >); NaN -> 0."""
    codes = np.searchsorted(NF4_THRESHOLDS, scaled, side="left").astype(np.uint8)
    codes[np.isnan(scaled)] = 0
    return codes


def codes_fp4(scaled: np.ndarray) -> np.ndarray:
    """FP4 index: sign bit 8 for x < 0, magnitude from the thresholds on |x|; NaN -> 0."""
    count = np.searchsorted(FP4_THRESHOLDS, np.abs(scaled), side="left")
    count[np.isnan(scaled)] = 0
    sign = np.where(scaled < 0, np.uint8(8), np.uint8(0))
    return FP4_MAGNITUDE_INDEX[count] | sign


def pack_nibbles(codes: np.ndarray, n: int) -> np.ndarray:
    """Two codes a byte: element 2j in the high nibble, 2j+1 in the low one. uint8[(n+1)//2]."""
    codes = codes[: 2 * ((n + 1) // 2)]
    return ((codes[0::2] << np.uint8(4)) | codes[1::2]).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: uint8[n] codes."""
    codes = np.empty(2 * packed.size, dtype=np.uint8)
    codes[0::2] = packed >> np.uint8(4)
    codes[1::2] = packed & np.uint8(0x0F)
    return codes[:n]


def quantize_4bit(bits: np.ndarray, fmt: str, blocksize: int, quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise 4-bit quantization of a flat array.

    Returns ``(packed uint8[(n+1)//2], absmax float32[blocks])``. An odd count is padded
    with a 0.0 that is quantized with the last block's scale.
    """
    x32 = to_float32(bits, fmt)
    absmax = block_absmax(x32, blocksize)
    scaled = scale_by_blocks(x32, absmax, blocksize)
    codes = codes_nf4(scaled) if quant_type == "nf4" else codes_fp4(scaled)
    return pack_nibbles(codes, x32.size), absmax


def dequant_table_4bit(quant_type: str) -> np.ndarray:
    return NF4_CODE if quant_type == "nf4" else FP4_DEQUANT_TABLE


def dequantize_4bit(
    packed: np.ndarray, absmax: np.ndarray, n: int, fmt: str, blocksize: int, quant_type: str
) -> np.ndarray:
    """``table[code] * absmax[block]`` in float32, rounded to ``fmt``. Storage array[n]."""
    codes = unpack_nibbles(packed, n)
    values = dequant_table_4bit(quant_type)[codes]
    scales = np.repeat(absmax.astype(np.float32, copy=False), blocksize)[:n]
    with np.errstate(invalid="ignore", over="ignore"):
        return from_float32(values * scales, fmt)


# ---------------------------------------------------------------------------------------
# 8-bit
# ---------------------------------------------------------------------------------------
def codes_8bit(scaled: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Nearest entry of a sorted 256-value code, with bitsandbytes' exact tie rules.

    Its binary search over the code ends at the even index ``p = 2 * #{odd i: x > code[i]}``;
    then ``p + 1`` is taken when ``x > (code[p] + code[p+1]) * 0.5``, and ``p - 1`` (at
    least 0) when ``x < (code[p-1] + code[p]) * 0.5``, the midpoints in float32. NaN -> 0.
    """
    code = code.astype(np.float32, copy=False)
    p = 2 * np.searchsorted(code[1:254:2], scaled, side="left")
    p[np.isnan(scaled)] = 0
    val = code[p]
    upper = code[p + 1]
    lower_index = np.maximum(p - 1, 0)
    lower = code[lower_index]
    up_mid = (upper + val) * _F32(0.5)
    low_mid = (lower + val) * _F32(0.5)
    above = scaled > val
    q = np.where(above, np.where(scaled > up_mid, p + 1, p), np.where(scaled < low_mid, lower_index, p))
    return q.astype(np.uint8)


def quantize_8bit(x32: np.ndarray, code: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise 8-bit quantization of a flat float32 array: ``(uint8[n], absmax float32[blocks])``."""
    absmax = block_absmax(x32, blocksize)
    scaled = scale_by_blocks(x32, absmax, blocksize)[: x32.size]
    return codes_8bit(scaled, code), absmax


def dequantize_8bit(q: np.ndarray, absmax: np.ndarray, code: np.ndarray, blocksize: int, fmt: str) -> np.ndarray:
    """``code[q] * absmax[block]`` in float32, rounded to ``fmt``. Storage array[n]."""
    values = code.astype(np.float32, copy=False)[q]
    scales = np.repeat(absmax.astype(np.float32, copy=False), blocksize)[: q.size]
    with np.errstate(invalid="ignore", over="ignore"):
        return from_float32(values * scales, fmt)


# ---------------------------------------------------------------------------------------
# double quantization of absmax
# ---------------------------------------------------------------------------------------
def absmax_offset(absmax: np.ndarray) -> np.float32:
    """The nested offset: the mean of absmax, summed in float64, rounded once to float32."""
    if absmax.size == 0:
        return _F32(0.0)
    return _F32(np.mean(absmax, dtype=np.float64))


def nest_absmax(absmax: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """Compress float32 absmax: ``(uint8 codes, nested absmax float32, offset float32)``."""
    offset = absmax_offset(absmax)
    q, nested = quantize_8bit(absmax - offset, dynamic_map(), NESTED_BLOCKSIZE)
    return q, nested, offset


def unnest_absmax(q: np.ndarray, nested_absmax: np.ndarray, offset: np.float32, code: np.ndarray) -> np.ndarray:
    """``code[q] * nested_absmax[b // 256] + offset``, two float32 roundings (no FMA)."""
    values = code.astype(np.float32, copy=False)[q]
    scales = np.repeat(nested_absmax.astype(np.float32, copy=False), NESTED_BLOCKSIZE)[: q.size]
    return (values * scales + _F32(offset)).astype(np.float32)
