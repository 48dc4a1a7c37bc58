"""The crossing from torch into the array API: zero copies, bf16 bits, stream, device, allocator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cupyquant.torch import _interop
from cupyquant.torch._interop import float_format, format_of_dtype, kernel_context, storage, to_tensor, torch_dtype

from .helpers import FLOAT_DTYPES


def _pointer(array) -> int:
    if isinstance(array, np.ndarray):
        return array.__array_interface__["data"][0]
    return array.data.ptr


@pytest.mark.parametrize("dtype", [*FLOAT_DTYPES, torch.uint8, torch.int8, torch.int32], ids=str)
def test_storage_is_a_zero_copy_view(device, dtype):
    t = torch.arange(12, device=device).to(dtype).reshape(3, 4)
    with kernel_context(t):
        array = storage(t)
        assert _pointer(array) == t.data_ptr()
    assert tuple(array.shape) == (3, 4)
    expected = {torch.bfloat16: "uint16"}.get(dtype, str(dtype).removeprefix("torch."))
    assert array.dtype.name == expected


def test_storage_bfloat16_is_its_bits(device):
    t = torch.randn(17, device=device).to(torch.bfloat16)
    with kernel_context(t):
        bits = storage(t)
        host = bits.get() if hasattr(bits, "get") else bits
    np.testing.assert_array_equal(host, t.view(torch.int16).cpu().numpy().view(np.uint16))


def test_storage_writes_reach_the_tensor(device):
    t = torch.zeros(4, device=device)
    with kernel_context(t):
        storage(t)[1] = 5.0
    assert t[1].item() == 5.0


def test_storage_detaches_and_makes_contiguous(device):
    leaf = torch.randn(4, 6, device=device, requires_grad=True)
    with kernel_context(leaf):
        assert _pointer(storage(leaf)) == leaf.data_ptr()
        transposed = leaf.detach().t()
        array = storage(transposed)
        host = array.get() if hasattr(array, "get") else array
    np.testing.assert_array_equal(host, transposed.cpu().numpy())


def test_storage_refuses_other_devices():
    with pytest.raises(ValueError, match="cpu or cuda device, got meta"):
        storage(torch.empty(2, device="meta"))


def test_float_format_names_and_errors():
    assert [float_format(torch.empty(0, dtype=d)) for d in (torch.float32, torch.float16, torch.bfloat16)] == [
        "float32",
        "float16",
        "bfloat16",
    ]
    with pytest.raises(ValueError, match=r"A must be float32, float16 or bfloat16, got torch.float64"):
        float_format(torch.empty(0, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x must be .* got torch.int8"):
        format_of_dtype(torch.int8, "x")


def test_torch_dtype():
    assert torch_dtype("bfloat16") is torch.bfloat16
    assert torch_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="dtype must be one of .* got 'float64'"):
        torch_dtype("float64")


def test_to_tensor_wraps_numpy_without_copy():
    array = np.arange(5, dtype=np.float32)
    t = to_tensor(array, torch.device("cpu"))
    array[0] = 9.0
    assert t[0].item() == 9.0


@pytest.mark.gpu
def test_to_tensor_copies_a_cupy_array_into_torch_memory(cp):
    t = torch.empty(1, device="cuda")
    with kernel_context(t):
        array = cp.arange(6, dtype=cp.uint8).reshape(2, 3)
        copied = to_tensor(array, t.device)
    assert copied.dtype == torch.uint8 and copied.device == t.device
    assert torch.equal(copied.cpu(), torch.arange(6, dtype=torch.uint8).reshape(2, 3))


def test_kernel_context_is_a_no_op_on_cpu():
    with kernel_context(torch.empty(1)) as ctx:
        assert ctx is _interop._CPU_CONTEXT


@pytest.mark.gpu
def test_kernel_context_uses_torchs_current_stream(cp):
    t = torch.empty(8, device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side), kernel_context(t):
        assert cp.cuda.get_current_stream().ptr == side.cuda_stream
    with kernel_context(t):
        assert cp.cuda.get_current_stream().ptr == torch.cuda.current_stream().cuda_stream


@pytest.mark.gpu
def test_kernel_context_allocates_through_torch(cp):
    t = torch.empty(8, device="cuda")
    previous_allocator = cp.cuda.memory._get_thread_local_allocator()
    before = torch.cuda.memory_allocated()
    with kernel_context(t):
        scratch = cp.empty(1 << 20, dtype=cp.uint8)
        assert torch.cuda.memory_allocated() >= before + (1 << 20)
    del scratch
    # CuPy's own allocator is back once the context is left
    assert cp.cuda.memory._get_thread_local_allocator() is previous_allocator


@pytest.mark.gpu
def test_kernel_context_on_the_second_gpu(cp):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    t = torch.arange(4, device="cuda:1", dtype=torch.float32)
    with kernel_context(t):
        array = storage(t)
        assert cp.cuda.Device().id == 1
        assert array.device.id == 1
        assert _pointer(array) == t.data_ptr()
