"""Helpers of the torch adapter tests: devices, dtypes, bitsandbytes fixtures, comparisons."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import FIXTURES

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
FLOAT_DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]
LINEAR4BIT_CASES = sorted(p.name.removesuffix(".safetensors") for p in FIXTURES.glob("linear4bit_*.safetensors"))
QUANT4_CASES = sorted(p.name.removesuffix(".safetensors") for p in FIXTURES.glob("quant4_*.safetensors"))
BLOCKWISE8_CASES = sorted(p.name.removesuffix(".safetensors") for p in FIXTURES.glob("blockwise8_*.safetensors"))


def load_fixture(name: str) -> dict[str, torch.Tensor]:
    """The tensors of one bitsandbytes 0.50.2 fixture file."""
    return load_file(FIXTURES / f"{name}.safetensors")


def fixture_params(name: str) -> dict:
    """The INDEX.json entry of a fixture."""
    return json.loads((FIXTURES / "INDEX.json").read_text())[name]


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((actual - expected).norm() / expected.norm())
