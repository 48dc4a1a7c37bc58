"""``matmul_4bit`` with autograd: the input's gradient flows through the frozen 4-bit weight.

The forward is the quantized product of ``cupyquant.torch.functional``; the backward
dequantizes the weight once into the gradient's dtype and multiplies, so low-rank
adapters trained on a frozen quantized base (QLoRA) get their gradients. The packed
weight gets none: it is frozen by design.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import functional as F

__all__ = ["MatMul4Bit", "matmul_4bit"]


class MatMul4Bit(torch.autograd.Function):
    """``A @ dequantize(B)^T + bias``; gradients for ``A`` and ``bias``, none for ``B``."""

    @staticmethod
    def forward(ctx: Any, A: Tensor, B: Tensor, bias: Tensor | None, quant_state: F.QuantState) -> Tensor:
        ctx.quant_state = quant_state
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(B)
        return F.matmul_4bit_unchecked(A, B, quant_state, bias)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, None, Tensor | None, None]:
        need_A, _, need_bias, _ = ctx.needs_input_grad
        grad_A = grad_bias = None
        if need_bias:
            # every leading dimension is a batch dimension of the bias
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0).to(ctx.bias_dtype)
        if need_A:
            (B,) = ctx.saved_tensors
            weight = F.dequantize_4bit_as(B, ctx.quant_state, grad_output.dtype)
            grad_A = torch.matmul(grad_output, weight)
        return grad_A, None, grad_bias, None


def matmul_4bit(
    A: Tensor, B: Tensor, quant_state: F.QuantState, out: Tensor | None = None, bias: Tensor | None = None
) -> Tensor:
    """``A @ dequantize(B, quant_state)^T (+ bias)``, differentiable in ``A`` and ``bias``.

    Args:
        A: (..., K) float32 / float16 / bfloat16 activations.
        B: the packed weight of an (N, K) matrix (``Linear4bit.weight`` or its ``.t()``).
        quant_state: B's QuantState (``shape == (N, K)``); required.
        out: optional (..., N) tensor of A's dtype that receives the result.
        bias: optional (N,) tensor of A's dtype.

    Returns:
        (..., N) tensor of A's dtype (``out`` when given).
    """
    if quant_state is None:
        raise TypeError("matmul_4bit needs quant_state (the QuantState of B), got None")
    if torch.is_grad_enabled() and (A.requires_grad or (bias is not None and bias.requires_grad)):
        if out is not None:
            raise ValueError("out= is not supported when gradients are recorded (A or bias requires grad)")
        F.check_matmul_operands(A, B, quant_state, bias)
        return MatMul4Bit.apply(A, B, bias, quant_state)
    return F.matmul_4bit(A, B, quant_state, out=out, bias=bias)
