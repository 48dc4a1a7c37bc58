"""QuantState: everything needed to dequantize a blockwise-quantized array.

The same class holds NumPy, CuPy or (through ``cupyquant.torch``) torch arrays: it
never looks inside them except to serialise. ``as_dict(packed=True)`` gives exactly
bitsandbytes' checkpoint entries, so states round-trip with bitsandbytes files.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np

from . import _xp

VALID_QUANT_TYPES = ("fp4", "nf4")
_PACKED_KEY_PREFIX = "quant_state.bitsandbytes__"
_VALID_KEYS = (
    "absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state", "quant_type",
    "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset",
)  # fmt: skip


def dtype_name(dtype: Any) -> str:
    """'float16' for np.float16, torch.float16, 'float16' alike."""
    if isinstance(dtype, str):
        return dtype
    text = str(dtype)
    if text.startswith("torch."):
        return text[len("torch.") :]
    return np.dtype(dtype).name


def _array_module_name(a: Any) -> str:
    return type(a).__module__.split(".")[0]


def _bytes_array_like(like: Any, data: bytes) -> Any:
    """A uint8 array of ``data`` of the same kind and device as ``like``."""
    host = np.frombuffer(data, dtype=np.uint8).copy()
    kind = _array_module_name(like)
    if kind == "cupy":
        with like.device:
            return _xp.cupy().asarray(host)
    if kind == "torch":
        torch = sys.modules["torch"]
        return torch.from_numpy(host).to(like.device)
    return host


def _bytes_of(a: Any) -> bytes:
    kind = _array_module_name(a)
    if kind == "cupy":
        return a.get().tobytes()
    if kind == "torch":
        return a.detach().cpu().numpy().tobytes()
    return np.asarray(a).tobytes()


def _scalar(a: Any) -> float:
    """A Python float of a 0-d / 1-element array or a number (syncs a device array)."""
    if hasattr(a, "item"):
        return float(a.item())
    return float(a)


def _same_values(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    if _array_module_name(a) != _array_module_name(b):
        return False
    if tuple(a.shape) != tuple(b.shape) or dtype_name(a.dtype) != dtype_name(b.dtype):
        return False
    kind = _array_module_name(a)
    if kind == "torch":
        return bool((a == b).all().item()) if a.numel() else True
    xp = _xp.array_module(a)
    return bool(xp.array_equal(a, b, equal_nan=a.dtype.kind == "f"))


class QuantState:
    """State of a blockwise quantization (bitsandbytes' ``QuantState`` layout).

    Attributes:
        absmax: float32[blocks] scales, or uint8[blocks] codes when ``nested``.
        shape: shape of the original array (a tuple), or None.
        code: the codebook, float32[16] (4-bit) or float32[256] (8-bit).
        blocksize: elements per block.
        quant_type: "nf4", "fp4", or None for 8-bit blockwise states.
        dtype: the original array's dtype (a name, or a torch dtype in the adapter).
        offset: for nested states, the float32 0-d mean subtracted before compressing absmax.
        state2: for nested states, the QuantState of the compressed absmax (blocksize 256).
    """

    def __init__(
        self,
        absmax: Any,
        shape: tuple[int, ...] | None = None,
        code: Any = None,
        blocksize: int | None = None,
        quant_type: str | None = None,
        dtype: Any = None,
        offset: Any = None,
        state2: QuantState | None = None,
    ) -> None:
        if quant_type is not None and quant_type not in VALID_QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {VALID_QUANT_TYPES} or None, got {quant_type!r}")
        if (offset is None) != (state2 is None):
            raise ValueError("a nested QuantState needs both offset and state2 (or neither)")
        self.absmax = absmax
        self.shape = tuple(int(s) for s in shape) if shape is not None else None
        self.code = code
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.dtype = dtype
        self.offset = offset
        self.state2 = state2

    @property
    def nested(self) -> bool:
        """True when absmax is itself 8-bit quantized (double quantization)."""
        return self.state2 is not None

    # -- hooks the torch adapter overrides ------------------------------------------
    @classmethod
    def _move(cls, a: Any, device: Any) -> Any:
        """Put an array on ``device``: None keeps it, "cpu" gives NumPy, "cuda[:i]" / int CuPy."""
        if device is None or a is None:
            return a
        if _array_module_name(a) == "torch":
            a = a.detach().cpu().numpy()
        if device == "cpu":
            return a.get() if _xp.is_cupy_array(a) else np.asarray(a)
        cp = _xp.cupy()
        index = device if isinstance(device, int) else int(str(device).partition(":")[2] or 0)
        with cp.cuda.Device(index):
            return cp.asarray(a)

    @classmethod
    def _make_dtype(cls, name: str) -> Any:
        return name

    @classmethod
    def _make_offset(cls, value: float, like: Any) -> Any:
        kind = _array_module_name(like)
        if kind == "cupy":
            with like.device:
                return _xp.cupy().asarray(np.float32(value))
        return np.asarray(np.float32(value))

    # -- serialisation --------------------------------------------------------------
    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The state as bitsandbytes' dict.

        ``packed=False``: every field by name. ``packed=True``: only arrays, with the
        non-array fields as UTF-8 JSON in ``quant_state.bitsandbytes__<quant_type>``
        (the checkpoint form). Packing reads ``offset`` (a device sync for GPU arrays).
        """
        if self.quant_type is None:
            raise ValueError("as_dict needs a 4-bit QuantState (quant_type 'nf4' or 'fp4'), got quant_type None")
        qs: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": dtype_name(self.dtype),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            qs.update(
                {
                    "nested_absmax": self.state2.absmax,
                    "nested_blocksize": self.state2.blocksize,
                    "nested_quant_map": self.state2.code,
                    "nested_dtype": dtype_name(self.state2.dtype),
                    "nested_offset": _scalar(self.offset),
                }
            )
        if not packed:
            return qs
        arrays = {k: v for k, v in qs.items() if hasattr(v, "shape") and not isinstance(v, tuple)}
        fields = {k: v for k, v in qs.items() if k not in arrays}
        arrays[_PACKED_KEY_PREFIX + self.quant_type] = _bytes_array_like(
            self.absmax, json.dumps(fields).encode("utf-8")
        )
        return arrays

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device: Any = None) -> QuantState:
        """Rebuild a 4-bit state from ``as_dict`` output, packed or not.

        Keys may carry a module prefix (``"weight.absmax"``). ``device``: None keeps the
        arrays where they are; "cpu" gives NumPy; "cuda", "cuda:1" or 1 gives CuPy.
        """
        packed_keys = [k for k, v in qs_dict.items() if "quant_state" in k and hasattr(v, "shape")]
        if not packed_keys and "quant_type" not in qs_dict:
            raise ValueError("expected packed or unpacked quant_state items, found neither")
        if len(packed_keys) > 1:
            raise ValueError(f"expected one packed quant_state entry, found {len(packed_keys)}: {packed_keys}")
        qs = {k.split(".")[-1]: v for k, v in qs_dict.items() if k not in packed_keys}
        if packed_keys:
            suffix = packed_keys[0].split(".")[-1]
            if suffix not in (f"bitsandbytes__{t}" for t in VALID_QUANT_TYPES):
                raise ValueError(f"unknown packed quant_state key {packed_keys[0]!r}")
            qs.update(json.loads(_bytes_of(qs_dict[packed_keys[0]]).decode("utf-8")))
        unknown = set(qs) - set(_VALID_KEYS)
        if unknown:
            raise ValueError(f"unexpected quant_state keys: {sorted(unknown)}")
        missing = {"absmax", "quant_map", "quant_type", "blocksize", "dtype", "shape"} - set(qs)
        if missing:
            raise ValueError(f"quant_state is missing keys: {sorted(missing)}")
        absmax = cls._move(qs["absmax"], device)
        if "nested_absmax" in qs:
            nested_missing = {"nested_blocksize", "nested_quant_map", "nested_dtype", "nested_offset"} - set(qs)
            if nested_missing:
                raise ValueError(f"nested quant_state is missing keys: {sorted(nested_missing)}")
            nested_absmax = cls._move(qs["nested_absmax"], device)
            state2 = cls(
                absmax=nested_absmax,
                blocksize=int(qs["nested_blocksize"]),
                code=cls._move(qs["nested_quant_map"], device),
                dtype=cls._make_dtype(qs["nested_dtype"]),
            )
            offset = cls._make_offset(float(qs["nested_offset"]), nested_absmax)
        else:
            offset, state2 = None, None
        return cls(
            absmax=absmax,
            shape=tuple(qs["shape"]) if qs["shape"] is not None else None,
            code=cls._move(qs["quant_map"], device),
            blocksize=int(qs["blocksize"]),
            quant_type=qs["quant_type"],
            dtype=cls._make_dtype(qs["dtype"]),
            offset=offset,
            state2=state2,
        )

    def to(self, device: Any) -> QuantState:
        """This state with its arrays moved to ``device`` (in place, like bitsandbytes; returns self)."""
        self.absmax = self._move(self.absmax, device)
        self.code = self._move(self.code, device)
        if self.nested:
            self.offset = self._move(self.offset, device)
            self.state2.to(device)
        return self

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantState):
            return NotImplemented
        return (
            self.quant_type == other.quant_type
            and self.blocksize == other.blocksize
            and self.shape == other.shape
            and (self.dtype is None) == (other.dtype is None)
            and (self.dtype is None or dtype_name(self.dtype) == dtype_name(other.dtype))
            and _same_values(self.absmax, other.absmax)
            and _same_values(self.code, other.code)
            and self.nested == other.nested
            and (not self.nested or (_scalar(self.offset) == _scalar(other.offset) and self.state2 == other.state2))
        )

    __hash__ = None  # mutable, compared by value

    def __repr__(self) -> str:
        kind = self.quant_type or "8-bit"
        return (
            f"QuantState({kind}, blocksize={self.blocksize}, shape={self.shape}, "
            f"dtype={dtype_name(self.dtype) if self.dtype is not None else None}, nested={self.nested})"
        )
