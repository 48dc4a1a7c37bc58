"""Quantization codebooks: the exact float32 values bitsandbytes 0.50.2 uses.

Every map is a NumPy float32 array built from its definition, so the values are
reproducible and identical on every platform. Callers move them to the device
they need (``cupyquant._xp.asarray_like``).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "NF4_CODE",
    "FP4_CODE",
    "NF4_THRESHOLDS",
    "FP4_THRESHOLDS",
    "FP4_MAGNITUDE_INDEX",
    "FP4_DEQUANT_TABLE",
    "create_normal_map",
    "create_dynamic_map",
    "create_fp8_map",
    "create_linear_map",
    "get_4bit_type",
    "dynamic_map",
]

# NF4: the 16 quantiles of N(0, 1) normalised to [-1, 1] (index 0..15).
NF4_CODE = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)  # fmt: skip

# The NF4 code of x is the number of these float32 midpoints that x exceeds (strict >).
NF4_THRESHOLDS = np.array(
    [
        -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
        -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
        0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
        0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
    ],
    dtype=np.float32,
)  # fmt: skip

# FP4 (1 sign, 2 exponent, 1 mantissa bits, bias 3, divided by its max 12). Bit 3 is the sign.
_FP4_UNSCALED = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]
FP4_CODE = (np.array(_FP4_UNSCALED + [-v for v in _FP4_UNSCALED], dtype=np.float32) / np.float32(12.0)).astype(
    np.float32
)
FP4_CODE[8] = 0.0  # bitsandbytes stores +0 at index 8 in quant_map

# FP4 code of x: sign bit from x < 0, then the number c of these thresholds |x| exceeds
# picks the magnitude index FP4_MAGNITUDE_INDEX[c] (the FP4 code is not monotonic).
FP4_THRESHOLDS = np.array(
    [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333],
    dtype=np.float32,
)
FP4_MAGNITUDE_INDEX = np.array([0, 1, 6, 7, 4, 5, 2, 3], dtype=np.uint8)

# Dequantization table for FP4: like FP4_CODE, but index 8 is -0.0, because the kernels
# compute (|code| * absmax) * sign, which gives -0.0 for the "-0" code.
FP4_DEQUANT_TABLE = FP4_CODE.copy()
FP4_DEQUANT_TABLE[8] = -0.0


def get_4bit_type(typename: str) -> np.ndarray:
    """The 16-value float32 codebook of a 4-bit type, ``"nf4"`` or ``"fp4"`` (a copy)."""
    if typename == "nf4":
        return NF4_CODE.copy()
    if typename == "fp4":
        return FP4_CODE.copy()
    raise ValueError(f"4-bit type must be 'nf4' or 'fp4', got {typename!r}")


def _linspace_f32(start: float, stop: float, num: int) -> np.ndarray:
    """float32 linspace with torch.linspace's rounding, so the maps match bitsandbytes.

    The first half is ``start + step * i`` and the second ``stop - step * (num - 1 - i)``,
    each rounded once (a fused multiply-add); float64 holds the product exactly.
    """
    start32, stop32 = np.float32(start), np.float32(stop)
    if num == 1:
        return np.array([start32], dtype=np.float32)
    step = np.float64((stop32 - start32) / np.float32(num - 1))
    idx = np.arange(num)
    front = np.float64(start32) + step * idx
    back = np.float64(stop32) - step * (num - 1 - idx)
    return np.where(idx < num // 2, front, back).astype(np.float32)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """The dynamic tree quantization map (Dettmers 2015), sorted, float32[2**total_bits].

    For each exponent i the midpoints of ``linspace(0.1, 1, n_i)`` are scaled by
    ``10**(i - max_exponent_bits + 1)``; with ``signed`` both signs are present. 0 and 1
    complete the map; unused entries are 0.
    """
    if not 1 <= max_exponent_bits <= total_bits - 1:
        raise ValueError(f"max_exponent_bits must be in [1, {total_bits - 1}], got {max_exponent_bits}")
    data: list[np.ndarray] = []
    # One bit is the sign (signed) or doubles the fraction points (unsigned).
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        exp = i + non_sign_bits - max_exponent_bits
        fraction_items = 2**exp + 1 if signed else 2 ** (exp + 1) + 1
        boundaries = _linspace_f32(0.1, 1.0, fraction_items)
        means = (boundaries[:-1] + boundaries[1:]) / np.float32(2.0)
        scale = np.float32(10.0 ** (-(max_exponent_bits - 1) + i))
        data.append(scale * means)
        if signed:
            data.append(-scale * means)
    if additional_items > 0:
        boundaries = _linspace_f32(0.1, 1.0, additional_items + 1)
        means = (boundaries[:-1] + boundaries[1:]) / np.float32(2.0)
        scale = np.float32(10.0 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1))
        data.append(scale * means)
        if signed:
            data.append(-scale * means)
    values = np.concatenate(data + [np.array([0.0, 1.0], dtype=np.float32)]).astype(np.float32)
    size = 2**total_bits
    if values.size > size:
        raise ValueError(f"the map needs {values.size} entries but total_bits={total_bits} gives {size}")
    values = np.concatenate([values, np.zeros(size - values.size, dtype=np.float32)])
    return np.sort(values).astype(np.float32)


def create_normal_map(offset: float = 0.9677083, use_extra_value: bool = True) -> np.ndarray:
    """The NormalFloat map: quantiles of N(0, 1), normalised to [-1, 1], float32[256].

    With the default arguments the 16 non-zero-padded entries are the NF4 code.
    """
    from statistics import NormalDist

    ppf = NormalDist().inv_cdf
    if use_extra_value:
        pos = [ppf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
        neg = [-ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    else:
        pos = [ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
        neg = [-ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    values = np.array(pos + [0.0] * (256 - len(pos) - len(neg)) + neg, dtype=np.float64)
    values = np.sort(values)
    values /= np.abs(values).max()
    return values.astype(np.float32)


def create_fp8_map(
    signed: bool = True, exponent_bits: int = 5, precision_bits: int = 2, total_bits: int = 8
) -> np.ndarray:
    """All values of a small float format (IEEE-like, subnormals, no inf/nan), normalised
    to [-1, 1] and sorted, float32[2**total_bits] (zero-padded)."""
    has_sign = 1 if signed else 0
    if exponent_bits + precision_bits + has_sign != total_bits:
        raise ValueError(
            f"exponent_bits + precision_bits + sign must equal total_bits={total_bits}, "
            f"got {exponent_bits} + {precision_bits} + {has_sign}"
        )
    bias = 2 ** (exponent_bits - 1)
    values = []
    for evalue in range(2**exponent_bits):
        for mvalue in range(2**precision_bits):
            mantissa = mvalue / 2**precision_bits
            if evalue == 0:  # subnormal
                value = mantissa * 2.0 ** (-bias + 1)
            else:
                value = (1.0 + mantissa) * 2.0 ** (evalue - bias)
            values.append(value)
            if signed:
                values.append(-value)
    out = np.array(sorted(set(values)), dtype=np.float64)
    out = np.concatenate([out, np.zeros(2**total_bits - out.size)])
    out /= np.abs(out).max()
    return np.sort(out).astype(np.float32)


def create_linear_map(signed: bool = True, total_bits: int = 8, add_zero: bool = True) -> np.ndarray:
    """Evenly spaced values in [-1, 1] (or [0, 1] unsigned), float32[256], zero-padded."""
    sign = -1.0 if signed else 0.0
    total_values = 2**total_bits
    if add_zero or total_bits < 8:
        # an odd count keeps 0 exactly representable
        total_values = 2**total_bits if not signed else 2**total_bits - 1
    values = np.linspace(sign, 1.0, total_values, dtype=np.float64).astype(np.float32)
    gap = 256 - values.size
    if gap == 0:
        return values
    half = values.size // 2
    return np.concatenate([values[:half], np.zeros(gap, dtype=np.float32), values[half:]]).astype(np.float32)


_DYNAMIC_MAP = create_dynamic_map(signed=True)
_DYNAMIC_MAP.setflags(write=False)


def dynamic_map() -> np.ndarray:
    """The signed dynamic 8-bit map (read-only), bitsandbytes' default 8-bit code."""
    return _DYNAMIC_MAP
