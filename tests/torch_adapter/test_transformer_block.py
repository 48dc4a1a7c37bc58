"""A small transformer block (attention + MLP) quantized to NF4 / FP4: output error, low-rank
adapters trained on the frozen 4-bit base, save and reload into fresh layers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as TF

from cupyquant.torch import Linear4bit, quantize_model, replace_linear
from cupyquant.torch import functional as F

from .helpers import FLOAT_DTYPES, relative_error

D_MODEL, HEADS, HIDDEN, SEQ, BATCH = 128, 4, 256, 12, 2

# Output error of the quantized block against the float32 block, ||y_q - y|| / ||y||.
# Measured on the CPU over input seeds: NF4 0.034-0.036, FP4 0.042-0.044, float32 compute;
# fp16 / bf16 compute add at most 0.0002. The bounds leave ~1.5x headroom.
QUANTIZATION_ERROR_BOUND = {"nf4": 0.05, "fp4": 0.065}
# Against the same block running on the *dequantized* weights in float32, only the
# compute dtype's rounding remains. Measured: 0 (fp32), 4e-4 (fp16), 3.2e-3 (bf16); the
# bounds are ~5x, for the GPU's different summation order.
KERNEL_ERROR_BOUND = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(D_MODEL)
        self.q, self.k, self.v, self.o = (nn.Linear(D_MODEL, D_MODEL) for _ in range(4))
        self.ln2 = nn.LayerNorm(D_MODEL)
        self.up = nn.Linear(D_MODEL, HIDDEN)
        self.down = nn.Linear(HIDDEN, D_MODEL)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], HEADS, D_MODEL // HEADS).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        q, k, v = (self._heads(proj(h)) for proj in (self.q, self.k, self.v))
        attn = TF.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(attn.transpose(1, 2).reshape(x.shape))
        return x + self.down(TF.gelu(self.up(self.ln2(x))))


def _block(device) -> Block:
    torch.manual_seed(0)
    return Block().to(device)


def _dequantized_twin(quantized: nn.Module, device) -> Block:
    """The float block holding the quantized block's dequantized weights."""
    twin = _block(device)
    for name, layer in quantized.named_modules():
        if isinstance(layer, Linear4bit):
            target = twin.get_submodule(name)
            with torch.no_grad():
                target.weight.copy_(F.dequantize_4bit(layer.weight, layer.quant_state).float())
                target.bias.copy_(layer.bias.float())
    return twin


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_block_output_error(device, quant_type, dtype):
    reference = _block(device)
    x = torch.randn(BATCH, SEQ, D_MODEL, device=device)
    with torch.no_grad():
        expected = reference(x)
        quantized = quantize_model(copy.deepcopy(reference), quant_type=quant_type, compute_dtype=dtype).to(dtype)
        y = quantized(x.to(dtype))
        on_dequantized = _dequantized_twin(quantized, device)(x)
    assert y.dtype == dtype and y.shape == expected.shape
    assert sum(isinstance(m, Linear4bit) for m in quantized.modules()) == 6
    assert relative_error(y, expected) < QUANTIZATION_ERROR_BOUND[quant_type]
    assert relative_error(y, on_dequantized) < KERNEL_ERROR_BOUND[dtype]


class LoRA(nn.Module):
    """``base(x) + scale * (x @ A^T) @ B^T``: a trainable low-rank update on a frozen layer."""

    def __init__(self, base: nn.Module, rank: int = 4, scale: float = 2.0) -> None:
        super().__init__()
        self.base, self.scale = base, scale
        generator = torch.Generator().manual_seed(base.in_features)
        self.A = nn.Parameter(torch.randn(rank, base.in_features, generator=generator).to(base.bias.device) * 0.05)
        self.B = nn.Parameter(torch.randn(base.out_features, rank, generator=generator).to(base.bias.device) * 0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * (x @ self.A.t().to(x.dtype)) @ self.B.t().to(x.dtype)


def _with_adapters(block: nn.Module) -> nn.Module:
    for name in ("q", "k", "v", "o", "up", "down"):
        setattr(block, name, LoRA(getattr(block, name)))
    for name, p in block.named_parameters():
        p.requires_grad_(name.endswith((".A", ".B")))
    return block


# fp32 compute: both sides see the same dequantized weights; the sums differ in order only.
ADAPTER_GRAD_RTOL = 1e-4


def test_adapters_on_the_frozen_base_train(device):
    quantized = quantize_model(_block(device), quant_type="nf4", compute_dtype=torch.float32)
    twin = _with_adapters(_dequantized_twin(quantized, device))
    adapted = _with_adapters(quantized)
    x = torch.randn(BATCH, SEQ, D_MODEL, device=device, requires_grad=True)
    target = torch.randn(BATCH, SEQ, D_MODEL, device=device)

    loss = TF.mse_loss(adapted(x), target)
    loss.backward()
    twin_x = x.detach().clone().requires_grad_(True)
    TF.mse_loss(twin(twin_x), target).backward()

    assert relative_error(x.grad, twin_x.grad) < ADAPTER_GRAD_RTOL
    for (name, p), (_, q) in zip(adapted.named_parameters(), twin.named_parameters(), strict=True):
        if name.endswith((".A", ".B")):
            assert p.grad is not None and relative_error(p.grad, q.grad) < ADAPTER_GRAD_RTOL, name
        else:
            assert p.grad is None, name
    for layer in adapted.modules():
        if isinstance(layer, Linear4bit):
            assert layer.weight.grad is None and not layer.weight.requires_grad

    optimizer = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        step_loss = TF.mse_loss(adapted(x.detach()), target)
        step_loss.backward()
        optimizer.step()
        losses.append(step_loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_bias_gradient_through_quantized_layers(device, dtype):
    layer = Linear4bit(D_MODEL, 16, compute_dtype=dtype).to(device)
    layer.bias.requires_grad_(True)
    x = torch.randn(3, 5, D_MODEL, device=device, dtype=dtype)
    layer(x).sum().backward()
    assert layer.bias.grad.dtype == torch.float32
    torch.testing.assert_close(layer.bias.grad, torch.full((16,), 15.0, device=device))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_save_and_reload_into_fresh_layers(device, quant_type, tmp_path):
    quantized = quantize_model(_block(device), quant_type=quant_type, compute_dtype=torch.bfloat16)
    x = torch.randn(BATCH, SEQ, D_MODEL, device=device)
    with torch.no_grad():
        y = quantized(x)
    torch.save(quantized.state_dict(), tmp_path / "block.pt")

    def fresh_layer(in_features: int, out_features: int, bias: bool) -> Linear4bit:
        return Linear4bit(in_features, out_features, bias, compute_dtype=torch.bfloat16, quant_type=quant_type)

    fresh = replace_linear(Block(), fresh_layer)  # built on the CPU, not quantized
    fresh.load_state_dict(torch.load(tmp_path / "block.pt", weights_only=True))
    assert all(layer.weight.bnb_quantized for layer in fresh.modules() if isinstance(layer, Linear4bit))
    fresh.to(device)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)
