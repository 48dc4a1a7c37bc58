"""``Params4bit``: a weight that quantizes itself to 4 bits on its first move to a device.

The parameter owns its :class:`~cupyquant.torch.functional.QuantState`; modules read it
from there. The helpers at the bottom save and load a 4-bit weight in bitsandbytes'
checkpoint layout for any module that holds one (``Linear4bit``, ``Embedding4bit``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from ..tiled_4bit import check_tile_shape
from . import functional as F
from ._interop import FLOAT_DTYPES

__all__ = ["Params4bit"]


def _check_settings(blocksize: int, quant_type: str, quant_storage: torch.dtype) -> None:
    F.check_choice("blocksize", blocksize, F.BLOCKSIZES_4BIT)
    F.check_choice("quant_type", quant_type, F.QUANT_TYPES)
    F.check_choice("quant_storage", quant_storage, F.QUANT_STORAGE_DTYPES)


class QuantizingMoves:
    """``cuda`` / ``cpu`` / ``half`` / ``bfloat16`` / ``float`` of a parameter that quantizes
    itself on its first move (:class:`Params4bit`, ``Int8Params``): the moves go through the
    subclass's ``to``, and the float conversions leave quantized codes as they are. Mix in
    before ``torch.nn.Parameter``; the subclass says when it holds codes (``_holds_codes``)."""

    def _holds_codes(self) -> bool:
        raise NotImplementedError

    def cuda(self, device: int | torch.device | str | None = None, non_blocking: bool = False) -> Tensor:
        """``.to(device or "cuda")``: quantizes float data there on the first move."""
        return self.to(device="cuda" if device is None else device, non_blocking=non_blocking)

    def cpu(self) -> Tensor:
        """``.to("cpu")``: quantizes float data there on the first move."""
        return self.to(device="cpu")

    def _same_unless_float(self, convert: Any) -> Tensor:
        return self if self._holds_codes() else convert()

    def half(self) -> Tensor:
        """float16 of float data; quantized codes unchanged."""
        return self._same_unless_float(super().half)

    def bfloat16(self) -> Tensor:
        """bfloat16 of float data; quantized codes unchanged."""
        return self._same_unless_float(super().bfloat16)

    def float(self) -> Tensor:
        """float32 of float data; quantized codes unchanged."""
        return self._same_unless_float(super().float)


class Params4bit(QuantizingMoves, torch.nn.Parameter):
    """A frozen weight stored as packed 4-bit codes plus a QuantState (bitsandbytes' ``Params4bit``).

    Until quantized it holds the float weight; the first ``.to(device)``, ``.cuda()`` or
    ``.cpu()`` quantizes it there (``bnb_quantized`` then becomes True). Later moves
    carry the packed bytes and the QuantState (moved in place, shared with the returned
    parameter, so ``nn.Module.to`` keeps both together) without re-quantizing; dtype
    conversions leave the packed bytes alone.

    Args:
        data: the float weight, or packed codes when ``bnb_quantized`` is True.
        requires_grad: must be False once quantized (the codes get no gradient).
        quant_state: the QuantState of packed ``data``.
        blocksize: 32, 64, ..., 4096.
        compress_statistics: double-quantize absmax (nested state).
        quant_type: "nf4" or "fp4".
        quant_storage: dtype the packed bytes are viewed as.
        module: the module holding this weight (kept for bitsandbytes compatibility).
        bnb_quantized: whether ``data`` already holds packed codes.
    """

    def __new__(
        cls,
        data: Tensor | None = None,
        requires_grad: bool = False,
        quant_state: F.QuantState | None = None,
        blocksize: int = 64,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        module: torch.nn.Module | None = None,
        bnb_quantized: bool = False,
    ) -> Params4bit:
        if data is None:
            data = torch.empty(0)
        if not isinstance(data, Tensor):
            raise TypeError(f"data must be a torch.Tensor, got {type(data).__name__}")
        _check_settings(blocksize, quant_type, quant_storage)
        if quant_state is not None:
            F.check_state(quant_state)
        if requires_grad and (bnb_quantized or not data.is_floating_point()):
            raise ValueError(
                f"requires_grad must be False for packed 4-bit codes (they get no gradient), got requires_grad=True "
                f"with {data.dtype} data and bnb_quantized={bnb_quantized}"
            )
        self = torch.Tensor._make_subclass(cls, data.detach(), requires_grad)
        self.blocksize = blocksize
        self.compress_statistics = compress_statistics
        self.quant_type = quant_type
        self.quant_state = quant_state
        self.quant_storage = quant_storage
        self.bnb_quantized = bnb_quantized
        self.module = module
        return self

    @classmethod
    def from_float(
        cls,
        weight: Tensor,
        device: torch.device | str | None = None,
        blocksize: int = 64,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
    ) -> Params4bit:
        """Quantize a float32 / float16 / bfloat16 ``weight`` now, on ``device`` (default
        the weight's own device)."""
        param = cls(
            weight,
            requires_grad=False,
            blocksize=blocksize,
            compress_statistics=compress_statistics,
            quant_type=quant_type,
            quant_storage=quant_storage,
        )
        return param._quantize(weight.device if device is None else torch.device(device))

    @classmethod
    def from_prequantized(
        cls,
        data: Tensor,
        quantized_stats: dict[str, Any],
        requires_grad: bool = False,
        device: torch.device | str = "cuda",
        module: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Params4bit:
        """A quantized parameter from packed codes and their QuantState entries.

        Args:
            data: packed codes of any storage dtype, shape ``(elements, 1)``.
            quantized_stats: ``QuantState.as_dict(packed=True)`` entries (the
                ``weight.*`` keys of a checkpoint, with or without the prefix).
            device: where the parameter and its state go.
        """
        if not isinstance(data, Tensor):
            raise TypeError(f"data must be a torch.Tensor, got {type(data).__name__}")
        quant_state = F.QuantState.from_dict(quantized_stats, device=device)
        storage_dtype = data.dtype
        F.check_choice("quant_storage (the dtype of data)", storage_dtype, F.QUANT_STORAGE_DTYPES)
        n = 1
        for s in quant_state.shape:
            n *= int(s)
        needed = F.packed_elements(n, storage_dtype)
        if data.numel() < needed:
            raise ValueError(
                f"data holds {data.numel()} {storage_dtype} elements but quant_state.shape {quant_state.shape} "
                f"needs {needed}"
            )
        return cls(
            data.to(device),
            requires_grad=requires_grad,
            quant_state=quant_state,
            blocksize=quant_state.blocksize,
            compress_statistics=quant_state.nested,
            quant_type=quant_state.quant_type,
            quant_storage=storage_dtype,
            module=module,
            bnb_quantized=True,
        )

    # -- quantization and moves ---------------------------------------------------------
    def _quantize(self, device: torch.device) -> Params4bit:
        """Quantize the float data on ``device``, in place; returns self."""
        if self.data.dtype not in FLOAT_DTYPES:
            raise ValueError(f"Params4bit can quantize float32, float16 or bfloat16 data, got {self.data.dtype}")
        weight = self.data.contiguous().to(device)
        packed, state = F.quantize_4bit(
            weight,
            blocksize=self.blocksize,
            compress_statistics=self.compress_statistics,
            quant_type=self.quant_type,
            quant_storage=self.quant_storage,
        )
        self.requires_grad_(False)
        self.data = packed
        self.quant_state = state
        self.bnb_quantized = True
        return self

    def _copy_with(self, data: Tensor) -> Params4bit:
        return type(self)(
            data,
            requires_grad=self.requires_grad,
            quant_state=self.quant_state,
            blocksize=self.blocksize,
            compress_statistics=self.compress_statistics,
            quant_type=self.quant_type,
            quant_storage=self.quant_storage,
            module=self.module,
            bnb_quantized=self.bnb_quantized,
        )

    def to(self, *args: Any, **kwargs: Any) -> Params4bit:
        """Like ``Tensor.to``; the first move of float data to a cpu/cuda device quantizes it."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if not self.bnb_quantized:
            if device is not None and device.type in ("cuda", "cpu"):
                if dtype is not None and dtype in FLOAT_DTYPES:
                    self.data = self.data.to(dtype=dtype)
                return self._quantize(device)
            return self._copy_with(super().to(device=device, dtype=dtype, non_blocking=non_blocking))
        # Packed bytes: never convert their dtype (it is only a view of the codes).
        if device is not None and self.quant_state is not None:
            self.quant_state.to(device)
        return self._copy_with(super().to(device=device, non_blocking=non_blocking))

    def _holds_codes(self) -> bool:
        return self.bnb_quantized

    def set_tile_order(self, tiled: bool) -> None:
        """Reorder the packed bytes into (``tiled``) or out of the tile order of
        :mod:`cupyquant.tiled_4bit` and record it in the QuantState (``quant_state.tiled``);
        nothing when they already are. The bytes go to a new tensor of the same shape and
        dtype on the same device (one copy); the QuantState is shared, so the parameters
        that share it (``.to`` returns one) must share the bytes too: use the module's."""
        state = self.quant_state
        if not self.bnb_quantized or state is None:
            raise RuntimeError("the weight is not quantized yet: move it to its device first")
        if state.tiled == tiled:
            return
        check_tile_shape(state.shape)
        self.data = tile_order_copy(self.data, state.shape, to_tiles=tiled)
        state.tiled = tiled

    def double(self) -> Tensor:
        """float64 data before quantization; the packed codes unchanged after."""
        return self._same_unless_float(super().double)

    # -- copies and pickling --------------------------------------------------------------
    _ATTRS = ("blocksize", "compress_statistics", "quant_type", "quant_state", "quant_storage", "bnb_quantized")

    def __getstate__(self) -> dict[str, Any]:
        state = {name: getattr(self, name) for name in self._ATTRS}
        state["data"] = self.data
        state["requires_grad"] = self.requires_grad
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.requires_grad = state["requires_grad"]
        for name in self._ATTRS:
            setattr(self, name, state[name])
        self.data = state["data"]
        self.module = None

    def __reduce_ex__(self, protocol: int) -> tuple:
        # nn.Parameter pickles as a plain Parameter; rebuild this class with its state.
        state = self.__getstate__()
        return (_rebuild_params4bit, (state.pop("data"), state))

    def __deepcopy__(self, memo: dict[int, Any]) -> Params4bit:
        if id(self) in memo:
            return memo[id(self)]
        new = type(self)(
            self.data.clone(memory_format=torch.preserve_format),
            requires_grad=self.requires_grad,
            quant_state=copy.deepcopy(self.quant_state, memo),
            blocksize=self.blocksize,
            compress_statistics=self.compress_statistics,
            quant_type=self.quant_type,
            quant_storage=self.quant_storage,
            bnb_quantized=self.bnb_quantized,
        )
        memo[id(self)] = new
        return new

    def __copy__(self) -> Params4bit:
        return self._copy_with(self.data)


def tile_order_copy(data: Tensor, shape: tuple[int, int], to_tiles: bool) -> Tensor:
    """A copy of packed codes ``data`` (any storage dtype, contiguous) of an (N, K) weight
    with its first N * K / 2 bytes put into (``to_tiles``) or out of the tile order of
    :mod:`cupyquant.tiled_4bit`; any padding bytes after them are copied as they are.
    (``tiled_4bit.tile_bytes`` / ``untile_bytes`` reorder NumPy and CuPy arrays into a new
    array; here torch permutes straight into the destination: one copy, on the tensor's
    own device and stream.)"""
    N, K = shape
    n = N * K // 2
    src = data.contiguous().reshape(-1).view(torch.uint8)
    out = torch.empty_like(data, memory_format=torch.contiguous_format)
    dst = out.reshape(-1).view(torch.uint8)
    blocks = (N // 16, 16, K // 128, 64) if to_tiles else (N // 16, K // 128, 16, 64)
    dst[:n].view(N // 16, blocks[2], blocks[1], 64).copy_(src[:n].view(blocks).permute(0, 2, 1, 3))
    dst[n:].copy_(src[n:])
    return out


def _rebuild_params4bit(data: Tensor, state: dict[str, Any]) -> Params4bit:
    attrs = {k: v for k, v in state.items() if k in Params4bit._ATTRS}
    return Params4bit(data, requires_grad=state["requires_grad"], **attrs)


# ---------------------------------------------------------------------------------------
# bitsandbytes' checkpoint layout for a module's 4-bit ``weight``
# ---------------------------------------------------------------------------------------
def save_weight_state(module: torch.nn.Module, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
    """Add ``weight.absmax``, ``weight.quant_map``, ... (the packed QuantState) after
    the ``weight`` entry nn.Module wrote (replaced by a bitsandbytes-layout copy when the
    weight is in tile order). Nothing for a weight not yet quantized."""
    state = getattr(module.weight, "quant_state", None)
    if state is None:
        return
    if state.tiled:  # checkpoints hold the bitsandbytes layout
        destination[prefix + "weight"] = tile_order_copy(module.weight.data, state.shape, to_tiles=False)
    for key, value in state.as_dict(packed=True).items():
        destination[prefix + "weight." + key] = value if keep_vars else value.detach()


def load_weight_state(
    module: torch.nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
    float_shape: tuple[int, ...],
    load_others: Any,
) -> None:
    """``_load_from_state_dict`` for a module whose ``weight`` is a :class:`Params4bit`.

    Reads a quantized checkpoint (``weight`` packed plus ``weight.*`` QuantState
    entries, as bitsandbytes writes) or a float one (``weight`` of ``float_shape``, e.g.
    from ``nn.Linear``) into the module, whether or not it was quantized yet; a layer
    already quantized re-quantizes a float weight on its device. ``load_others`` is
    nn.Module's own loader, run for every other entry with the weight set aside.
    """
    key = prefix + "weight"
    current = module._parameters["weight"]
    # nn.Module's loader would shape-check and copy into the old weight; this function
    # replaces it, so the loader sees no weight and its report about it is dropped.
    module._parameters["weight"] = None
    reported = len(unexpected_keys)
    try:
        load_others(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
    finally:
        module._parameters["weight"] = current
    unexpected_keys[reported:] = [k for k in unexpected_keys[reported:] if k != key and not k.startswith(key + ".")]
    if key not in state_dict:
        if strict:
            missing_keys.append(key)
        return
    data = state_dict[key]
    assign = bool(local_metadata.get("assign_to_params_buffers", False))
    device = data.device if assign or current.device.type == "meta" else current.device
    stats = {k[len(key) + 1 :]: v for k, v in state_dict.items() if k.startswith(key + ".")}
    try:
        if stats:
            loaded = _load_quantized(data, stats, device, copy_tensors=not assign)
            if tuple(loaded.quant_state.shape) != tuple(float_shape):
                raise ValueError(
                    f"size mismatch for {key}: the checkpoint holds a quantized {tuple(loaded.quant_state.shape)} "
                    f"weight, the module needs {tuple(float_shape)}"
                )
        else:
            loaded = _load_float(current, data, device, float_shape, key, convert=not assign)
    except (ValueError, TypeError) as exc:
        error_msgs.append(f"While loading {key}: {exc}")
        return
    loaded.module = module
    module.weight = loaded


class PackedWeightStateDict:
    """Mixin for a module whose ``weight`` is a :class:`Params4bit`: its state dict uses
    bitsandbytes' layout (see :func:`save_weight_state` and :func:`load_weight_state`).
    Put it before the torch module class in the bases; the module names the float
    weight's shape in ``float_weight_shape``."""

    def float_weight_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        save_weight_state(self, destination, prefix, keep_vars)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        load_weight_state(
            self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs,
            self.float_weight_shape(), super()._load_from_state_dict,
        )  # fmt: skip


def _load_quantized(data: Tensor, stats: dict[str, Any], device: torch.device, copy_tensors: bool) -> Params4bit:
    if copy_tensors:
        # a loaded module must not share memory with the caller's state dict
        data = data.to(device, copy=True)
        stats = {k: v.to(device, copy=True) if isinstance(v, Tensor) else v for k, v in stats.items()}
    return Params4bit.from_prequantized(data, stats, requires_grad=False, device=device)


def _load_float(
    current: Tensor, data: Tensor, device: torch.device, float_shape: tuple[int, ...], key: str, convert: bool
) -> Params4bit:
    if tuple(data.shape) != tuple(float_shape):
        raise ValueError(
            f"size mismatch for {key}: copying a param with shape {tuple(data.shape)} from checkpoint, "
            f"the shape in current model is {tuple(float_shape)}"
        )
    if data.dtype not in FLOAT_DTYPES:
        raise ValueError(f"a float {key} must be float32, float16 or bfloat16, got {data.dtype}")
    quantized = getattr(current, "bnb_quantized", False)
    dtype = current.dtype if convert and not quantized and current.dtype in FLOAT_DTYPES else data.dtype
    settings = {
        name: getattr(current, name) for name in ("blocksize", "compress_statistics", "quant_type", "quant_storage")
    }
    weight = Params4bit(data.to(device=device, dtype=dtype, copy=convert), requires_grad=False, **settings)
    if quantized and device.type != "meta":
        weight._quantize(device)
    return weight
