"""Blockwise quantization of NumPy and CuPy arrays: 4-bit (NF4, FP4) and 8-bit.

Names, arguments and defaults follow ``bitsandbytes.functional``. NumPy arrays take
the vectorised reference path (``_reference``), CuPy arrays the CUDA kernels on the
array's device and the current stream; both produce the same bytes.

Inputs are flattened in row-major order and cut into blocks of ``blocksize``; the short
last block has its own absmax. NaN and Inf: absmax ignores NaN (an all-NaN block has
absmax 0); a NaN, or any value in a block whose absmax is 0 or Inf that scales to NaN,
gets code index 0 (NF4: -1.0 * absmax, FP4 and 8-bit: 0 * absmax). Other blocks are
unaffected.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _reference as ref
from . import _xp
from .codebooks import dynamic_map, get_4bit_type
from .quant_state import QuantState, dtype_name

BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
BLOCKSIZES_8BIT = (64, 128, 256, 512, 1024, 2048, 4096)
QUANT_STORAGE_DTYPES = ("uint8", "int8", "float16", "bfloat16", "float32")

__all__ = [
    "quantize_4bit",
    "dequantize_4bit",
    "quantize_nf4",
    "quantize_fp4",
    "dequantize_nf4",
    "dequantize_fp4",
    "quantize_blockwise",
    "dequantize_blockwise",
    "BLOCKSIZES_4BIT",
    "BLOCKSIZES_8BIT",
]


# ---------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------
def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_array(a: Any, name: str) -> None:
    if not (isinstance(a, np.ndarray) or _xp.is_cupy_array(a)):
        raise TypeError(f"{name} must be a NumPy or CuPy array, got {type(a).__name__}")


def _check_buffer(buf: Any, name: str, like: Any, dtypes: tuple[str, ...], size: int) -> None:
    """An ``out=`` / ``absmax=`` buffer: right library/device, dtype, size, contiguous."""
    _check_array(buf, name)
    _xp.same_module(like, buf, "A", name)
    if buf.dtype.name not in dtypes:
        raise ValueError(f"{name} must have dtype {' or '.join(dtypes)}, got {buf.dtype}")
    if buf.size != size:
        raise ValueError(f"{name} must have {size} elements, got {buf.size} (shape {buf.shape})")
    if not buf.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")


def _flat(a: Any) -> Any:
    """A contiguous 1-D view (a copy only when ``a`` is not contiguous)."""
    xp = _xp.array_module(a)
    return xp.ascontiguousarray(a).reshape(-1)


def _storage_dtype_for(name: str, xp: Any) -> np.dtype:
    """The array dtype that holds ``name`` values in ``xp`` (bfloat16 needs ml_dtypes)."""
    if name != "bfloat16":
        return np.dtype(name)
    bf16 = _xp.bfloat16_dtype()
    if bf16 is None:
        raise TypeError(
            "a bfloat16 array needs the ml_dtypes package here; install it, or pass out= "
            "(any 2-byte dtype, e.g. uint16) to receive the bfloat16 bits"
        )
    return bf16


def _new_output(xp: Any, shape: tuple[int, ...], fmt: str) -> Any:
    return xp.empty(shape, dtype=_storage_dtype_for(fmt, xp))


def _storage_name(quant_storage: Any) -> str:
    name = dtype_name(quant_storage) if not isinstance(quant_storage, type) else np.dtype(quant_storage).name
    _check_choice("quant_storage", name, QUANT_STORAGE_DTYPES)
    return name


def _zero_dim_float32(xp: Any, value: Any) -> Any:
    return xp.asarray(value, dtype=xp.float32).reshape(())


# ---------------------------------------------------------------------------------------
# nested (double) quantization of absmax
# ---------------------------------------------------------------------------------------
def _nest(absmax: Any) -> tuple[Any, Any, QuantState]:
    """Compress float32 absmax: ``(uint8 codes, offset 0-d, state2)``."""
    xp = _xp.array_module(absmax)
    if xp is np:
        q, nested_absmax, offset = ref.nest_absmax(absmax)
        offset = _zero_dim_float32(np, offset)
        code = dynamic_map().copy()
    else:
        from . import _gpu

        offset = _gpu.absmax_offset(absmax)
        q = xp.empty(absmax.size, dtype=xp.uint8)
        nested_absmax = xp.empty(ref.num_blocks(absmax.size, ref.NESTED_BLOCKSIZE), dtype=xp.float32)
        code = _gpu.device_table("dynamic").copy()
        mode, table = _gpu.code8_lookup(code, is_default=True)
        _gpu.quantize_blockwise(absmax, "float32", ref.NESTED_BLOCKSIZE, mode, nested_absmax, q, table, offset)
    state2 = QuantState(absmax=nested_absmax, code=code, blocksize=ref.NESTED_BLOCKSIZE, dtype="float32")
    return q, offset, state2


def _check_nested(state: QuantState, blocks: int) -> None:
    s2 = state.state2
    if s2.blocksize != ref.NESTED_BLOCKSIZE:
        raise ValueError(f"nested blocksize must be {ref.NESTED_BLOCKSIZE}, got {s2.blocksize}")
    if state.absmax.dtype.name != "uint8":
        raise ValueError(f"a nested state's absmax must be uint8 codes, got {state.absmax.dtype}")
    want = ref.num_blocks(blocks, ref.NESTED_BLOCKSIZE)
    if s2.absmax.size != want:
        raise ValueError(f"nested_absmax must have {want} elements for {blocks} blocks, got {s2.absmax.size}")
    if s2.code is None or s2.code.size != 256:
        raise ValueError("a nested state needs a 256-value nested code")


def _float_absmax(state: QuantState, blocks: int) -> Any:
    """float32 absmax of a state (decoding the nested form; NumPy path)."""
    if state.nested:
        return ref.unnest_absmax(
            state.absmax, state.state2.absmax, np.float32(state.offset), state.state2.code.astype(np.float32)
        )
    return state.absmax


def _gpu_scales(state: QuantState, blocks: int):
    from . import _gpu

    if state.nested:
        return _gpu.Scales(
            qabsmax=_flat(state.absmax),
            code2=_flat(state.state2.code.astype("float32", copy=False)),
            nested_absmax=_flat(state.state2.absmax.astype("float32", copy=False)),
            offset=_flat(_xp.cupy().asarray(state.offset, dtype="float32")),
        )
    return _gpu.Scales(absmax=_flat(state.absmax.astype("float32", copy=False)))


def _check_absmax(state: QuantState, blocks: int) -> None:
    if state.absmax is None:
        raise ValueError("quant_state.absmax is None")
    if state.absmax.size != blocks:
        raise ValueError(
            f"quant_state.absmax has {state.absmax.size} blocks but shape {state.shape} at "
            f"blocksize {state.blocksize} needs {blocks}"
        )


# ---------------------------------------------------------------------------------------
# 4-bit
# ---------------------------------------------------------------------------------------
def quantize_4bit(
    A: Any,
    absmax: Any = None,
    out: Any = None,
    blocksize: int = 64,
    compress_statistics: bool = False,
    quant_type: str = "fp4",
    quant_storage: Any = np.uint8,
) -> tuple[Any, QuantState]:
    """Quantize ``A`` to packed 4-bit codes, blockwise.

    Args:
        A: float32 / float16 / bfloat16 array of any shape (NumPy or CuPy).
        absmax: optional float32[ceil(A.size / blocksize)] buffer that receives the
            per-block absmax (before any nesting).
        out: optional buffer for the packed codes, shape ``(bytes // itemsize, 1)`` of
            ``quant_storage``, where bytes = (A.size + 1) // 2 rounded up to the itemsize.
        blocksize: one of ``BLOCKSIZES_4BIT``.
        compress_statistics: also 8-bit quantize absmax (blocksize 256, offset = mean).
        quant_type: "nf4" or "fp4".
        quant_storage: dtype the packed bytes are viewed as (uint8, int8, float16,
            bfloat16, float32); only the view changes.

    Returns:
        ``(packed, QuantState)``; two codes a byte, element 2j in the high nibble.
    """
    _check_array(A, "A")
    fmt = _xp.float_format(A)
    storage = _storage_name(quant_storage)
    n = A.size
    itemsize = 2 if storage == "bfloat16" else np.dtype(storage).itemsize
    storage_elems = -(-((n + 1) // 2) // itemsize)
    if out is not None:
        _check_buffer(out, "out", A, (storage,), storage_elems)
    if absmax is not None:
        _check_buffer(absmax, "absmax", A, ("float32",), ref.num_blocks(n, blocksize))
    xp = _xp.array_module(A)
    with _xp.device_of(A):
        packed_u8, state = quantize_4bit_bits(
            _flat(_xp.storage_view(A)),
            fmt,
            tuple(A.shape),
            blocksize,
            compress_statistics,
            quant_type,
            packed_bytes=storage_elems * itemsize,
            absmax_out=None if absmax is None else absmax.reshape(-1),
        )
        packed = packed_u8.view(_storage_dtype_for(storage, xp) if storage == "bfloat16" else storage)
        packed = packed.reshape(storage_elems, 1)
        if out is not None:
            out[...] = packed.reshape(out.shape)
            packed = out
    return packed, state


def quantize_4bit_bits(
    bits: Any,
    fmt: str,
    shape: tuple[int, ...],
    blocksize: int = 64,
    compress_statistics: bool = False,
    quant_type: str = "fp4",
    packed_bytes: int | None = None,
    absmax_out: Any = None,
    packed_out: Any = None,
) -> tuple[Any, QuantState]:
    """:func:`quantize_4bit` on a flat storage array (bfloat16 as uint16 bits).

    For adapters that own their buffers: ``packed_out`` (uint8[packed_bytes]) and
    ``absmax_out`` (float32[blocks]) are written in place when given. ``packed_bytes``
    (default (n+1)//2) may exceed the code bytes; the extra bytes are zero.
    Call inside the array's device context.
    """
    _check_choice("blocksize", blocksize, BLOCKSIZES_4BIT)
    _check_choice("quant_type", quant_type, ("nf4", "fp4"))
    _check_choice("format", fmt, _xp.FLOAT_FORMATS)
    xp = _xp.array_module(bits)
    n = bits.size
    blocks = ref.num_blocks(n, blocksize)
    nbytes = (n + 1) // 2
    packed_bytes = nbytes if packed_bytes is None else packed_bytes
    if packed_out is None:
        alloc = xp.zeros if packed_bytes != nbytes else xp.empty
        packed_out = alloc(packed_bytes, dtype=xp.uint8)
    elif packed_bytes != nbytes:
        packed_out[nbytes:] = 0
    if xp is np:
        codes, block_absmax = ref.quantize_4bit(bits, fmt, blocksize, quant_type)
        packed_out[:nbytes] = codes
        if absmax_out is not None:
            absmax_out[...] = block_absmax
            block_absmax = absmax_out
    else:
        from . import _gpu

        block_absmax = absmax_out if absmax_out is not None else xp.empty(blocks, dtype=xp.float32)
        _gpu.quantize_blockwise(bits, fmt, blocksize, quant_type, block_absmax, packed_out[:nbytes])
    if compress_statistics:
        qabsmax, offset, state2 = _nest(block_absmax)
    else:
        qabsmax, offset, state2 = block_absmax, None, None
    state = QuantState(
        absmax=qabsmax,
        shape=tuple(shape),
        code=xp.asarray(get_4bit_type(quant_type)),
        blocksize=blocksize,
        quant_type=quant_type,
        dtype=fmt,
        offset=offset,
        state2=state2,
    )
    return packed_out, state


def dequantize_4bit(
    A: Any,
    quant_state: QuantState | None = None,
    absmax: Any = None,
    out: Any = None,
    blocksize: int = 64,
    quant_type: str = "fp4",
) -> Any:
    """Decode packed 4-bit codes: ``code[q] * absmax[block]`` in float32, cast to the state's dtype.

    Args:
        A: the packed array from :func:`quantize_4bit` (any storage dtype, contiguous).
        quant_state: its QuantState. Without one, give ``absmax`` (float32[blocks]) and
            ``out`` (which sets shape and dtype), plus ``blocksize`` and ``quant_type``.
        out: optional output of the state's shape and dtype (bfloat16: any 2-byte dtype).

    Returns:
        The dequantized array, shape ``quant_state.shape``.
    """
    _check_array(A, "A")
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("dequantize_4bit needs quant_state, or both absmax and out (out gives shape and dtype)")
        _check_choice("blocksize", blocksize, BLOCKSIZES_4BIT)
        _check_choice("quant_type", quant_type, ("nf4", "fp4"))
        quant_state = QuantState(
            absmax=absmax,
            shape=tuple(out.shape),
            blocksize=blocksize,
            quant_type=quant_type,
            dtype=_xp.float_format(out, "out"),
        )
    fmt, n, _ = check_state_4bit(quant_state)
    _xp.same_module(A, quant_state.absmax, "A", "quant_state.absmax")
    xp = _xp.array_module(A)
    if not A.flags.c_contiguous:
        raise ValueError("A (packed codes) must be C-contiguous")
    if out is not None:
        _check_output(out, A, n, fmt)
    with _xp.device_of(A):
        result = out if out is not None else _new_output(xp, quant_state.shape, fmt)
        dequantize_4bit_bits(A.reshape(-1).view(xp.uint8), quant_state, result.reshape(-1).view(_xp.storage_dtype(fmt)))
    return result


def _check_output(out: Any, like: Any, n: int, fmt: str) -> None:
    """An output buffer: same library/device as ``like``, n values of ``fmt``, contiguous.

    bfloat16 outputs may also be 16-bit integer arrays that receive the raw bits.
    """
    _check_array(out, "out")
    _xp.same_module(like, out, "A", "out")
    allowed = ("bfloat16", "uint16", "int16") if fmt == "bfloat16" else (fmt,)
    if out.dtype.name not in allowed:
        raise ValueError(f"out must have dtype {' or '.join(allowed)}, got {out.dtype}")
    if out.size != n:
        raise ValueError(f"out must hold {n} {fmt} values, got {out.size}")
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")


def check_state_4bit(qs: QuantState) -> tuple[str, int, int]:
    """Validate a 4-bit state; returns ``(format name, element count, block count)``."""
    if not isinstance(qs, QuantState):
        raise TypeError(f"quant_state must be a QuantState, got {type(qs).__name__}")
    if qs.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_state.quant_type must be 'nf4' or 'fp4', got {qs.quant_type!r}")
    _check_choice("quant_state.blocksize", qs.blocksize, BLOCKSIZES_4BIT)
    if qs.shape is None:
        raise ValueError("quant_state.shape is None; a 4-bit state needs the original shape")
    fmt = dtype_name(qs.dtype)
    _check_choice("quant_state.dtype", fmt, _xp.FLOAT_FORMATS)
    n = int(np.prod(qs.shape, dtype=np.int64))
    blocks = ref.num_blocks(n, qs.blocksize)
    _check_absmax(qs, blocks)
    if qs.nested:
        _check_nested(qs, blocks)
    return fmt, n, blocks


def dequantize_4bit_bits(packed: Any, quant_state: QuantState, out: Any, tiled: bool = False) -> Any:
    """:func:`dequantize_4bit` into a flat storage array ``out`` (bfloat16 as uint16 bits).

    ``packed``: flat uint8 codes; ``tiled``: the codes of the 2-D (N, K) weight are in the
    tile order of :mod:`cupyquant.tiled_4bit` (``out`` is row-major either way). For
    adapters that own their buffers; call inside the arrays' device context. Returns ``out``.
    """
    fmt, n, blocks = check_state_4bit(quant_state)
    if packed.size < (n + 1) // 2:
        raise ValueError(f"A holds {packed.size} bytes but quant_state.shape {quant_state.shape} needs {(n + 1) // 2}")
    if out.size != n:
        raise ValueError(f"out must hold {n} values, got {out.size}")
    tile_k = 0
    if tiled:
        from .tiled_4bit import check_tile_shape, untile_bytes  # tiled_4bit imports this module

        tile_k = check_tile_shape(quant_state.shape)[1]
    if _xp.array_module(packed) is np:
        if tiled:
            packed = untile_bytes(packed[: n // 2], n // tile_k, tile_k)
        absmax = _float_absmax(quant_state, blocks)
        out[...] = ref.dequantize_4bit(
            packed[: (n + 1) // 2], absmax, n, fmt, quant_state.blocksize, quant_state.quant_type
        )
    else:
        from . import _gpu

        scales = _gpu_scales(quant_state, blocks)
        _gpu.dequantize_4bit(packed, fmt, quant_state.blocksize, quant_state.quant_type, scales, out, tile_k)
    return out


def quantize_nf4(
    A: Any,
    absmax: Any = None,
    out: Any = None,
    blocksize: int = 64,
    compress_statistics: bool = False,
    quant_storage: Any = np.uint8,
) -> tuple[Any, QuantState]:
    """:func:`quantize_4bit` with ``quant_type="nf4"``."""
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "nf4", quant_storage)


def quantize_fp4(
    A: Any,
    absmax: Any = None,
    out: Any = None,
    blocksize: int = 64,
    compress_statistics: bool = False,
    quant_storage: Any = np.uint8,
) -> tuple[Any, QuantState]:
    """:func:`quantize_4bit` with ``quant_type="fp4"``."""
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "fp4", quant_storage)


def dequantize_nf4(
    A: Any, quant_state: QuantState | None = None, absmax: Any = None, out: Any = None, blocksize: int = 64
) -> Any:
    """:func:`dequantize_4bit` with ``quant_type="nf4"``."""
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "nf4")


def dequantize_fp4(
    A: Any, quant_state: QuantState | None = None, absmax: Any = None, out: Any = None, blocksize: int = 64
) -> Any:
    """:func:`dequantize_4bit` with ``quant_type="fp4"``."""
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "fp4")


# ---------------------------------------------------------------------------------------
# 8-bit
# ---------------------------------------------------------------------------------------
def _check_code(code: Any) -> Any:
    """A user code: float32[256], sorted ascending (a device sync for CuPy codes)."""
    if code.size != 256 or code.dtype.name != "float32":
        raise ValueError(f"code must be float32[256], got {code.dtype}[{code.size}]")
    xp = _xp.array_module(code)
    code = code.reshape(-1)
    if not bool(xp.all(code[1:] >= code[:-1])):
        raise ValueError("code must be sorted ascending (the search for the nearest value needs it)")
    return code


def _default_code(xp: Any) -> Any:
    if xp is np:
        return dynamic_map().copy()
    from . import _gpu

    return _gpu.device_table("dynamic").copy()


def quantize_blockwise(
    A: Any, code: Any = None, absmax: Any = None, out: Any = None, blocksize: int = 4096, nested: bool = False
) -> tuple[Any, QuantState]:
    """Quantize ``A`` to 8-bit codes, blockwise: nearest entry of ``code`` to ``x / absmax``.

    Args:
        A: float32 / float16 / bfloat16 array of any shape.
        code: sorted float32[256] codebook; default the signed dynamic map.
        absmax: optional float32[blocks] buffer that receives the per-block absmax.
        out: optional uint8 buffer of A's size.
        blocksize: one of ``BLOCKSIZES_8BIT``.
        nested: also 8-bit quantize absmax (blocksize 256, offset = mean).

    Returns:
        ``(uint8 array of A's shape, QuantState)``.
    """
    _check_array(A, "A")
    fmt = _xp.float_format(A)
    n = A.size
    if out is not None:
        _check_buffer(out, "out", A, ("uint8",), n)
    if absmax is not None:
        _check_buffer(absmax, "absmax", A, ("float32",), ref.num_blocks(n, blocksize))
    if code is not None:
        _check_array(code, "code")
        _xp.same_module(A, code, "A", "code")
    xp = _xp.array_module(A)
    with _xp.device_of(A):
        result = out if out is not None else xp.empty(A.shape, dtype=xp.uint8)
        _, state = quantize_blockwise_bits(
            _flat(_xp.storage_view(A)),
            fmt,
            tuple(A.shape),
            code,
            blocksize,
            nested,
            q_out=result.reshape(-1),
            absmax_out=None if absmax is None else absmax.reshape(-1),
        )
    return result, state


def quantize_blockwise_bits(
    bits: Any,
    fmt: str,
    shape: tuple[int, ...],
    code: Any = None,
    blocksize: int = 4096,
    nested: bool = False,
    q_out: Any = None,
    absmax_out: Any = None,
) -> tuple[Any, QuantState]:
    """:func:`quantize_blockwise` on a flat storage array (bfloat16 as uint16 bits).

    ``q_out`` (uint8[n]) and ``absmax_out`` (float32[blocks]) are written in place when
    given. Call inside the array's device context. Returns ``(q, QuantState)``.
    """
    _check_choice("blocksize", blocksize, BLOCKSIZES_8BIT)
    _check_choice("format", fmt, _xp.FLOAT_FORMATS)
    xp = _xp.array_module(bits)
    is_default = code is None
    code = _default_code(xp) if is_default else _check_code(code)
    n = bits.size
    q_out = q_out if q_out is not None else xp.empty(n, dtype=xp.uint8)
    if xp is np:
        q, block_absmax = ref.quantize_8bit(ref.to_float32(bits, fmt), code, blocksize)
        q_out[...] = q
        if absmax_out is not None:
            absmax_out[...] = block_absmax
            block_absmax = absmax_out
    else:
        from . import _gpu

        block_absmax = absmax_out if absmax_out is not None else xp.empty(ref.num_blocks(n, blocksize), xp.float32)
        mode, table = _gpu.code8_lookup(code, is_default)
        _gpu.quantize_blockwise(bits, fmt, blocksize, mode, block_absmax, q_out, table)
    if nested:
        qabsmax, offset, state2 = _nest(block_absmax)
    else:
        qabsmax, offset, state2 = block_absmax, None, None
    state = QuantState(
        absmax=qabsmax, shape=tuple(shape), code=code, blocksize=blocksize, dtype=fmt, offset=offset, state2=state2
    )
    return q_out, state


def dequantize_blockwise(
    A: Any,
    quant_state: QuantState | None = None,
    absmax: Any = None,
    code: Any = None,
    out: Any = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> Any:
    """Decode 8-bit codes: ``code[q] * absmax[block]`` in float32, cast to the state's dtype.

    Args:
        A: uint8 codes of any shape (the output keeps it).
        quant_state: the QuantState from :func:`quantize_blockwise`. Without one, give
            ``absmax`` (float32[blocks]); ``code`` defaults to the dynamic map and the
            output is float32 unless ``out`` says otherwise.
        out: optional output of A's size and the state's dtype.
    """
    _check_array(A, "A")
    if A.dtype.name != "uint8":
        raise ValueError(f"A must be uint8 codes, got {A.dtype}")
    xp = _xp.array_module(A)
    if quant_state is None:
        if absmax is None:
            raise ValueError("dequantize_blockwise needs quant_state or absmax")
        if nested:
            raise ValueError("nested=True needs the quant_state that holds the nested absmax")
        _check_choice("blocksize", blocksize, BLOCKSIZES_8BIT)
        if code is not None:
            _check_array(code, "code")
            _xp.same_module(A, code, "A", "code")
        with _xp.device_of(A):
            state_code = _default_code(xp) if code is None else _check_code(code)
        fmt = _xp.float_format(out, "out") if out is not None else "float32"
        quant_state = QuantState(absmax=absmax, code=state_code, blocksize=blocksize, dtype=fmt)
    fmt = dtype_name(quant_state.dtype) if quant_state.dtype is not None else "float32"
    _check_choice("quant_state.dtype", fmt, _xp.FLOAT_FORMATS)
    _xp.same_module(A, quant_state.absmax, "A", "quant_state.absmax")
    if out is not None:
        _check_output(out, A, A.size, fmt)
    with _xp.device_of(A):
        result = out if out is not None else _new_output(xp, A.shape, fmt)
        dequantize_blockwise_bits(_flat(A), quant_state, result.reshape(-1).view(_xp.storage_dtype(fmt)))
    return result


def dequantize_blockwise_bits(q: Any, quant_state: QuantState, out: Any) -> Any:
    """:func:`dequantize_blockwise` of flat uint8 codes into a flat storage array ``out``
    (bfloat16 as uint16 bits). Call inside the arrays' device context. Returns ``out``."""
    qs = quant_state
    if not isinstance(qs, QuantState):
        raise TypeError(f"quant_state must be a QuantState, got {type(qs).__name__}")
    _check_choice("quant_state.blocksize", qs.blocksize, BLOCKSIZES_8BIT)
    fmt = dtype_name(qs.dtype) if qs.dtype is not None else "float32"
    n = q.size
    if out.size != n:
        raise ValueError(f"out must hold {n} values, got {out.size}")
    blocks = ref.num_blocks(n, qs.blocksize)
    _check_absmax(qs, blocks)
    if qs.nested:
        _check_nested(qs, blocks)
    if qs.code is None or qs.code.size != 256:
        raise ValueError("quant_state.code must be a float32[256] codebook")
    xp = _xp.array_module(q)
    code32 = qs.code.reshape(-1).astype(xp.float32, copy=False)
    if xp is np:
        out[...] = ref.dequantize_8bit(q, _float_absmax(qs, blocks), code32, qs.blocksize, fmt)
    else:
        from . import _gpu

        _gpu.dequantize_8bit(q, code32, fmt, qs.blocksize, _gpu_scales(qs, blocks), out)
    return out
