"""``Linear4bit``, ``LinearNF4``, ``LinearFP4``: nn.Linear with a frozen 4-bit weight.

Same constructor, compute-dtype rules, warnings and state_dict keys as bitsandbytes'
layers. Unlike bitsandbytes, ``load_state_dict`` works on a freshly built layer (not
yet quantized, on any device, or on the meta device with ``assign=True``), and
``forward`` never modifies the module's bias.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ..tiled_4bit import tileable
from .autograd import matmul_4bit
from .parameters import PackedWeightStateDict, Params4bit

__all__ = ["Linear4bit", "LinearFP4", "LinearNF4"]

_FP16_INPUT_ONE_ROW = (
    "Input type into Linear4bit is torch.float16, but bnb_4bit_compute_dtype=torch.float32 (default). "
    "This will lead to slow inference."
)
_FP16_INPUT_BATCH = (
    "Input type into Linear4bit is torch.float16, but bnb_4bit_compute_dtype=torch.float32 (default). "
    "This will lead to slow inference or training speed."
)
# Each compute-dtype warning is issued once per process, not once per layer or call.
_issued_warnings: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _issued_warnings:
        _issued_warnings.add(message)
        warnings.warn(message, UserWarning, stacklevel=4)


class Linear4bit(PackedWeightStateDict, nn.Linear):
    """``y = x @ dequantize(W)^T + b`` with W stored as NF4 / FP4 codes (bitsandbytes' ``Linear4bit``).

    The weight is a :class:`Params4bit`; it is quantized on the layer's first move to a
    device (``.to(device)``, ``.cuda()``, ``.cpu()``), or comes quantized from
    ``load_state_dict`` / :meth:`from_linear`.

    On CUDA the layer keeps the quantized bytes in the tile order of
    :mod:`cupyquant.tiled_4bit` (16-row x 128-column tiles of 1 KB) where the shape allows
    it (out_features % 16 == 0, in_features % 128 == 0), unless ``compute_dtype`` is
    float32 when they are arranged: they are reordered once, when the weight is quantized,
    loaded or moved there, and 2..64 fp16 / bf16 tokens run up to 25% faster (see
    :meth:`tile_`). A layer whose compute dtype is left to its first input keeps the tiles
    whatever that input is (one float32 token then runs 4-14% slower: pass
    ``compute_dtype=torch.float32`` or call :meth:`untile_` for float32 compute).
    ``state_dict`` writes the bitsandbytes layout whatever the order, and
    ``weight.quant_state.tiled`` tells which order ``weight.data`` holds. :meth:`tile_` /
    :meth:`untile_` fix the order.

    Compute dtype: ``compute_dtype`` when given. Otherwise the first input decides: a
    float32 or bfloat16 input sets it to that dtype; a float16 input leaves it unset
    (the product runs in float16) with a warning about float32 being the default. The
    input is cast to the compute dtype, and the output back to the input's dtype.

    Args:
        input_features: K, the input size.
        output_features: N, the output size.
        bias: whether the layer has a bias (kept in its own dtype, cast per call).
        compute_dtype: dtype of the product (float32, float16, bfloat16) or None.
        compress_statistics: double-quantize absmax (nested state).
        quant_type: "nf4" or "fp4".
        quant_storage: dtype the packed bytes are viewed as.
        device: where the float weight is created (quantization waits for a move).
    """

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | None = None,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        device: torch.device | str | None = None,
    ) -> None:
        if compute_dtype is not None and compute_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(
                f"compute_dtype must be None, torch.float32, torch.float16 or torch.bfloat16, got {compute_dtype}"
            )
        super().__init__(input_features, output_features, bias, device)
        self.weight = Params4bit(
            self.weight.data,
            requires_grad=False,
            compress_statistics=compress_statistics,
            quant_type=quant_type,
            quant_storage=quant_storage,
            module=self,
        )
        self.compute_dtype = compute_dtype
        self.compute_type_is_set = compute_dtype is not None
        self.quant_storage = quant_storage
        # The order of the quantized bytes: None follows the device and compute dtype (see
        # _arrange_weight); tile_() / untile_() fix it.
        self.tile_order: bool | None = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        device: torch.device | str | None = None,
        blocksize: int = 64,
        **kwargs: Any,
    ) -> Linear4bit:
        """A quantized layer from an ``nn.Linear`` (which is left unchanged).

        Args:
            linear: the float layer.
            device: where to quantize and put the layer (default the linear's device).
            blocksize: 4-bit blocksize of the weight.
            **kwargs: the constructor's keyword arguments (compute_dtype, quant_type, ...).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        device = linear.weight.device if device is None else torch.device(device)
        # built on the meta device: nothing is initialised only to be overwritten
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta", **kwargs)
        template = layer.weight
        layer.weight = Params4bit.from_float(
            linear.weight.detach(),
            device=device,
            blocksize=blocksize,
            compress_statistics=template.compress_statistics,
            quant_type=template.quant_type,
            quant_storage=template.quant_storage,
        )
        layer.weight.module = layer
        if linear.bias is not None:
            layer.bias = nn.Parameter(
                linear.bias.detach().to(device, copy=True), requires_grad=linear.bias.requires_grad
            )
        layer._arrange_weight()
        return layer

    @property
    def quant_state(self) -> Any:
        """The weight's QuantState (None until quantized); the weight owns it."""
        return getattr(self.weight, "quant_state", None)

    def set_compute_type(self, x: Tensor) -> None:
        """bitsandbytes' rule for the compute dtype, from the first input."""
        if x.dtype in (torch.float32, torch.bfloat16):
            # the input is in a dtype that is safe to compute in
            self.compute_dtype = x.dtype
        elif x.dtype == torch.float16 and self.compute_dtype in (None, torch.float32):
            one_row = x.numel() == x.shape[-1]
            _warn_once(_FP16_INPUT_ONE_ROW if one_row else _FP16_INPUT_BATCH)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., input_features) float tensor -> (..., output_features) in x's dtype."""
        weight = self._quantized_weight()
        quant_state = weight.quant_state
        if not self.compute_type_is_set:
            self.set_compute_type(x)
            self.compute_type_is_set = True
        input_dtype = x.dtype
        if self.compute_dtype is not None and x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        out = matmul_4bit(x, weight, quant_state, bias=bias)
        return out if out.dtype == input_dtype else out.to(input_dtype)

    def float_weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def tile_(self) -> Linear4bit:
        """Keep the quantized weight in the tile order of :mod:`cupyquant.tiled_4bit` (16-row x
        128-column tiles of 1 KB) on every device, from now on; returns self. This is what a
        layer on CUDA does by default where the shape allows it; on the CPU the results are
        the same, slower (the reference path reorders the bytes a call).

        On CUDA with float16 / bfloat16 compute 2..64 tokens run up to 25% faster (H100,
        8192 x 28672 at 16 tokens 54.1 against 67.7 us, 28672 x 8192 at 64 tokens 107.8
        against 117.4; one token 47.2 against 47.0 and 50.6 against 48.7, see the README);
        every other path reads the tiles in place. float32 compute gains nothing (its
        kernels do not use tensor cores) and one float32 token runs 4-14% slower on tiles.

        ``state_dict`` still writes the bitsandbytes layout, and a loaded checkpoint is tiled.
        ``weight.quant_state.tiled`` records the order, which this package's
        ``dequantize_4bit`` / ``matmul_4bit`` read; code that interprets ``weight.data``
        byte by byte without the state must call :meth:`untile_` first. Needs a quantized
        weight with out_features % 16 == 0 and in_features % 128 == 0.
        """
        self._quantized_weight().set_tile_order(True)
        self.tile_order = True
        return self

    def untile_(self) -> Linear4bit:
        """Keep the weight in the bitsandbytes layout on every device, from now on; returns self."""
        self._quantized_weight().set_tile_order(False)
        self.tile_order = False
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> Linear4bit:
        # .to() / .cuda() / .cpu() quantize or move the weight; then put it in its device's order
        super()._apply(fn, recurse)
        self._arrange_weight()
        return self

    def _arrange_weight(self) -> None:
        """Put a quantized weight in the order :attr:`tile_order` asks for. By default tiles on
        CUDA where the shape allows them, unless the compute dtype is float32 (the tiles
        speed up the tensor-core kernels only, and one float32 token runs 4-14% slower on
        them: H100, README); the bitsandbytes layout on the CPU, whose reference path would
        reorder tiles a call."""
        weight = self.weight
        if not getattr(weight, "bnb_quantized", False) or getattr(weight, "quant_state", None) is None:
            return
        tiled = getattr(self, "tile_order", None)  # layers pickled before it existed: None
        if tiled is None:
            if weight.device.type not in ("cuda", "cpu"):
                return
            on_cuda = weight.device.type == "cuda"
            tiled = on_cuda and tileable(tuple(weight.quant_state.shape)) and self.compute_dtype != torch.float32
        weight.set_tile_order(tiled)

    def _quantized_weight(self) -> Params4bit:
        if getattr(self.weight, "quant_state", None) is None:
            raise RuntimeError(
                f"{type(self).__name__}.weight is not quantized yet: move the layer to its device first "
                "(.to(device), .cuda() or .cpu()), or load a quantized state dict"
            )
        return self.weight

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # the checkpoint holds the bitsandbytes layout: reorder it once, as the layer keeps it
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._arrange_weight()

    def extra_repr(self) -> str:
        w = self.weight
        quant = f"quant_type={w.quant_type}, blocksize={w.blocksize}, compress_statistics={w.compress_statistics}"
        return f"{super().extra_repr()}, {quant}, compute_dtype={self.compute_dtype}"


class LinearFP4(Linear4bit):
    """:class:`Linear4bit` with ``quant_type="fp4"``."""

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | None = None,
        compress_statistics: bool = True,
        quant_storage: torch.dtype = torch.uint8,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            input_features, output_features, bias, compute_dtype, compress_statistics, "fp4", quant_storage, device
        )


class LinearNF4(Linear4bit):
    """:class:`Linear4bit` with ``quant_type="nf4"``."""

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | None = None,
        compress_statistics: bool = True,
        quant_storage: torch.dtype = torch.uint8,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            input_features, output_features, bias, compute_dtype, compress_statistics, "nf4", quant_storage, device
        )
