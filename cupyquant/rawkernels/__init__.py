"""The one loader of cupyquant's CUDA sources.

Each kernel is a template instantiation named by a C++ expression, e.g.
``"quantize_blockwise<Float16, 64, 0, false>"``. It is compiled with NVRTC the first
time it is asked for on a device and memoised per (file, expression, device); CuPy's
own disk cache makes later processes skip the compile.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._xp import cupy

KERNEL_DIR = Path(__file__).resolve().parent
# No fast-math: the kernels promise the reference's exact float32 rounding.
COMPILE_OPTIONS = ("-std=c++17", f"-I{KERNEL_DIR}")
# Sources that use architecture-specific instructions (wgmma) name their target; it is
# passed before the device's own -arch, and NVRTC builds for the specific one. Their
# launchers run them only on that architecture.
FILE_ARCH = {"gemm_4bit_wgmma.cu": "sm_90a"}


def compile_options(filename: str) -> tuple[str, ...]:
    """NVRTC options of ``filename``: COMPILE_OPTIONS, plus its FILE_ARCH target."""
    arch = FILE_ARCH.get(filename)
    return COMPILE_OPTIONS + ((f"-arch={arch}",) if arch else ())


_EXPRESSIONS: dict[str, Callable[[], list[str]]] = {}


def register_expressions(filename: str, expressions: Callable[[], list[str]]) -> None:
    """Declare every template instantiation a launcher may ask of ``filename``, so the
    compile test can build them all ahead of time with nvcc."""
    _EXPRESSIONS[filename] = expressions


def expressions(filename: str) -> list[str]:
    """The registered instantiations of ``filename`` (empty when none are registered)."""
    fn = _EXPRESSIONS.get(filename)
    return fn() if fn is not None else []


def sources() -> list[Path]:
    """Every .cu file of the package (the compile test walks these)."""
    return sorted(KERNEL_DIR.glob("*.cu"))


@functools.cache
def _source(filename: str) -> str:
    return (KERNEL_DIR / filename).read_text()


def _group_key(expression: str) -> tuple[str, int]:
    """Kernel and first template argument, and the number of template arguments (a kernel's
    optional trailing argument, such as the 4-bit kernels' TILED, starts a group of its own)."""
    return expression.split(",")[0], expression.count(",")


def _group(filename: str, expression: str) -> tuple[str, ...]:
    """The instantiations compiled together with ``expression``: the registered ones of
    the same kernel, first template argument and argument count (e.g. every blocksize of
    one kernel for float16). One NVRTC call per group keeps first-use compile time low and
    the number of compiles small."""
    key = _group_key(expression)
    group = tuple(e for e in expressions(filename) if _group_key(e) == key)
    return group if expression in group else (expression,)


@functools.cache
def _module(filename: str, group: tuple[str, ...], device_id: int) -> Any:
    cp = cupy()
    with cp.cuda.Device(device_id):
        return cp.RawModule(code=_source(filename), options=compile_options(filename), name_expressions=list(group))


@functools.cache
def _function(filename: str, expression: str, device_id: int) -> Any:
    return _module(filename, _group(filename, expression), device_id).get_function(expression)


def get_function(filename: str, expression: str) -> Any:
    """The compiled kernel ``expression`` of ``filename`` for the current CuPy device."""
    return _function(filename, expression, cupy().cuda.Device().id)
