"""replace_linear and quantize_model."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from cupyquant.torch import Linear4bit, LinearNF4, Params4bit, quantize_model, replace_linear


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.encoder = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    model.lm_head = nn.Linear(32, 10)
    return model


def test_quantize_model_skips_lm_head(device):
    model = quantize_model(_model(), quant_type="fp4", compute_dtype=torch.float32, blocksize=128, device=device)
    assert isinstance(model.encoder[0], Linear4bit) and isinstance(model.encoder[2], Linear4bit)
    assert type(model.lm_head) is nn.Linear
    assert model.encoder[0].weight.blocksize == 128 and model.encoder[0].weight.device.type == device.type


def test_quantize_model_by_path_and_idempotent():
    model = quantize_model(_model(), skip_modules=("encoder.2", "lm_head"))
    assert isinstance(model.encoder[0], Linear4bit) and type(model.encoder[2]) is nn.Linear
    first = model.encoder[0]
    quantize_model(model, skip_modules=())
    assert model.encoder[0] is first and isinstance(model.lm_head, Linear4bit)


def test_replace_linear_with_copied_weights():
    model = _model()
    weight = model.encoder[0].weight.detach().clone()
    replace_linear(model, functools.partial(Linear4bit, quant_type="nf4"), copy_weights=True)
    layer = model.encoder[0]
    assert isinstance(layer.weight, Params4bit) and not layer.weight.bnb_quantized
    assert torch.equal(layer.weight.data, weight) and layer.weight.quant_type == "nf4"
    model.cpu()
    assert layer.weight.bnb_quantized


def test_replace_linear_calls_the_post_processing_method():
    calls = []

    class Tracked(LinearNF4):
        def finish(self) -> None:
            calls.append(self)

    model = replace_linear(_model(), Tracked, post_processing_function="finish")
    assert calls == [model.encoder[0], model.encoder[2]]


def test_replace_linear_plain_replacement():
    model = replace_linear(_model(), nn.Linear, copy_weights=True, skip_modules=())
    assert type(model.lm_head) is nn.Linear


def test_from_linear_errors():
    with pytest.raises(ValueError, match="quant_type must be one of .* got 'int3'"):
        quantize_model(_model(), quant_type="int3")
