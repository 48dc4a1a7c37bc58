"""Swap a model's ``nn.Linear`` layers for quantized ones: ``replace_linear``, ``quantize_model``.

``OutlierTracer`` (defined with the 8-bit layers) is re-exported here, where bitsandbytes
keeps it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .int8 import OutlierTracer
from .linear4bit import Linear4bit
from .parameters import Params4bit

__all__ = ["OutlierTracer", "quantize_model", "replace_linear"]


def _is_float_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` whose weight is a plain float parameter (not already quantized)."""
    return isinstance(module, nn.Linear) and type(module.weight) in (nn.Parameter, torch.Tensor)


def _skipped(name: str, path: str, skip_modules: Iterable[str]) -> bool:
    return name in skip_modules or path in skip_modules


def _swap_linears(
    model: nn.Module, make: Callable[[str, nn.Linear], nn.Module], skip_modules: Iterable[str], prefix: str = ""
) -> None:
    skip_modules = tuple(skip_modules)
    for name, child in list(model.named_children()):
        path = f"{prefix}{name}"
        if _is_float_linear(child):
            if not _skipped(name, path, skip_modules):
                model._modules[name] = make(path, child)
        else:
            _swap_linears(child, make, skip_modules, prefix=f"{path}.")


def replace_linear(
    model: nn.Module,
    linear_replacement: Callable[..., nn.Module],
    skip_modules: Iterable[str] = ("lm_head",),
    copy_weights: bool = False,
    post_processing_function: str | None = None,
) -> nn.Module:
    """Replace every float ``nn.Linear`` of ``model`` (in place) by
    ``linear_replacement(in_features, out_features, bias)`` (bitsandbytes' ``replace_linear``).

    Args:
        model: the model; modified and returned.
        linear_replacement: a class or factory, e.g. ``LinearNF4`` or
            ``functools.partial(Linear4bit, compute_dtype=torch.bfloat16)``.
        skip_modules: child names (e.g. "lm_head") or dotted paths left as they are.
        copy_weights: give the new layer the old weight and bias (a 4-bit layer gets
            them as an unquantized :class:`Params4bit`, quantized on its next move).
        post_processing_function: name of a method of the new layer to call after the swap.
    """

    def make(path: str, old: nn.Linear) -> nn.Module:
        new = linear_replacement(old.in_features, old.out_features, old.bias is not None)
        if copy_weights:
            template = new.weight
            if isinstance(template, Params4bit):
                new.weight = Params4bit(
                    old.weight.data,
                    requires_grad=False,
                    blocksize=template.blocksize,
                    compress_statistics=template.compress_statistics,
                    quant_type=template.quant_type,
                    quant_storage=template.quant_storage,
                    module=new,
                )
            else:
                new.weight = old.weight
            new.bias = old.bias
        if post_processing_function is not None:
            func = getattr(new, post_processing_function, None)
            if func is not None:
                func()
        return new

    _swap_linears(model, make, skip_modules)
    return model


def quantize_model(
    model: nn.Module,
    quant_type: str = "nf4",
    compute_dtype: torch.dtype | None = None,
    compress_statistics: bool = True,
    quant_storage: torch.dtype = torch.uint8,
    blocksize: int = 64,
    skip_modules: Iterable[str] = ("lm_head",),
    device: torch.device | str | None = None,
) -> nn.Module:
    """Quantize every float ``nn.Linear`` of ``model`` to a :class:`Linear4bit`, in place.

    Each weight is quantized on ``device`` (default: where the weight is); biases are
    copied. Layers named in ``skip_modules`` (child names or dotted paths) stay float.

    Returns:
        ``model``, with its linear layers replaced.
    """

    def make(path: str, old: nn.Linear) -> nn.Module:
        return Linear4bit.from_linear(
            old,
            device=device,
            blocksize=blocksize,
            compute_dtype=compute_dtype,
            compress_statistics=compress_statistics,
            quant_type=quant_type,
            quant_storage=quant_storage,
        )

    _swap_linears(model, make, skip_modules)
    return model
