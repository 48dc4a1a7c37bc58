"""Params4bit: quantize on the first move, moves without re-quantizing, copies, pickling."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from cupyquant.torch import Params4bit
from cupyquant.torch import functional as F

from .helpers import same_bytes


def _quantized(device, **kwargs) -> Params4bit:
    return Params4bit(torch.randn(12, 80), quant_type="nf4", **kwargs).to(device)


def test_first_move_quantizes(device):
    weight = torch.randn(12, 80)
    param = Params4bit(weight, quant_type="nf4", blocksize=32)
    assert not param.bnb_quantized and param.quant_state is None
    moved = param.to(device)
    assert moved is param and param.bnb_quantized
    expected, state = F.quantize_4bit(weight.to(device), blocksize=32, compress_statistics=True, quant_type="nf4")
    assert same_bytes(param.data, expected) and param.quant_state == state
    assert param.dtype == torch.uint8 and not param.requires_grad


def test_moves_keep_bytes_and_state(device):
    param = _quantized(device, compress_statistics=True)
    data, state = param.data.clone(), copy.deepcopy(param.quant_state)
    for target in ("cpu", device, "cpu"):
        param = param.to(target)
        assert param.device.type == torch.device(target).type
        assert param.quant_state.absmax.device == param.device
        assert same_bytes(param.data, data)
        assert param.quant_state.to("cpu") == state.to("cpu")
        param.quant_state.to(param.device)


def test_cpu_and_cuda_methods(device):
    param = Params4bit(torch.randn(4, 64), quant_type="fp4")
    quantized = param.cuda() if device.type == "cuda" else param.cpu()
    assert quantized.bnb_quantized and quantized.device.type == device.type
    assert quantized.cpu().device.type == "cpu"


def test_dtype_conversions_leave_packed_bytes_alone(device):
    param = _quantized(device, quant_storage=torch.bfloat16)
    data = param.data.clone()
    for converted in (param.half(), param.float(), param.double(), param.bfloat16(), param.to(torch.float16)):
        assert same_bytes(converted.data, data)


def test_unquantized_dtype_and_meta_moves():
    param = Params4bit(torch.randn(4, 64))
    half = param.to(torch.float16)
    assert half.dtype == torch.float16 and not half.bnb_quantized
    meta = param.to("meta")
    assert meta.device.type == "meta" and not meta.bnb_quantized
    quantized = Params4bit(torch.randn(4, 64)).to("cpu", torch.bfloat16)
    assert quantized.quant_state.dtype == torch.bfloat16


def test_module_moves_keep_state_together(device):
    module = torch.nn.Module()
    module.weight = Params4bit(torch.randn(8, 64), quant_type="nf4")
    module.to(device)
    assert module.weight.bnb_quantized and module.weight.quant_state.absmax.device.type == device.type
    module.cpu()
    assert module.weight.device.type == "cpu" and module.weight.quant_state.absmax.device.type == "cpu"
    module.half()
    assert module.weight.dtype == torch.uint8


def test_from_float_and_from_prequantized(device):
    weight = torch.randn(6, 50)
    param = Params4bit.from_float(weight, device=device, quant_type="fp4", compress_statistics=False)
    stats = param.quant_state.as_dict(packed=True)
    rebuilt = Params4bit.from_prequantized(param.data.cpu(), {k: v.cpu() for k, v in stats.items()}, device=device)
    assert rebuilt.bnb_quantized and rebuilt.quant_type == "fp4" and rebuilt.blocksize == 64
    assert not rebuilt.compress_statistics and rebuilt.quant_storage == torch.uint8
    assert same_bytes(rebuilt.data, param.data) and rebuilt.quant_state == param.quant_state
    assert rebuilt.device.type == device.type


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "quantized"])
def test_deepcopy_copy_and_pickle(device, quantized):
    param = Params4bit(torch.randn(8, 64), quant_type="nf4", blocksize=128)
    if quantized:
        param = param.to(device)
    clones = [copy.deepcopy(param), pickle.loads(pickle.dumps(param)), copy.copy(param)]
    buffer = io.BytesIO()
    torch.save(param, buffer)
    buffer.seek(0)
    clones.append(torch.load(buffer, weights_only=False))
    for clone in clones:
        assert type(clone) is Params4bit
        assert (clone.blocksize, clone.quant_type, clone.bnb_quantized) == (128, "nf4", quantized)
        assert same_bytes(clone.data, param.data)
        assert clone.quant_state == param.quant_state
    deep = clones[0]
    assert deep.data_ptr() != param.data_ptr()
    if quantized:
        assert deep.quant_state is not param.quant_state


def test_errors():
    with pytest.raises(ValueError, match=r"blocksize must be one of \(32, .*\), got 100"):
        Params4bit(torch.randn(4), blocksize=100)
    with pytest.raises(ValueError, match="quant_type must be one of .* got 'nf3'"):
        Params4bit(torch.randn(4), quant_type="nf3")
    with pytest.raises(ValueError, match="quant_storage must be one of .* got torch.int64"):
        Params4bit(torch.randn(4), quant_storage=torch.int64)
    with pytest.raises(TypeError, match="data must be a torch.Tensor, got list"):
        Params4bit([1.0, 2.0])
    with pytest.raises(ValueError, match="requires_grad must be False for packed 4-bit codes"):
        Params4bit(torch.zeros(4, 1, dtype=torch.uint8), requires_grad=True, bnb_quantized=True)
    with pytest.raises(ValueError, match="can quantize float32, float16 or bfloat16 data, got torch.int32"):
        Params4bit(torch.ones(4, dtype=torch.int32)).cpu()
    param = Params4bit(torch.randn(8, 64)).cpu()
    stats = param.quant_state.as_dict(packed=True)
    with pytest.raises(ValueError, match=r"data holds 16 torch.uint8 elements but .* \(8, 64\) needs 256"):
        Params4bit.from_prequantized(param.data[:16], stats, device="cpu")
    with pytest.raises(ValueError, match="found neither"):
        Params4bit.from_prequantized(param.data, {"absmax": stats["absmax"]}, device="cpu")
