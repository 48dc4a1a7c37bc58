"""Embedding, StableEmbedding and the quantized lookup tables."""

from __future__ import annotations

import copy
import math
import pickle
import warnings

import pytest
import torch
from torch import nn

from cupyquant.torch import (
    Embedding,
    Embedding4bit,
    Embedding8bit,
    EmbeddingFP4,
    EmbeddingNF4,
    GlobalOptimManager,
    StableEmbedding,
)
from cupyquant.torch import functional as F

from .helpers import FLOAT_DTYPES, same_bytes


def _registered(module: nn.Module) -> dict | None:
    for owner, name, config in GlobalOptimManager.get_instance().module_weight_config_triple:
        if owner is module and name == "weight":
            return config
    return None


def test_embedding_init_padding_and_override(device):
    layer = Embedding(50, 16, padding_idx=3, device=device)
    bound = math.sqrt(6.0 / (50 + 16))  # xavier uniform
    assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > bound / 2
    assert torch.equal(layer.weight[3], torch.zeros(16, device=device))
    assert _registered(layer) == {"optim_bits": 32}
    idx = torch.tensor([[3, 4], [0, 49]], device=device)
    torch.testing.assert_close(layer(idx), layer.weight[idx])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_stable_embedding_norms_in_full_precision(device, dtype):
    layer = StableEmbedding(30, 8, device=device, dtype=dtype)
    assert layer.weight.dtype == dtype and layer.norm.weight.dtype == torch.float32
    assert _registered(layer) == {"optim_bits": 32}
    idx = torch.tensor([1, 2, 29], device=device)
    y = layer(idx)
    expected = nn.functional.layer_norm(layer.weight[idx].float(), (8,), layer.norm.weight, layer.norm.bias)
    assert y.dtype == dtype
    torch.testing.assert_close(y, expected.to(dtype))


@pytest.mark.parametrize("cls", [EmbeddingNF4, EmbeddingFP4])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_4bit_rows_match_the_dequantized_table(device, cls, dtype):
    layer = cls(40, 128, dtype=dtype).to(device)
    assert layer.weight.bnb_quantized and not layer.quant_state.nested
    table = F.dequantize_4bit(layer.weight, layer.quant_state)
    idx = torch.tensor([[0, 39, 7], [7, 7, 1]], device=device)
    y = layer(idx)
    assert y.dtype == dtype and y.shape == (2, 3, 128)
    assert torch.equal(y, table[idx])


def test_4bit_embedding_not_a_multiple_of_the_blocksize_decodes_the_table(device):
    with pytest.warns(UserWarning, match="Embedding size 100 is not divisible by block size 64"):
        layer = Embedding4bit(20, 100, quant_type="nf4")
    layer.to(device)
    idx = torch.tensor([5, 19], device=device)
    assert torch.equal(layer(idx), F.dequantize_4bit(layer.weight, layer.quant_state)[idx])


def test_4bit_embedding_save_load_and_copies(device):
    layer = EmbeddingNF4(24, 64, quant_storage=torch.bfloat16).to(device)
    idx = torch.arange(24, device=device).reshape(4, 6)
    y = layer(idx)
    state = layer.state_dict()
    assert {"weight", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"} == set(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh = EmbeddingNF4(24, 64, quant_storage=torch.bfloat16)
    fresh.load_state_dict(state)
    assert same_bytes(fresh.weight.data, layer.weight.data)
    assert torch.equal(fresh.to(device)(idx), y)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert torch.equal(clone(idx), y)


def test_4bit_embedding_reads_a_nested_state(device):
    """A table saved with double-quantized absmax (as another tool may write) still decodes by row."""
    weight = torch.randn(16, 64, device=device)
    packed, state = F.quantize_4bit(weight, quant_type="fp4", compress_statistics=True)
    checkpoint = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    layer = EmbeddingFP4(16, 64)
    layer.load_state_dict(checkpoint)
    layer.to(device)
    idx = torch.tensor([3, 15, 0], device=device)
    assert torch.equal(layer(idx), F.dequantize_4bit(packed, state)[idx])


def test_4bit_embedding_errors():
    with pytest.raises(RuntimeError, match="EmbeddingNF4.weight is not quantized yet"):
        EmbeddingNF4(4, 64)(torch.tensor([0]))
    with pytest.raises(ValueError, match="quant_type must be one of .* got 'int4'"):
        Embedding4bit(4, 64, quant_type="int4")
    with pytest.raises(RuntimeError, match=r"quantized \(8, 64\) weight, the module needs \(4, 64\)"):
        EmbeddingNF4(4, 64).load_state_dict(EmbeddingNF4(8, 64).cpu().state_dict())


# Row-wise int8: each value is within half a quantization step, SCB / 127 / 2, of the float
# value, plus the output dtype's rounding.
INT8_HALF_STEP = 0.5 / 127


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_8bit_embedding_lookup(device, dtype):
    reference = nn.Embedding(30, 32, device=device, dtype=dtype)
    layer = Embedding8bit(30, 32, device=device, dtype=dtype)
    layer.load_state_dict(reference.state_dict())
    assert layer.weight.dtype == torch.int8 and layer.SCB.dtype == torch.float32
    idx = torch.tensor([[0, 29], [5, 5]], device=device)
    y = layer(idx)
    expected = reference(idx)
    assert y.dtype == dtype
    step = layer.SCB[idx].unsqueeze(-1) * INT8_HALF_STEP
    eps = torch.finfo(dtype).eps * expected.float().abs()
    assert ((y.float() - expected.float()).abs() <= step + eps).all()


def test_8bit_embedding_save_and_load(device):
    layer = Embedding8bit(12, 16, device=device)
    state = layer.state_dict()
    assert set(state) == {"weight", "SCB"}
    fresh = Embedding8bit(12, 16, device="meta")
    fresh.load_state_dict(state, assign=True)
    idx = torch.arange(12, device=device)
    assert torch.equal(fresh(idx), layer(idx))
    assert torch.equal(copy.deepcopy(layer)(idx), layer(idx))


def test_8bit_embedding_zero_rows_and_errors():
    layer = Embedding8bit(3, 4)
    layer.load_state_dict({"weight": torch.zeros(3, 4)})
    assert torch.equal(layer(torch.tensor([1])), torch.zeros(1, 4))
    with pytest.raises(RuntimeError, match=r"copying a param with shape \(3, 5\)"):
        layer.load_state_dict({"weight": torch.zeros(3, 5)})
