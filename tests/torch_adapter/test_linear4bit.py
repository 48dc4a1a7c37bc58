"""Linear4bit / LinearNF4 / LinearFP4: bitsandbytes' checkpoints and outputs, dtype rules, loading."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

import cupyquant.torch as cqt
from cupyquant.torch import Linear4bit, LinearFP4, LinearNF4
from cupyquant.torch import linear4bit as linear4bit_module

from .helpers import LINEAR4BIT_CASES, fixture_params, load_fixture, same_bytes

# bitsandbytes computed y with cuBLAS; we compute it with the same dequantized weight but
# another summation order, so outputs agree to a couple of ulps of the output dtype,
# relative to the largest output.
OUTPUT_ULPS = 2
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _assert_close_to_bitsandbytes(y: torch.Tensor, expected: torch.Tensor) -> None:
    assert y.dtype == expected.dtype and y.shape == expected.shape
    scale = expected.float().abs().max().item()
    error = (y.float().cpu() - expected.float()).abs().max().item()
    assert error <= OUTPUT_ULPS * EPS[expected.dtype] * scale, (error, scale)


def _module_state(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in data.items() if k.startswith("module.")}


def _layer_settings(case: str) -> dict:
    params = fixture_params(case)
    return {
        "compute_dtype": getattr(torch, params["compute_dtype"]),
        "compress_statistics": params["compress_statistics"],
        "quant_type": params["quant_type"],
        "quant_storage": getattr(torch, params["quant_storage"]),
    }


def _float_linear(data: dict[str, torch.Tensor]) -> nn.Linear:
    linear = nn.Linear(*reversed(data["fp_weight"].shape))
    with torch.no_grad():
        linear.weight.copy_(data["fp_weight"])
        linear.bias.copy_(data["fp_bias"])
    return linear


# ---------------------------------------------------------------------------------------
# bitsandbytes fixtures
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", LINEAR4BIT_CASES)
def test_quantizing_the_float_layer_gives_bitsandbytes_state_dict(device, case):
    data = load_fixture(case)
    expected = _module_state(data)
    layer = Linear4bit.from_linear(_float_linear(data), device=device, **_layer_settings(case))
    state_dict = layer.state_dict()
    assert set(state_dict) == set(expected) and list(state_dict)[:3] == ["weight", "bias", "weight.absmax"]
    for key, value in state_dict.items():
        if key == "bias":
            # bitsandbytes' forward had cast its bias to the compute dtype; ours stays put
            assert torch.equal(value.to(expected[key].dtype).cpu(), expected[key])
        else:
            assert same_bytes(value, expected[key]), key
    _assert_close_to_bitsandbytes(layer(data["x"].to(device)), data["y"])


@pytest.mark.parametrize("case", LINEAR4BIT_CASES)
@pytest.mark.parametrize("quantize_first", [False, True], ids=["fresh", "quantized"])
def test_loading_a_bitsandbytes_state_dict(device, case, quantize_first):
    data = load_fixture(case)
    expected = _module_state(data)
    layer = Linear4bit(128, 48, **_layer_settings(case))
    layer = layer.to(device) if quantize_first else layer
    layer.load_state_dict(expected)
    if not quantize_first:  # a fresh layer loads on the CPU; moving it must not re-quantize
        layer = layer.to(device)
    assert layer.weight.device.type == device.type and layer.quant_state.absmax.device.type == device.type
    saved = layer.state_dict()
    assert set(saved) == set(expected)
    for key, value in saved.items():
        if key == "bias":  # loaded into the layer's own float32 bias, as nn.Module does
            assert value.dtype == torch.float32 and torch.equal(value.to(expected[key].dtype).cpu(), expected[key])
        else:
            assert same_bytes(value, expected[key]), key
    _assert_close_to_bitsandbytes(layer(data["x"].to(device)), data["y"])


@pytest.mark.parametrize("case", LINEAR4BIT_CASES)
def test_meta_layer_with_assign_takes_the_checkpoint_tensors(case):
    data = load_fixture(case)
    expected = _module_state(data)
    layer = Linear4bit(128, 48, device="meta", **_layer_settings(case))
    layer.load_state_dict(expected, assign=True)
    saved = layer.state_dict()
    for key, value in saved.items():
        assert same_bytes(value, expected[key]), key
    _assert_close_to_bitsandbytes(layer(data["x"]), data["y"])


@pytest.mark.parametrize("case", LINEAR4BIT_CASES)
def test_load_state_dict_copies_unless_assign(case):
    expected = _module_state(load_fixture(case))
    layer = Linear4bit(128, 48, **_layer_settings(case))
    layer.load_state_dict(expected)
    assert layer.weight.data_ptr() != expected["weight"].data_ptr()
    assert layer.quant_state.absmax.data_ptr() != expected["weight.absmax"].data_ptr()


def test_load_float_state_dict(device):
    linear = nn.Linear(64, 16)
    reference = Linear4bit.from_linear(linear, device=device, quant_type="nf4")
    fresh = Linear4bit(64, 16, quant_type="nf4")
    fresh.load_state_dict(linear.state_dict())
    assert not fresh.weight.bnb_quantized
    fresh.to(device)
    quantized = Linear4bit(64, 16, quant_type="nf4").to(device)
    quantized.load_state_dict(linear.state_dict())
    assert quantized.weight.bnb_quantized and quantized.weight.device.type == device.type
    x = torch.randn(3, 64, device=device)
    for layer in (fresh, quantized):
        assert same_bytes(layer.weight.data, reference.weight.data)
        torch.testing.assert_close(layer(x), reference(x))


def test_load_state_dict_errors():
    layer = Linear4bit(64, 16)
    other = Linear4bit(64, 32).cpu()
    with pytest.raises(RuntimeError, match=r"quantized \(32, 64\) weight, the module needs \(16, 64\)"):
        layer.load_state_dict(other.state_dict())
    with pytest.raises(RuntimeError, match=r"copying a param with shape \(16, 32\)"):
        layer.load_state_dict({"weight": torch.randn(16, 32), "bias": torch.zeros(16)})
    bad = other.state_dict()
    bad["weight.surprise"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"unexpected quant_state keys: \['surprise'\]"):
        Linear4bit(64, 32).load_state_dict(bad)
    missing = layer.load_state_dict({"bias": torch.zeros(16)}, strict=False)
    assert missing.missing_keys == ["weight"] and missing.unexpected_keys == []
    extra = layer.load_state_dict({**Linear4bit(64, 16).cpu().state_dict(), "extra": torch.ones(1)}, strict=False)
    assert extra.unexpected_keys == ["extra"] and extra.missing_keys == []


# ---------------------------------------------------------------------------------------
# forward rules
# ---------------------------------------------------------------------------------------
@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(linear4bit_module, "_issued_warnings", set())


def test_compute_dtype_follows_the_first_float32_or_bfloat16_input(device):
    layer = Linear4bit(64, 8).to(device)
    assert layer.compute_dtype is None
    y = layer(torch.randn(2, 64, device=device, dtype=torch.bfloat16))
    assert layer.compute_dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    y = layer(torch.randn(2, 64, device=device))
    assert y.dtype == torch.float32 and layer.compute_dtype == torch.bfloat16


def test_float16_input_without_compute_dtype_warns_once(device, fresh_warnings):
    layers = [Linear4bit(64, 8).to(device) for _ in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for layer in layers:
            for _ in range(2):
                y = layer(torch.randn(1, 64, device=device, dtype=torch.float16))
                layer(torch.randn(4, 64, device=device, dtype=torch.float16))
    messages = [str(w.message) for w in caught]
    assert messages == [linear4bit_module._FP16_INPUT_ONE_ROW]
    assert y.dtype == torch.float16 and layers[0].compute_dtype is None


def test_float16_batch_warning(device, fresh_warnings):
    with pytest.warns(UserWarning, match="slow inference or training speed"):
        Linear4bit(64, 8).to(device)(torch.randn(4, 64, device=device, dtype=torch.float16))


def test_forward_leaves_the_bias_alone(device):
    layer = Linear4bit(64, 8, compute_dtype=torch.float16).to(device)
    bias = layer.bias
    y = layer(torch.randn(3, 64, device=device))
    assert layer.bias is bias and layer.bias.dtype == torch.float32 and y.dtype == torch.float32


@pytest.mark.parametrize("cls", [LinearNF4, LinearFP4])
def test_nf4_fp4_layers(device, cls):
    layer = cls(96, 16, bias=False, compute_dtype=torch.float32).to(device)
    assert layer.weight.quant_type == cls.__name__[-3:].lower() and layer.bias is None
    linear = nn.Linear(96, 16, bias=False, device=device)
    with torch.no_grad():
        linear.weight.copy_(cqt.functional.dequantize_4bit(layer.weight, layer.quant_state))
    x = torch.randn(5, 96, device=device)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)


def test_from_linear_leaves_the_linear_unchanged(device):
    linear = nn.Linear(64, 8)
    before = copy.deepcopy(linear.state_dict())
    layer = LinearNF4.from_linear(linear, device=device, compute_dtype=torch.bfloat16, blocksize=32)
    assert layer.weight.blocksize == 32 and layer.weight.quant_type == "nf4"
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.device.type == device.type
    assert all(torch.equal(v, linear.state_dict()[k]) for k, v in before.items())
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear, got Conv1d"):
        Linear4bit.from_linear(nn.Conv1d(1, 1, 1))


def test_deepcopy_pickle_and_device_moves(device):
    layer = Linear4bit(64, 8, quant_type="nf4", compute_dtype=torch.float32).to(device)
    x = torch.randn(3, 64, device=device)
    y = layer(x)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        torch.testing.assert_close(clone(x), y, rtol=0, atol=0)
        assert clone.weight.quant_state is not layer.weight.quant_state
    moved = copy.deepcopy(layer).cpu()
    assert moved.weight.device.type == "cpu" and moved.quant_state.absmax.device.type == "cpu"
    torch.testing.assert_close(moved.to(device)(x), y, rtol=0, atol=0)


def test_unquantized_forward_is_a_named_error():
    with pytest.raises(RuntimeError, match=r"Linear4bit.weight is not quantized yet: move the layer"):
        Linear4bit(64, 8)(torch.randn(1, 64))


def test_constructor_errors():
    with pytest.raises(ValueError, match="quant_type must be one of .* got 'int4'"):
        Linear4bit(8, 8, quant_type="int4")
    with pytest.raises(ValueError, match="compute_dtype must be None, .* got torch.float64"):
        Linear4bit(8, 8, compute_dtype=torch.float64)


def test_input_errors():
    layer = Linear4bit(64, 8).cpu()
    with pytest.raises(ValueError, match=r"last dimension must equal the weight's K = 64, got A of shape \(2, 32\)"):
        layer(torch.randn(2, 32))
    with pytest.raises(ValueError, match="A must be float32, float16 or bfloat16, got torch.int64"):
        Linear4bit(64, 8).cpu()(torch.ones(2, 64, dtype=torch.int64))


# ---------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 5])
def test_compile_fullgraph_traces_the_forward(rows):
    torch._dynamo.reset()
    layer = LinearNF4(64, 24, compute_dtype=torch.bfloat16).cpu()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(rows, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)
    x.requires_grad_(True)
    compiled(x).sum().backward()
    expected = torch.autograd.grad(layer(x).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)
