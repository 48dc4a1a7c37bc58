"""Every CUDA source compiles with nvcc for sm_90 (or its own FILE_ARCH target), every registered template
included."""

from __future__ import annotations

import importlib
import shutil
import subprocess

import pytest

from cupyquant import rawkernels

# Importing the launcher modules registers their instantiations.
LAUNCHERS = ("cupyquant._gpu", "cupyquant._gpu_int8", "cupyquant.matmul_4bit")

nvcc = shutil.which("nvcc")


def _import_launchers() -> None:
    for name in LAUNCHERS:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real import error inside an existing module
                raise


@pytest.mark.skipif(nvcc is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", rawkernels.sources(), ids=lambda p: p.name)
def test_cuda_source_compiles(source, tmp_path):
    _import_launchers()
    unit = tmp_path / f"instantiate_{source.stem}.cu"
    # Taking a kernel's address instantiates it without spelling out its signature.
    kernels = ",\n".join(f"  (const void*)&{e}" for e in rawkernels.expressions(source.name))
    lines = [f'#include "{source}"']
    if kernels:
        lines += ["extern const void* const all_kernels[];", f"const void* const all_kernels[] = {{\n{kernels}\n}};"]
    unit.write_text("\n".join(lines) + "\n")
    cmd = [
        nvcc,
        "-std=c++17",
        # One target only (nvcc's -arch=sm_90a also builds compute_90 PTX, which rejects wgmma).
        "-gencode=arch=compute_{0},code=sm_{0}".format(rawkernels.FILE_ARCH.get(source.name, "sm_90")[3:]),
        f"-I{rawkernels.KERNEL_DIR}",
        "-c",
        str(unit),
        "-o",
        str(tmp_path / "out.o"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "warning" not in result.stderr.lower(), result.stderr[-4000:]


def _nvrtc():
    """CuPy's NVRTC binding where the NVRTC library loads (no GPU needed), else None."""
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception:  # noqa: BLE001 - no CuPy, or no NVRTC library on this machine
        return None
    return nvrtc


@pytest.mark.parametrize("source", rawkernels.sources(), ids=lambda p: p.name)
def test_cuda_source_compiles_with_nvrtc(source):
    """The run-time compiler sees the same source and options the loader uses."""
    nvrtc = _nvrtc()
    if nvrtc is None:
        pytest.skip("NVRTC is not loadable here (pip install nvidia-cuda-nvrtc-cu12)")
    _import_launchers()
    program = nvrtc.createProgram(source.read_text(), source.name, [], [])
    for expression in rawkernels.expressions(source.name):
        nvrtc.addNameExpression(program, expression)
    try:
        # The loader's options, then the -arch CuPy appends for an sm_90 device.
        nvrtc.compileProgram(program, [*rawkernels.compile_options(source.name), "-arch=sm_90"])
    except nvrtc.NVRTCError as exc:
        pytest.fail(f"{exc}\n{nvrtc.getProgramLog(program)[-4000:]}")
