"""matmul_4bit with autograd: input and bias gradients through the frozen 4-bit weight."""

from __future__ import annotations

import pytest
import torch

import cupyquant.torch as cqt
from cupyquant.torch import functional as F

from .helpers import FLOAT_DTYPES, relative_error

# The backward multiplies by the dequantized weight in the gradient's dtype; the reference
# does the same product in float32. One rounding of the output dtype separates them.
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("rows", [1, 6])
def test_gradients_match_the_dequantized_product(device, dtype, rows):
    W = torch.randn(20, 64, device=device) / 8
    packed, state = F.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
    dense = F.dequantize_4bit(packed, state)
    A = torch.randn(2, rows, 64, device=device, dtype=dtype, requires_grad=True)
    bias = torch.randn(20, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(2, rows, 20, device=device, dtype=dtype)
    # bitsandbytes' calling convention: the transposed packed weight
    y = cqt.matmul_4bit(A, packed.t(), quant_state=state, bias=bias)
    y.backward(grad_out)
    A32 = A.detach().float().requires_grad_(True)
    b32 = bias.detach().float().requires_grad_(True)
    (A32 @ dense.t() + b32).backward(grad_out.float())
    assert y.dtype == dtype
    assert relative_error(A.grad, A32.grad) < GRAD_RTOL[dtype]
    assert relative_error(bias.grad, b32.grad) < GRAD_RTOL[dtype]


def test_no_grad_path_fills_out(device):
    packed, state = F.quantize_4bit(torch.randn(8, 32, device=device))
    A = torch.randn(3, 32, device=device)
    out = torch.empty(3, 8, device=device)
    assert cqt.matmul_4bit(A, packed, state, out=out) is out
    torch.testing.assert_close(out, F.matmul_4bit(A, packed, state))


def test_errors():
    packed, state = F.quantize_4bit(torch.randn(8, 32))
    with pytest.raises(TypeError, match="needs quant_state"):
        cqt.matmul_4bit(torch.randn(2, 32), packed, None)
    A = torch.randn(2, 32, requires_grad=True)
    with pytest.raises(ValueError, match="out= is not supported when gradients are recorded"):
        cqt.matmul_4bit(A, packed, state, out=torch.empty(2, 8))
    with pytest.raises(ValueError, match=r"A's last dimension must equal the weight's K = 32"):
        cqt.matmul_4bit(torch.randn(2, 16, requires_grad=True), packed, state)
