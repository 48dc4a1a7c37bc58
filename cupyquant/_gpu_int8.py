"""CuPy launchers for the LLM.int8 kernels (``rawkernels/int8.cu``).

Callers validate shapes and dtypes and allocate outputs; these functions pick the
template instantiation, check alignment (copying or padding where a kernel needs it)
and launch on the current CuPy stream inside the current device. Every array is a flat,
C-contiguous CuPy array; float arrays hold their format's storage (bfloat16 as uint16).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from . import _cublas
from ._xp import FLOAT_FORMATS, MAX_GRID_Y, aligned, cupy, device_attribute
from .rawkernels import get_function, register_expressions

_SOURCE = "int8.cu"
_FMT_STRUCT = {"float32": "Float32", "float16": "Float16", "bfloat16": "BFloat16"}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_ROWS_PER_SLAB = 32  # kRowsPerSlab in int8.cu
_DEQUANT_ROWS = 8  # kDequantRows in int8.cu: rows a thread of int8_mm_dequant walks a slab (and
# the padding of outlier_weights' aout rows)
_OUTLIER_CACHE = 32  # kOutlierCache in int8.cu: outlier columns int8_outlier_weights / _gather precompute
# int8_row_quant_wide's FLAGS (int8.cu): none, u8[K] flags (zeroed first), or each row's own
# outlier bitmap u32[M * _rowbits_stride(K)] (every word written, so nothing to zero)
_NO_FLAGS, _BYTE_FLAGS, _ROW_BITS = 0, 1, 2
# Columns a thread of int8_mm_dequant_outliers takes (the cuBLAS path with outlier columns;
# H100: 4 the fastest of 1, 2, 4 at M = 512 and 4096 on both benchmark shapes).
_DEQUANT_COLUMNS = 4
_DEQUANT_COLUMN_CHOICES = (1, 2, 4)
# The cuBLAS path with outliers at few rows: the row quantization writes each row's bitmap,
# cuBLAS multiplies the codes with the outlier columns still in, and int8_outlier_gather
# lists the columns and gathers their operands on a forked branch beside cuBLAS (every CTA
# reads all rows' bitmaps); the dequantization takes their int8 products back out. Used up
# to _GATHER_MAX_M rows while the gather's bitmap reads stay within _GATHER_MAX_READS, with
# CTAs of 256 threads up to _GATHER_WIDE_M rows and 1024 above (fewer SMs taken from
# cuBLAS). H100 / H200 graph replays, threshold 6 (benchmarks/NOTES_int8.md, round 8).
_GATHER_MAX_M = 256
_GATHER_MAX_READS = 4 << 20
_GATHER_WIDE_M = 64
_GATHER_MAX_SMEM = 32 * 1024  # its OR of the bitmaps (dynamic), under 48 KB with its static arrays
# Columns a thread of the dequantization that takes the products back out (4 measured
# slower: its registers).
_SUBTRACT_COLUMN_CHOICES = (1, 2)


def _gather_threads(M: int) -> int:
    """Threads a CTA of int8_outlier_gather for M rows."""
    return 256 if M <= _GATHER_WIDE_M else 1024


def _gather_listing(M: int, N: int, K: int) -> bool:
    """Whether the cuBLAS path with outliers lists the columns on a forked branch
    (int8_outlier_gather) at (M, N, K)."""
    if M > _GATHER_MAX_M or 4 * _rowbits_stride(K) > _GATHER_MAX_SMEM:
        return False
    return _blocks(N, _gather_threads(M)) * M * 4 * _rowbits_stride(K) <= _GATHER_MAX_READS


def _gather_columns(M: int, N: int) -> int:
    """Columns a thread of the dequantization after int8_outlier_gather: 2 where that still
    gives every SM a CTA, else 1."""
    return 2 if _blocks(N, 512) * _dequant_slabs(M) >= _limits()[0] else 1


def _rowbits_stride(K: int) -> int:
    """Words a row of int8_row_quant_wide's bitmaps takes (rowbits_stride in int8.cu):
    ceil(K / 32) rounded up to 4, so a row is whole 16-byte loads."""
    return -(-K // 128) * 4


# The small-M path (int8_linear_gemv) handles up to this many activation rows; under the
# "auto" backend up to GEMV_AUTO_MAX_M, the medium-M kernel above. H100 graph replays
# (benchmarks/NOTES_int8.md, round 8), 4096 x 4096 at M = 6 / 8: 14.1 / 14.2 us (threshold
# 6: 16.8 / 17.0) against 15.5 / 16.9 (20.1 / 21.8) for the gemv; at M = 3 / 4 the gemv
# 11.2 / 11.9 (13.0 / 13.9) against 14.0 / 14.1 (16.4 / 16.4).
GEMV_MAX_M = 8
GEMV_AUTO_MAX_M = 4
_GEMV_TILES = (1, 2, 4, 8)
# CTAs an SM the gemv's grid is capped at (weight rows grid-strided over its warps), by MT.
# Every CTA quantizes A itself; from MT = 4 that prologue issues as many instructions as
# the weight stream, so fewer CTAs with more rows a warp amortize it. H100, 4096 x 4096 at
# M = 4: 11.9 / 13.9 us (threshold 0 / 6) capped at 2 CTAs an SM against 12.0 / 15.5 capped
# at 8 (4 resident, the register limit); at M = 1, 8.6 / 9.7 capped at 8 against 8.9 / 10.4
# at 2.
_GEMV_CTAS_PER_SM = {1: 8, 2: 8, 4: 2, 8: 2}
# The medium-M path (int8_linear_mmv: row quantization, then the weights streamed once
# through tensor cores with the activations as the narrow operand) handles M up to this
# under the "auto" backend where cuBLAS does not take them (see CUBLAS_MIN_M); MT is the
# smallest of _MMV_TILES that holds M. H100, 4096 x 4096 at M = 16 / 64: 14.5 / 18.6 us
# against 41.1 / 41.9 for the fused GEMM (benchmarks/NOTES_int8.md).
MMV_MAX_M = 64
_MMV_TILES = (16, 32, 64)
_MMV_ROWS = 32  # kMmvRows in int8.cu: weight rows per CTA
_GEMM_SMEM = 4 * (128 + 128) * 64  # kStages * kStageBytes
_DEFAULT_SMEM = 48 * 1024  # dynamic shared memory a kernel may use without opting in

GEMM_BACKENDS = ("auto", "mma", "cublas")
_backend = {"gemm": "auto"}
# "auto" takes cuBLAS (int32 product, then the dequantization kernel) from this many rows,
# also while capturing: the first M it serves (_cublas_usable). H100, graph replays
# (benchmarks/NOTES_int8.md, round 7): at M = 32 / 64 cuBLAS took 14.4 / 14.6 us against
# 16.0 / 18.5 for int8_linear_mmv at 4096 x 4096 and 102.9 / 103.9 against 119.2 / 135.6 at
# 28672 x 8192 (threshold 6: 22.6 / 22.9 against 21.5 / 27.1, and 114.5 / 116.9 against
# 126.9 / 167.6); at M = 512 39.6 against 49.2 for the fused GEMM at 4096 x 4096.
CUBLAS_MIN_M = 17


def set_gemm_backend(name: str) -> None:
    """Choose the int8 GEMM past the gemv's rows (GEMV_AUTO_MAX_M under "auto", GEMV_MAX_M
    otherwise): "auto", "mma" (this package's tensor-core kernel, dequantization fused) or
    "cublas" (cuBLAS int32 GEMM, then a dequantization kernel)."""
    if name not in GEMM_BACKENDS:
        raise ValueError(f"gemm backend must be one of {GEMM_BACKENDS}, got {name!r}")
    _backend["gemm"] = name


def gemm_backend() -> str:
    """The int8 GEMM backend setting ("auto", "mma" or "cublas")."""
    return _backend["gemm"]


def _capturing() -> bool:
    """True while the current stream is being captured into a CUDA graph."""
    cp = cupy()
    return cp.cuda.runtime.streamIsCapturing(cp.cuda.get_current_stream().ptr) != 0


def _use_cublas(M: int, N: int, K: int) -> bool:
    mode = _backend["gemm"]
    if mode == "mma" or not _cublas_usable(M, N, K):
        return False
    # Without the ctypes route (no libcublas found in the process) only CuPy's binding is
    # left, which refuses stream capture: "auto" then keeps the capturable fused kernel.
    return mode == "cublas" or (M >= CUBLAS_MIN_M and (_cublas.capturable() or not _capturing()))


def _limits() -> tuple[int, int]:
    """(multiprocessor count, opt-in dynamic shared memory per block) of the current device."""
    return device_attribute("MultiProcessorCount"), device_attribute("MaxSharedMemoryPerBlockOptin", _DEFAULT_SMEM)


def _kernel(expr: str, smem: int = 0) -> Any:
    """The compiled kernel, opted in to ``smem`` bytes of dynamic shared memory if above 48 KB."""
    kernel = get_function(_SOURCE, expr)
    if smem > _DEFAULT_SMEM and kernel.max_dynamic_shared_size_bytes < smem:
        kernel.max_dynamic_shared_size_bytes = smem
    return kernel


def _slabs(rows: int) -> int:
    return max(1, min(MAX_GRID_Y, -(-rows // _ROWS_PER_SLAB)))


def _dequant_slabs(rows: int) -> int:
    """Grid rows of the dequantization kernels: a slab of _DEQUANT_ROWS rows each (slabs
    past the grid limit are walked grid-strided)."""
    return max(1, min(MAX_GRID_Y, -(-rows // _DEQUANT_ROWS)))


def _blocks(n: int, per_block: int) -> int:
    return max(1, -(-n // per_block))


def _bool(v: bool) -> str:
    return "true" if v else "false"


def _bias_variants(fmt: str) -> list[tuple[str, bool]]:
    """(BiasFmt, HAS_BIAS) pairs instantiated for output format ``fmt``: no bias, a bias in
    the output's format, or a float32 bias (any other format is widened to float32 first)."""
    s = _FMT_STRUCT[fmt]
    return list(dict.fromkeys([(s, False), (s, True), ("Float32", True)]))


def _expressions() -> list[str]:
    """Every instantiation the launchers below may ask for (the compile test builds them all)."""
    exprs = ["int8_compact_flags", "int8_vectorwise_dequant", "int8_gemm<Float32, 0, Float32, false, false>"]
    for fmt in FLOAT_FORMATS:
        s = _FMT_STRUCT[fmt]
        exprs += [f"int8_outlier_flags<{s}, {_bool(v)}>" for v in (False, True)]
        exprs += [f"int8_row_quant<{s}, {_bool(sp)}, {_bool(v)}>" for sp in (False, True) for v in (False, True)]
        exprs += [
            f"int8_row_quant_wide<{s}, {f}, {_bool(v)}>"
            for f in (_NO_FLAGS, _BYTE_FLAGS, _ROW_BITS)
            for v in (False, True)
        ]
        exprs += [f"int8_col_absmax<{s}, {_bool(sp)}>" for sp in (False, True)]
        exprs += [f"int8_col_quant<{s}, {_bool(sp)}>" for sp in (False, True)]
        exprs += [f"int8_outlier_weights<{s}>"] + [f"int8_outlier_gather<{s}, {t}>" for t in (256, 1024)]
        for bs, hb in _bias_variants(fmt):
            exprs.append(f"int8_mm_dequant<{s}, {bs}, {_bool(hb)}>")
            for sp in (False, True):
                exprs.append(f"int8_gemm<{s}, 1, {bs}, {_bool(hb)}, {_bool(sp)}>")
                exprs += [f"int8_linear_gemv<{s}, {bs}, {_bool(hb)}, {_bool(sp)}, {mt}>" for mt in _GEMV_TILES]
                exprs += [f"int8_linear_mmv<{s}, {bs}, {_bool(hb)}, {_bool(sp)}, {mt}>" for mt in _MMV_TILES]
            exprs += [f"int8_mm_dequant_outliers<{s}, {bs}, {_bool(hb)}, {c}, false>" for c in _DEQUANT_COLUMN_CHOICES]
            exprs += [f"int8_mm_dequant_outliers<{s}, {bs}, {_bool(hb)}, {c}, true>" for c in _SUBTRACT_COLUMN_CHOICES]
    return exprs


register_expressions(_SOURCE, _expressions)


def _widen(bits: Any, fmt: str) -> Any:
    """float32 copy of a storage array of ``fmt`` (exact)."""
    cp = cupy()
    if fmt == "bfloat16":
        return (bits.astype(cp.uint32) << 16).view(cp.float32)
    return bits.astype(cp.float32)


def _bias_args(fmt: str, bias: Any, bias_fmt: str | None) -> tuple[Any, str, bool]:
    """(bias array, BiasFmt struct, HAS_BIAS) for a kernel writing ``fmt``."""
    if bias is None:
        return None, _FMT_STRUCT[fmt], False
    if bias_fmt == fmt:
        return bias, _FMT_STRUCT[fmt], True
    return (bias if bias_fmt == "float32" else _widen(bias, bias_fmt)), "Float32", True


# ---------------------------------------------------------------------------------------
# quantization
# ---------------------------------------------------------------------------------------
def outlier_flags(bits: Any, fmt: str, rows: int, K: int, threshold: float) -> Any:
    """uint8[K]: 1 where a column of A (rows x K) holds a value with |a| >= threshold."""
    cp = cupy()
    flags = cp.zeros(K, dtype=cp.uint8)
    if rows == 0 or K == 0:
        return flags
    vec = K % 8 == 0 and bits.data.ptr % 16 == 0
    kernel = _kernel(f"int8_outlier_flags<{_FMT_STRUCT[fmt]}, {_bool(vec)}>")
    kernel((_blocks(K, 2048), _slabs(rows)), (256,), (bits, np.float32(threshold), flags, np.int64(rows), np.int32(K)))
    return flags


def row_quant(bits: Any, fmt: str, rows: int, K: int, threshold: float, ca: Any, sca: Any) -> Any:
    """Row-wise codes into ``ca`` (int8[rows*K]) and absmax into ``sca`` (float32[rows]).

    With ``threshold > 0`` returns the outlier column flags (uint8[K]) and zeroes those
    columns in ``ca``; otherwise returns None.
    """
    flags = outlier_flags(bits, fmt, rows, K, threshold) if threshold > 0 else None
    if rows == 0:
        return flags
    vec = K % 8 == 0 and bits.data.ptr % 16 == 0 and ca.data.ptr % 8 == 0
    sparse = flags is not None
    kernel = _kernel(f"int8_row_quant<{_FMT_STRUCT[fmt]}, {_bool(sparse)}, {_bool(vec)}>")
    kernel(
        (_blocks(rows, 8),), (256,),
        (bits, flags if sparse else ca, np.float32(threshold), ca, sca, np.int64(rows), np.int32(K)),
    )  # fmt: skip
    return flags


def col_quant(bits: Any, fmt: str, rows: int, K: int, threshold: float, flags: Any, cat: Any, scat: Any) -> None:
    """Column-wise codes into ``cat`` (int8[rows*K], A's layout) and absmax into ``scat`` (float32[K])."""
    cp = cupy()
    if K == 0:
        return
    if rows == 0:
        scat[...] = 0
        return
    sparse = threshold > 0
    colmax = cp.zeros(K, dtype=cp.uint32)
    grid = (_blocks(K, 256), _slabs(rows))
    absmax = _kernel(f"int8_col_absmax<{_FMT_STRUCT[fmt]}, {_bool(sparse)}>")
    absmax(grid, (256,), (bits, np.float32(threshold), colmax, np.int64(rows), np.int32(K)))
    quant = _kernel(f"int8_col_quant<{_FMT_STRUCT[fmt]}, {_bool(sparse)}>")
    quant(grid, (256,), (bits, flags if sparse else colmax, colmax, cat, scat, np.int64(rows), np.int32(K)))


def compact_flags(flags: Any) -> tuple[Any, Any]:
    """Flagged columns on the device, no host round trip: ``(idx int32[K], count int32[1])``;
    the first ``count`` entries of ``idx`` are the flagged columns in ascending order."""
    cp = cupy()
    K = flags.size
    idx = cp.empty(max(K, 1), dtype=cp.int32)
    if not K:
        return idx, cp.zeros(1, dtype=cp.int32)
    count = cp.empty(1, dtype=cp.int32)  # the kernel always writes it: no memset
    _kernel("int8_compact_flags")((1,), (1024,), (flags, np.int32(K), idx, count))
    return idx, count


def vectorwise_dequant(ca: Any, sca: Any, rows: int, K: int, out: Any) -> None:
    """``out`` (float32[rows*K]) = (CA * SCA) * (1/127)."""
    if rows == 0 or K == 0:
        return
    _kernel("int8_vectorwise_dequant")(
        (_blocks(K, 256), _slabs(rows)), (256,), (ca, sca, out, np.int64(rows), np.int32(K))
    )


# ---------------------------------------------------------------------------------------
# products
# ---------------------------------------------------------------------------------------
def _pad_k(a: Any, rows: int, K: int, Kp: int) -> Any:
    """A (rows x K) matrix copied into a zero-padded (rows x Kp) one, flat."""
    cp = cupy()
    padded = cp.zeros((rows, Kp), dtype=a.dtype)
    padded[:, :K] = a.reshape(rows, K)
    return padded.reshape(-1)


def _gemm_operands(ca: Any, cb: Any, M: int, N: int, K: int) -> tuple[Any, Any, int]:
    """CA and CB as the tensor-core kernel needs them: K % 16 == 0 (zero-padded, which
    leaves the product unchanged) and 16-byte aligned."""
    Kp = -(-K // 16) * 16
    if Kp != K:
        return _pad_k(ca, M, K, Kp), _pad_k(cb, N, K, Kp), Kp
    return aligned(ca, 16), aligned(cb, 16), K


def _cublas_usable(M: int, N: int, K: int) -> bool:
    # cuBLAS' int8 tensor-core GEMMs want 4-byte multiples for the leading dimensions and
    # pick different kernels for tiny M; stay inside the shapes torch._int_mm accepts.
    return M > 16 and K % 16 == 0 and N % 8 == 0


_I32_ONE = np.ones(1, dtype=np.int32)  # host alpha / beta for cuBLAS (alive for the process)
_I32_ZERO = np.zeros(1, dtype=np.int32)


def _cublas_int32(ca: Any, cb: Any, M: int, N: int, K: int, out: Any) -> None:
    """``out[M, N] = CA @ CB^T`` with cublasGemmEx (int8 in, int32 out), capturable.

    cuBLAS is column-major: the row-major (M, N) result is the column-major (N, M) matrix
    CB @ CA^T, i.e. op(A) = CB^T-as-stored ("T") and op(B) = CA as stored ("N").
    """
    _cublas.gemm_ex(
        _cublas.CUBLAS_OP_T, _cublas.CUBLAS_OP_N, N, M, K, _I32_ONE.ctypes.data, cb.data.ptr, _cublas.CUDA_R_8I, K,
        ca.data.ptr, _cublas.CUDA_R_8I, K, _I32_ZERO.ctypes.data, out.data.ptr, _cublas.CUDA_R_32I, N,
        _cublas.CUBLAS_COMPUTE_32I,
    )  # fmt: skip


def gemm_int32(ca: Any, cb: Any, M: int, N: int, K: int, out: Any) -> None:
    """``out`` (int32[M*N]) = CA (int8[M*K]) @ CB (int8[N*K])^T, exactly."""
    if M == 0 or N == 0:
        return
    if _use_cublas(M, N, K):
        _cublas_int32(aligned(ca, 16), aligned(cb, 16), M, N, K, out)
        return
    ca, cb, Kp = _gemm_operands(ca, cb, M, N, K)
    kernel = _kernel("int8_gemm<Float32, 0, Float32, false, false>", _GEMM_SMEM)
    f32 = cupy().empty(1, dtype=np.float32)  # stands in for the pointers EPI = 0 ignores
    kernel(
        (_blocks(M, 128), _blocks(N, 128)), (256,),
        (ca, cb, np.int32(M), np.int32(N), np.int32(Kp), out, f32, f32, f32, f32, out, out, f32),
        shared_mem=_GEMM_SMEM,
    )  # fmt: skip


def outlier_weights(cb: Any, scb: Any, flags: Any, a_bits: Any, ca: Any, M: int, N: int, K: int,
                    fmt: str) -> tuple[Any, Any, Any, Any]:  # fmt: skip
    """The outlier columns of ``flags`` (uint8[K] of 0 / 1, 16-byte aligned, K % 16 == 0), for
    :func:`mm_dequant`: ``(idx int32[K], count int32[1], wout, aout)``, the first ``count``
    entries of ``idx`` the flagged columns in ascending order; for the first (up to
    _OUTLIER_CACHE) columns, in ``fmt``'s storage: ``wout`` [_OUTLIER_CACHE * N] their 16-bit
    weights, B = 16 / itemsize columns a 16-byte group, ``[((j // B) * N + n) * B + j % B]``,
    and ``aout`` [_OUTLIER_CACHE * Mp] the activations A (fmt[M*K]), ``[j * Mp + m]`` with Mp
    = M rounded up to _DEQUANT_ROWS (rows M..Mp-1 zero). Also zeroes those columns of the
    codes ``ca`` (int8[M*K]). One launch, no memset: each CTA lists the columns itself."""
    cp = cupy()
    idx = cp.empty(max(K, 1), dtype=cp.int32)
    count = cp.empty(1, dtype=cp.int32)
    storage = cp.float32 if fmt == "float32" else cp.uint16
    w16 = cp.empty(_OUTLIER_CACHE * max(N, 1), dtype=storage)
    mp = -(-max(M, 1) // _DEQUANT_ROWS) * _DEQUANT_ROWS
    aout = cp.empty(_OUTLIER_CACHE * mp, dtype=storage)
    # A thread a weight row, and at least a thread a (column, row) pair of ~8 outlier
    # columns for copying A to aout and zeroing CA (up to two CTAs an SM).
    grid = max(_blocks(N, 256), min(_blocks(8 * M, 256), 2 * _limits()[0]))
    _kernel(f"int8_outlier_weights<{_FMT_STRUCT[fmt]}>")(
        (grid,), (256,),
        (cb, scb, flags, np.int32(K), a_bits, ca, np.int32(M), idx, count, w16, aout, np.int32(N)),
    )  # fmt: skip
    return idx, count, w16, aout


def _dequant_columns(acc: Any, out: Any, N: int, wanted: int) -> int:
    """Columns a thread of int8_mm_dequant_outliers takes: ``wanted``, or fewer where N or
    the alignment of ``acc`` / ``out`` does not allow its vector loads and stores."""
    cpt = wanted
    while cpt > 1 and (N % cpt or acc.data.ptr % (4 * cpt) or out.data.ptr % (out.itemsize * cpt)):
        cpt //= 2
    return cpt


def mm_dequant(acc: Any, sca: Any, scb: Any, rows: int, N: int, fmt: str, out: Any, bias: Any = None,
               bias_fmt: str | None = None, sparse: tuple[Any, ...] | None = None,
               columns_per_thread: int | None = None) -> None:  # fmt: skip
    """``out`` (fmt[rows*N]) = dequantized ``acc`` (int32[rows*N]) with row stats ``sca``,
    column stats ``scb`` and optional ``bias`` (bias_fmt[N]). ``sparse`` adds the outlier
    columns' 16-bit products, in int8_mm_dequant_outliers with ``columns_per_thread`` (1, 2 or
    4, default _DEQUANT_COLUMNS; 1 or 2 where it takes the int8 products back out; fewer
    where N or the alignment does not allow it). It is (A
    bits of fmt, CB int8[N*K], K, then :func:`outlier_weights`' idx, count, w16, aout) for an
    ``acc`` computed with those columns of CA zeroed, or (A, CB, K, CA int8[rows*K], then
    :func:`outlier_gather_arrays`' six, filled) for an ``acc`` that still holds their int8 products."""
    if rows == 0 or N == 0:
        return
    bias, bfmt, has_bias = _bias_args(fmt, bias, bias_fmt)
    bias = bias if has_bias else scb  # stands in unused
    slabs = _dequant_slabs(rows)
    if sparse is None:
        _kernel(f"int8_mm_dequant<{_FMT_STRUCT[fmt]}, {bfmt}, {_bool(has_bias)}>")(
            (_blocks(N, 256), slabs), (256,), (acc, sca, scb, bias, out, np.int64(rows), np.int32(N))
        )
        return
    subtract = len(sparse) == 10
    wanted = _DEQUANT_COLUMNS if columns_per_thread is None else columns_per_thread
    allowed = _SUBTRACT_COLUMN_CHOICES if subtract else _DEQUANT_COLUMN_CHOICES
    if wanted not in allowed:
        raise ValueError(f"columns_per_thread must be one of {allowed} here, got {wanted}")
    cpt = _dequant_columns(acc, out, N, wanted)
    if subtract:
        a_bits, cb, K, ca, idx, count, w16, wq, aout, caout = sparse
    else:
        a_bits, cb, K, idx, count, w16, aout = sparse
        ca = wq = caout = cb  # stand in unused
    _kernel(f"int8_mm_dequant_outliers<{_FMT_STRUCT[fmt]}, {bfmt}, {_bool(has_bias)}, {cpt}, {_bool(subtract)}>")(
        (_blocks(N, 256 * cpt), slabs), (256,),
        (acc, sca, scb, bias, a_bits, cb, idx, count, np.int32(K), w16, aout, ca, wq, caout, out, np.int64(rows),
         np.int32(N)),
    )  # fmt: skip


def outlier_gather_arrays(M: int, N: int, K: int, fmt: str) -> tuple[Any, ...]:
    """Fresh outputs of :func:`outlier_gather`: ``(idx int32[K], count int32[1], wout, wq,
    aout, caout)``. ``idx``, ``count``, ``wout`` and ``aout`` as :func:`outlier_weights`';
    for the first _OUTLIER_CACHE columns, ``wq`` int8[_OUTLIER_CACHE * N] their weight codes
    (``[((j // 16) * N + n) * 16 + j % 16]``) and ``caout`` int8[_OUTLIER_CACHE * Mp] their
    activation codes (``[j * Mp + m]``). In mm_dequant's ``sparse`` order."""
    cp = cupy()
    storage = cp.float32 if fmt == "float32" else cp.uint16
    mp = -(-max(M, 1) // _DEQUANT_ROWS) * _DEQUANT_ROWS
    cache_n = _OUTLIER_CACHE * max(N, 1)
    return (
        cp.empty(max(K, 1), dtype=cp.int32),
        cp.empty(1, dtype=cp.int32),
        cp.empty(cache_n, dtype=storage),
        cp.empty(cache_n, dtype=cp.int8),
        cp.empty(_OUTLIER_CACHE * mp, dtype=storage),
        cp.empty(_OUTLIER_CACHE * mp, dtype=cp.int8),
    )


def outlier_gather(rowbits: Any, cb: Any, scb: Any, a_bits: Any, ca: Any, M: int, N: int, K: int, fmt: str,
                   found: tuple[Any, ...]) -> None:  # fmt: skip
    """int8_outlier_gather into ``found`` (:func:`outlier_gather_arrays`): the outlier
    columns set in any row of ``rowbits`` (int8_row_quant_wide's _ROW_BITS of A's M rows)
    and their operands from ``cb`` / ``scb`` / ``a_bits`` / ``ca``. It writes nothing the
    product of ``ca`` reads, so it may run on a stream beside that product."""
    idx, count, wout, wq, aout, caout = found
    smem = 4 * _rowbits_stride(K)
    threads = _gather_threads(M)
    _kernel(f"int8_outlier_gather<{_FMT_STRUCT[fmt]}, {threads}>", smem)(
        (_blocks(N, threads),), (threads,),
        (rowbits, np.int32(K), cb, scb, a_bits, ca, np.int32(M), np.int32(N), idx, count, wout, wq, aout, caout),
        shared_mem=smem,
    )  # fmt: skip


# Each thread's forked branches: (device id, stream handle) -> (side stream, fork event, join
# event). Per thread and per stream, so that calls on other streams (or captures of them) and
# other threads never record the same events or queue on the same side stream.
_branches = threading.local()


def _branch() -> tuple[Any, Any, Any]:
    """The (side stream, fork event, join event) of the current thread, device and stream."""
    cp = cupy()
    cache = getattr(_branches, "by_stream", None)
    if cache is None:
        cache = _branches.by_stream = {}
    key = (cp.cuda.Device().id, cp.cuda.get_current_stream().ptr)
    if key not in cache:
        cache[key] = (
            cp.cuda.Stream(non_blocking=True),
            cp.cuda.Event(disable_timing=True),
            cp.cuda.Event(disable_timing=True),
        )
    return cache[key]


def _fork() -> Any:
    """A side stream of the current device that waits for the current stream's work so far
    (captured as a forked branch while the current stream is captured into a graph)."""
    cp = cupy()
    side, forked, _ = _branch()
    forked.record(cp.cuda.get_current_stream())
    side.wait_event(forked)
    return side


def _join(side: Any) -> None:
    """Make the current stream wait for ``side``'s work (:func:`_fork`'s branch joins back)."""
    cp = cupy()
    joined = _branch()[2]
    joined.record(side)
    cp.cuda.get_current_stream().wait_event(joined)


def _linear_cublas(a_bits: Any, fmt: str, M: int, K: int, cb: Any, scb: Any, N: int, bias: Any,
                   bias_fmt: str | None, threshold: float, out: Any) -> None:  # fmt: skip
    """int8_row_quant_wide (a CTA a row: 1.1-3x faster here than a warp a row, H100), cuBLAS
    int32 product, then int8_mm_dequant. With threshold > 0 the row quantization also finds
    the outlier columns: for few rows (_gather_listing) as each row's bitmap, which
    int8_outlier_gather lists on a forked branch while cuBLAS multiplies the codes with
    those columns still in (the critical path keeps the three launches of threshold 0);
    else as byte flags, and int8_outlier_weights lists them, zeroes them in CA and gathers
    their weights and activations once for the whole call. int8_mm_dequant_outliers adds
    their 16-bit products (taking their int8 products back out first, after the gather).

    (Row chunks sized for the int32 product to stay in L2 measured slower on an H100:
    4096 x 4096 at M = 4096 took 223 us in four chunks against 162 in one call.)
    """
    cp = cupy()
    cb = aligned(cb, 16)
    ca = cp.empty(M * K, dtype=cp.int8)
    sca = cp.empty(M, dtype=cp.float32)
    acc = cp.empty(M * N, dtype=cp.int32)
    if threshold > 0 and _gather_listing(M, N, K):
        found = outlier_gather_arrays(M, N, K, fmt)
        rowbits = _row_quant_wide(a_bits, fmt, M, K, threshold, ca, sca, _ROW_BITS)
        side = _fork()
        with side:
            outlier_gather(rowbits, cb, scb, a_bits, ca, M, N, K, fmt, found)
        _cublas_int32(ca, cb, M, N, K, acc)
        _join(side)
        mm_dequant(acc, sca, scb, M, N, fmt, out, bias, bias_fmt, (a_bits, cb, K, ca, *found), _gather_columns(M, N))
        return
    flags = _row_quant_wide(a_bits, fmt, M, K, threshold, ca, sca, _BYTE_FLAGS)
    extra = None
    if flags is not None:
        extra = (a_bits, cb, K, *outlier_weights(cb, scb, flags, a_bits, ca, M, N, K, fmt))
    _cublas_int32(ca, cb, M, N, K, acc)
    mm_dequant(acc, sca, scb, M, N, fmt, out, bias, bias_fmt, extra)


def _gemv_tile(M: int, K: int) -> int | None:
    """The gemv's MT for M rows, or None when M or its shared memory is too large."""
    if M > (GEMV_AUTO_MAX_M if _backend["gemm"] == "auto" else GEMV_MAX_M) or K % 16:
        return None
    mt = next(t for t in _GEMV_TILES if t >= M)
    return mt if _gemv_smem(mt, K) <= _limits()[1] else None


def _gemv_smem(mt: int, K: int) -> int:
    words = -(-K // 32)
    return mt * K + 4 * words + 4 * -(-words // 32)


def _mmv_tile(M: int, K: int) -> int | None:
    """The medium-M kernel's MT for M rows, or None when it does not apply (only the
    "auto" backend takes it, so "mma" and "cublas" still reach their GEMMs at these M). It
    serves any M up to MMV_MAX_M: :func:`linear` tries the gemv first, and this kernel takes
    the gemv's rows where the gemv's shared memory does not fit."""
    if _backend["gemm"] != "auto" or not 0 < M <= MMV_MAX_M or K % 16:
        return None
    return next(t for t in _MMV_TILES if t >= M)


def _row_quant_wide(a_bits: Any, fmt: str, M: int, K: int, threshold: float, ca: Any, sca: Any, flags: int) -> Any:
    """int8_row_quant_wide (a CTA a row) into ``ca`` / ``sca``, K % 16 == 0 and ``ca`` fresh.
    With threshold > 0 it finds the outlier columns in the same pass and returns them as
    ``flags`` asks (_BYTE_FLAGS: uint8[K]; _ROW_BITS: uint32[M * _rowbits_stride(K)], each
    row's bitmap, the padding words zero), leaving their codes as quantized: the consumer
    subtracts their products."""
    cp = cupy()
    mode = flags if threshold > 0 else _NO_FLAGS
    out = None
    if mode == _BYTE_FLAGS:
        out = cp.zeros(K, dtype=cp.uint8)
    elif mode == _ROW_BITS:
        out = cp.empty(M * _rowbits_stride(K), dtype=cp.uint32)
    vec = a_bits.data.ptr % 16 == 0
    dummy = out if out is not None else ca  # stands in for the pointers the mode ignores
    _kernel(f"int8_row_quant_wide<{_FMT_STRUCT[fmt]}, {mode}, {_bool(vec)}>")(
        (M,), (256,), (a_bits, np.float32(threshold), dummy, dummy, ca, sca, np.int32(K))
    )
    return out


def _linear_mmv(a_bits: Any, fmt: str, M: int, K: int, cb: Any, scb: Any, N: int, bias: Any, bfmt: str,
                has_bias: bool, threshold: float, out: Any, mt: int) -> None:  # fmt: skip
    """The medium-M forward: int8_row_quant_wide (the outlier columns found in the same pass:
    each row's bitmap for MT = 16, no memset; byte flags for wider tiles), then
    int8_linear_mmv (outlier columns' int8 products taken back out, their 16-bit products
    added)."""
    if threshold > 0:
        a_bits = aligned(a_bits, 4)  # the epilogue gathers A as aligned 4-byte words
    quant = _mmv_quant(a_bits, fmt, M, K, threshold, mt)
    _mmv_product(a_bits, fmt, M, K, cb, scb, N, bias, bfmt, has_bias, threshold > 0, out, mt, quant)


def _mmv_quant(a_bits: Any, fmt: str, M: int, K: int, threshold: float, mt: int) -> tuple[Any, Any, Any, Any]:
    """The medium-M path's row quantization: ``(ca, sca, rowbits, flags)``, the outlier
    columns as int8_linear_mmv reads them at MT = ``mt`` (sca standing in for the unused)."""
    cp = cupy()
    ca = cp.empty(M * K, dtype=cp.int8)  # fresh: 256-byte aligned, rows 16-byte aligned (K % 16 == 0)
    sca = cp.empty(M, dtype=cp.float32)
    mode = _ROW_BITS if mt == _MMV_TILES[0] else _BYTE_FLAGS  # int8_linear_mmv reads rowbits at MT = 16
    found = _row_quant_wide(a_bits, fmt, M, K, threshold, ca, sca, mode)
    sparse = threshold > 0
    rowbits = found if mode == _ROW_BITS and sparse else sca
    flags = found if mode == _BYTE_FLAGS and sparse else sca
    return ca, sca, rowbits, flags


def _mmv_product(a_bits: Any, fmt: str, M: int, K: int, cb: Any, scb: Any, N: int, bias: Any, bfmt: str,
                 has_bias: bool, sparse: bool, out: Any, mt: int, quant: tuple[Any, ...]) -> None:  # fmt: skip
    """int8_linear_mmv on :func:`_mmv_quant`'s output (A 4-byte aligned when ``sparse``)."""
    ca, sca, rowbits, flags = quant
    expr = f"int8_linear_mmv<{_FMT_STRUCT[fmt]}, {bfmt}, {_bool(has_bias)}, {_bool(sparse)}, {mt}>"
    _kernel(expr)(
        (_blocks(N, _MMV_ROWS),), (256,),
        (ca, sca, aligned(cb, 16), scb, bias if has_bias else scb, a_bits, rowbits, flags, np.int32(M), np.int32(N),
         np.int32(K), out),
    )  # fmt: skip


def linear(a_bits: Any, fmt: str, M: int, K: int, cb: Any, scb: Any, N: int, bias: Any, bias_fmt: str | None,
           threshold: float, out: Any) -> None:  # fmt: skip
    """LLM.int8 forward into ``out`` (fmt[M*N]): A (fmt[M*K]) @ W^T with W = (CB int8[N*K], SCB
    float32[N]), optional bias (bias_fmt[N]), outlier decomposition when threshold > 0.

    No host synchronisation on any path, so the call can be captured in a CUDA graph.
    """
    if M == 0 or N == 0:
        return
    cp = cupy()
    sparse = threshold > 0
    mt = _gemv_tile(M, K)
    if mt is None and _use_cublas(M, N, K):
        bfmt, has_bias = "", False  # mm_dequant picks the bias variant itself
    else:
        bias, bfmt, has_bias = _bias_args(fmt, bias, bias_fmt)
    if mt is not None:
        cb = aligned(cb, 16)
        a_bits = aligned(a_bits, 16)  # its prologue reads A in 16-byte chunks
        smem = _gemv_smem(mt, K)
        expr = f"int8_linear_gemv<{_FMT_STRUCT[fmt]}, {bfmt}, {_bool(has_bias)}, {_bool(sparse)}, {mt}>"
        sms, _ = _limits()
        grid = max(1, min(_blocks(N, 8), _GEMV_CTAS_PER_SM[mt] * sms))
        _kernel(expr, smem)(
            (grid,), (256,),
            (a_bits, cb, scb, bias if has_bias else scb, np.float32(threshold), np.int32(M), np.int32(N), np.int32(K),
             out),
            shared_mem=smem,
        )  # fmt: skip
        return

    if _use_cublas(M, N, K):
        _linear_cublas(a_bits, fmt, M, K, cb, scb, N, bias, bias_fmt, threshold, out)
        return

    mmt = _mmv_tile(M, K)
    if mmt is not None:
        _linear_mmv(a_bits, fmt, M, K, cb, scb, N, bias, bfmt, has_bias, threshold, out, mmt)
        return
    ca = cp.empty(M * K, dtype=cp.int8)
    sca = cp.empty(M, dtype=cp.float32)
    if sparse and K % 16 == 0:
        # The GEMM's epilogue takes the outlier columns' int8 products back out, so the
        # one-pass row quantization with outlier search serves (one kernel instead of two,
        # A read once instead of twice).
        flags = _row_quant_wide(a_bits, fmt, M, K, threshold, ca, sca, _BYTE_FLAGS)
    else:
        flags = row_quant(a_bits, fmt, M, K, threshold, ca, sca)
    idx, count = compact_flags(flags) if sparse else (sca, sca)
    ca, cb, Kp = _gemm_operands(ca, cb, M, N, K)
    if Kp != K and sparse:
        a_bits = _pad_k(a_bits, M, K, Kp)  # the epilogue indexes A with CB's padded stride
    expr = f"int8_gemm<{_FMT_STRUCT[fmt]}, 1, {bfmt}, {_bool(has_bias)}, {_bool(sparse)}>"
    _kernel(expr, _GEMM_SMEM)(
        (_blocks(M, 128), _blocks(N, 128)), (256,),
        (ca, cb, np.int32(M), np.int32(N), np.int32(Kp), idx, sca, scb, bias if has_bias else scb, a_bits, idx, count,
         out),
        shared_mem=_GEMM_SMEM,
    )  # fmt: skip
