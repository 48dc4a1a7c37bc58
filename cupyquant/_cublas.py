"""cublasGemmEx on CuPy's cuBLAS handle and current stream, callable during stream capture.

CuPy's cuBLAS bindings refuse to run while a stream is being captured, although cuBLAS
itself is capturable (since CUDA 12.2 it takes its workspace with cudaMallocAsync on the
stream, which a graph records as an allocation node). So the call goes through ctypes to
the libcublas CuPy loaded into this process. Where that library cannot be found, CuPy's
binding is used, which works eagerly but not during a capture (:func:`capturable` says so).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

from . import _xp

# cuBLAS / CUDA enum values (library_types.h, cublas_api.h).
CUDA_R_8I, CUDA_R_32I = 3, 10
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_COMPUTE_32I, CUBLAS_COMPUTE_32F = 72, 68
CUBLAS_GEMM_DEFAULT = -1
CUBLAS_POINTER_MODE_HOST = 0


def gemm_ex(transa: int, transb: int, m: int, n: int, k: int, alpha: int, a_ptr: int, a_type: int, lda: int,
            b_ptr: int, b_type: int, ldb: int, beta: int, c_ptr: int, c_type: int, ldc: int,
            compute: int) -> None:  # fmt: skip
    """cublasGemmEx (host alpha / beta pointers, default algorithm) on CuPy's handle and the
    current CuPy stream; raises RuntimeError on a cuBLAS error status."""
    cp = _xp.cupy()
    handle = cp.cuda.device.get_cublas_handle()
    lib = cublas_library()
    args = (transa, transb, m, n, k, alpha, a_ptr, a_type, lda, b_ptr, b_type, ldb, beta, c_ptr, c_type, ldc,
            compute, CUBLAS_GEMM_DEFAULT)  # fmt: skip
    if lib is None:
        from cupy_backends.cuda.libs import cublas

        cublas.setStream(handle, cp.cuda.get_current_stream().ptr)
        cublas.setPointerMode(handle, CUBLAS_POINTER_MODE_HOST)
        cublas.gemmEx(handle, *args)
        return
    calls = (
        (lib.cublasSetStream_v2, (handle, cp.cuda.get_current_stream().ptr)),
        (lib.cublasSetPointerMode_v2, (handle, CUBLAS_POINTER_MODE_HOST)),
        (lib.cublasGemmEx, (handle, *args)),
    )
    for fn, fn_args in calls:
        status = fn(*fn_args)
        if status != 0:
            raise RuntimeError(f"{fn.__name__} failed with cuBLAS status {status}")


def capturable() -> bool:
    """True when :func:`gemm_ex` goes through ctypes, i.e. may run during stream capture."""
    return cublas_library() is not None


@functools.cache
def cublas_library() -> Any:
    """ctypes handle of the libcublas CuPy has loaded into this process, or None."""
    from cupy_backends.cuda.libs import cublas  # noqa: F401 - loads libcublas into the process

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libcublas.so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        vp, i = ctypes.c_void_p, ctypes.c_int
        lib.cublasSetStream_v2.argtypes = [vp, vp]
        lib.cublasSetPointerMode_v2.argtypes = [vp, i]
        lib.cublasGemmEx.argtypes = [vp, i, i, i, i, i, vp, vp, i, i, vp, i, i, vp, vp, i, i, i, i]
        for fn in (lib.cublasSetStream_v2, lib.cublasSetPointerMode_v2, lib.cublasGemmEx):
            fn.restype = i
        return lib
    return None
