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
# another summation order (the CPU's BLAS picks its own by instruction set), so outputs
# agree to a couple of ulps of the output dtype, relative to the largest sum of the
# products' magnitudes, sum_k |x_k w_nk| + |b_n|: the scale a float32 dot product's rounding
# depends on. (Relative to the largest output, float32 on an AVX-512 CPU was 2.9 ulps off;
# relative to this, 0.76, and the 16-bit outputs 0.18.)
OUTPUT_ULPS = 2
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _assert_close_to_bitsandbytes(layer: Linear4bit, x: torch.Tensor, expected: torch.Tensor) -> None:
    y = layer(x)
    assert y.dtype == expected.dtype and y.shape == expected.shape
    weight = cqt.functional.dequantize_4bit(layer.weight, layer.quant_state).float().cpu()
    magnitudes = x.float().cpu().abs() @ weight.abs().t() + layer.bias.float().cpu().abs()
    scale = magnitudes.max().item()
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
    _assert_close_to_bitsandbytes(layer, data["x"].to(device), data["y"])


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
    _assert_close_to_bitsandbytes(layer, data["x"].to(device), data["y"])


@pytest.mark.parametrize("case", LINEAR4BIT_CASES)
def test_meta_layer_with_assign_takes_the_checkpoint_tensors(case):
    data = load_fixture(case)
    expected = _module_state(data)
    layer = Linear4bit(128, 48, device="meta", **_layer_settings(case))
    layer.load_state_dict(expected, assign=True)
    saved = layer.state_dict()
    for key, value in saved.items():
        assert same_bytes(value, expected[key]), key
    _assert_close_to_bitsandbytes(layer, data["x"], data["y"])


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


# ---------------------------------------------------------------------------------------
# tile order (Linear4bit.tile_)
# ---------------------------------------------------------------------------------------
def _layer_pair(device, quant_storage=torch.uint8, compute_dtype=torch.float16, out_features=48, in_features=256):
    torch.manual_seed(out_features + in_features)
    linear = nn.Linear(in_features, out_features)
    plain = Linear4bit.from_linear(
        linear, device=device, quant_type="nf4", compute_dtype=compute_dtype, quant_storage=quant_storage
    ).untile_()
    return plain, copy.deepcopy(plain).tile_()


def _relative_error(y, expected):
    return ((y.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compute_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 16, 40, 300])
def test_tiled_layer_gives_the_default_layouts_output(device, quant_storage, compute_dtype, rows):
    # Same weight, same product. The CPU path and the dequantize + GEMM path past the fused
    # switch point give the same bits; the fused CUDA kernels on tiles may add in another
    # order (the one-token GEMV, 8-warp blocks up to 8 tokens), so there the outputs agree
    # to the kernels' tolerance.
    plain, tiled = _layer_pair(device, quant_storage, compute_dtype)
    assert tiled.weight.quant_state.tiled and not plain.weight.quant_state.tiled
    assert not same_bytes(tiled.weight.data, plain.weight.data)
    x = torch.randn(rows, 256, device=device, dtype=compute_dtype)
    y, expected = tiled(x), plain(x)
    if device.type == "cpu" or rows == 300:
        assert same_bytes(y, expected)
    else:
        assert (
            _relative_error(y, expected)
            < {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[compute_dtype]
        )


def test_tiled_layer_checkpoints_in_the_bitsandbytes_layout(device):
    plain, tiled = _layer_pair(device, torch.float32)
    expected = plain.state_dict()
    saved = tiled.state_dict()
    assert saved.keys() == expected.keys()
    assert all(same_bytes(saved[k], v) if isinstance(v, torch.Tensor) else saved[k] == v for k, v in expected.items())
    assert tiled.weight.quant_state.tiled  # saving leaves the layer tiled
    x = torch.randn(2, 256, device=device, dtype=torch.float16)
    fresh = Linear4bit(256, 48, quant_type="nf4", compute_dtype=torch.float16)
    fresh.load_state_dict(saved)  # a checkpoint loads as the bitsandbytes layout ...
    assert not fresh.weight.quant_state.tiled and same_bytes(fresh.weight.data.to(device), plain.weight.data)
    tiled.load_state_dict(expected)  # ... and into a tiled layer stays tiled
    assert tiled.weight.quant_state.tiled and same_bytes(tiled(x), copy.deepcopy(plain).tile_()(x))
    tiled.untile_()
    assert not tiled.weight.quant_state.tiled and same_bytes(tiled.weight.data, plain.weight.data)


def test_tiled_weight_dequantizes_and_backpropagates(device):
    plain, tiled = _layer_pair(device, compute_dtype=torch.float32)
    w = cqt.functional.dequantize_4bit(plain.weight, plain.weight.quant_state)
    assert same_bytes(cqt.functional.dequantize_4bit(tiled.weight, tiled.weight.quant_state), w)
    x = torch.randn(5, 256, device=device, requires_grad=True)
    grads = [torch.autograd.grad(layer(x).square().sum(), x)[0] for layer in (plain, tiled)]
    torch.testing.assert_close(grads[1], grads[0])


def test_tiled_layer_copies_and_moves(device):
    plain, tiled = _layer_pair(device)
    x = torch.randn(3, 256, device=device, dtype=torch.float16)
    y = tiled(x)
    for clone in (copy.deepcopy(tiled), pickle.loads(pickle.dumps(tiled))):
        assert clone.weight.quant_state.tiled and same_bytes(clone(x), y)
    moved = copy.deepcopy(tiled).cpu()
    assert moved.weight.quant_state.tiled
    assert same_bytes(moved(x.cpu()), copy.deepcopy(plain).cpu()(x.cpu()))
    assert same_bytes(moved.to(device)(x), y)


def test_tiled_layer_compiles(device):
    torch._dynamo.reset()
    plain, tiled = _layer_pair(device, compute_dtype=torch.bfloat16)
    compiled = torch.compile(tiled, fullgraph=True, backend="aot_eager")
    for rows in (1, 300):
        x = torch.randn(rows, 256, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            assert same_bytes(compiled(x), tiled(x))


def test_layer_order_follows_the_device(device):
    # By default a layer keeps tiles on CUDA where the shape allows (out % 16, in % 128) and
    # the bitsandbytes layout on the CPU, reordering when quantized, loaded or moved;
    # tile_() / untile_() fix the order for good. The product is the same either way.
    on_cuda = device.type == "cuda"
    torch.manual_seed(0)
    linear = nn.Linear(256, 48)
    layer = Linear4bit.from_linear(linear, device=device, quant_type="nf4", compute_dtype=torch.float16)
    assert layer.tile_order is None and layer.weight.quant_state.tiled == on_cuda
    plain = copy.deepcopy(layer).untile_()
    x = torch.randn(3, 256, device=device, dtype=torch.float16)
    assert same_bytes(layer.state_dict()["weight"], plain.state_dict()["weight"])
    moved = copy.deepcopy(layer).cpu()
    assert not moved.weight.quant_state.tiled and same_bytes(moved.weight.data, plain.weight.data.cpu())
    back = moved.to(device)  # Module.to moves in place: moved is back
    assert back.weight.quant_state.tiled == on_cuda and same_bytes(back(x), layer(x))
    fresh = Linear4bit(256, 48, quant_type="nf4", compute_dtype=torch.float16).to(device)
    fresh.load_state_dict(plain.state_dict())
    assert fresh.weight.quant_state.tiled == on_cuda and same_bytes(fresh(x), layer(x))
    quantized = Linear4bit(256, 48, quant_type="nf4").to(device)  # quantized on the move
    assert quantized.weight.quant_state.tiled == on_cuda
    assert not plain.to(device).weight.quant_state.tiled and copy.deepcopy(plain).cpu().tile_order is False
    pinned = copy.deepcopy(plain).tile_().cpu()
    assert pinned.weight.quant_state.tiled and same_bytes(pinned(x.cpu()), copy.deepcopy(plain).cpu()(x.cpu()))
    odd = Linear4bit.from_linear(nn.Linear(256, 40), device=device)  # 40 rows: no tiles
    assert not odd.weight.quant_state.tiled
    # float32 compute: no tensor-core kernel reads the weight, so it keeps the bitsandbytes layout
    full = Linear4bit.from_linear(linear, device=device, quant_type="nf4", compute_dtype=torch.float32)
    assert not full.weight.quant_state.tiled and same_bytes(full.weight.data, plain.weight.data)
    # a compute dtype left to the first input: arranged before it is known, tiled it stays
    auto = Linear4bit.from_linear(linear, device=device, quant_type="nf4")
    y = auto(x.float())
    assert auto.compute_dtype == torch.float32 and auto.weight.quant_state.tiled == on_cuda
    assert same_bytes(y, copy.deepcopy(auto).untile_()(x.float()))


def test_layer_order_on_load(device):
    # A pinned order survives load_state_dict; a meta layer given the checkpoint's CPU tensors
    # (assign=True) holds the bitsandbytes layout until it moves to CUDA.
    on_cuda = device.type == "cuda"
    torch.manual_seed(1)
    source = Linear4bit.from_linear(nn.Linear(256, 48), device=device, quant_type="nf4", compute_dtype=torch.float16)
    checkpoint = source.state_dict()
    x = torch.randn(2, 256, device=device, dtype=torch.float16)
    pinned = copy.deepcopy(source).untile_()
    pinned.load_state_dict(checkpoint)
    assert pinned.tile_order is False and not pinned.weight.quant_state.tiled and same_bytes(pinned(x), source(x))
    meta = Linear4bit(256, 48, quant_type="nf4", compute_dtype=torch.float16, device="meta")
    meta.load_state_dict({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in checkpoint.items()}, assign=True)
    assert meta.weight.device.type == "cpu" and not meta.weight.quant_state.tiled
    meta.to(device)
    assert meta.weight.quant_state.tiled == on_cuda and same_bytes(meta(x), source(x))


def test_tile_errors():
    with pytest.raises(RuntimeError, match=r"Linear4bit.weight is not quantized yet"):
        Linear4bit(256, 48).tile_()
    for shape in ((40, 256), (48, 192)):
        layer = Linear4bit(shape[1], shape[0]).cpu()
        with pytest.raises(ValueError, match=rf"N % 16 == 0 and K % 128 == 0, got shape \({shape[0]}, {shape[1]}\)"):
            layer.tile_()
        assert not layer.weight.quant_state.tiled
