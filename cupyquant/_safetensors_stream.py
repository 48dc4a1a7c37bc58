"""Read and write safetensors files one tensor at a time.

A checkpoint may be larger than free memory, so neither side ever holds more than one
tensor (copies of unchanged tensors go through in fixed-size chunks).

Reading: ``safetensors.safe_open`` validates the file (header, offsets, sizes); the
bytes of each tensor are then read straight from its offsets, because the NumPy side of
safetensors cannot represent bfloat16 without ``ml_dtypes``, while the kernels want its
raw uint16 bits anyway.

Writing: the file layout is the 8-byte header length, the JSON header, then the tensor
bytes. The header holds every tensor's offsets, and one entry per quantized 4-bit weight
(the quant_state JSON) has a length known only after quantizing. So the writer reserves
room for a header of bounded size up front, streams the tensors after it, and fills the
header in at the end, padded with spaces, which the format allows.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

__all__ = [
    "SafetensorsError",
    "TensorSpec",
    "SafetensorsReader",
    "SafetensorsStreamWriter",
    "header_size_bound",
    "DTYPE_SIZES",
]

# Bytes per element of each safetensors dtype.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip

# The NumPy dtype that holds each safetensors dtype's bytes (little-endian, as the
# format stores them). bfloat16 and the 8-bit floats are held as their raw bits.
_NUMPY_DTYPES = {
    "BOOL": "?", "U8": "u1", "I8": "i1", "F8_E5M2": "u1", "F8_E4M3": "u1", "F8_E8M0": "u1",
    "I16": "<i2", "U16": "<u2", "F16": "<f2", "BF16": "<u2",
    "I32": "<i4", "U32": "<u4", "F32": "<f4",
    "I64": "<i8", "U64": "<u8", "F64": "<f8", "C64": "<c8",
}  # fmt: skip

_NUMPY_TO_SAFETENSORS = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16",
                         "float16": "F16", "int32": "I32", "uint32": "U32", "float32": "F32", "int64": "I64",
                         "uint64": "U64", "float64": "F64", "complex64": "C64"}  # fmt: skip

_HEADER_ALIGN = 8  # the data section starts 8-byte aligned, as safetensors' own writer keeps it
_COPY_CHUNK = 64 << 20  # bytes per read when copying a tensor unchanged
_MAX_HEADER = 100_000_000  # safetensors refuses larger headers


class SafetensorsError(ValueError):
    """A file that is not a valid safetensors file, or a tensor that does not fit its entry."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a safetensors file: name, safetensors dtype ("F32", "BF16", ...), shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Number of elements (1 for a 0-d tensor)."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.numel * DTYPE_SIZES[self.dtype]


def safetensors_dtype(dtype: Any) -> str:
    """The safetensors dtype name of a NumPy dtype ("float32" -> "F32")."""
    name = np.dtype(dtype).name
    if name not in _NUMPY_TO_SAFETENSORS:
        raise ValueError(f"dtype must be one of {sorted(_NUMPY_TO_SAFETENSORS)}, got {name}")
    return _NUMPY_TO_SAFETENSORS[name]


class SafetensorsReader:
    """Tensors of a safetensors file, read one at a time.

    Args:
        path: the file. A missing file raises FileNotFoundError; a file that is not
            valid safetensors raises :class:`SafetensorsError`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        if os.path.isdir(self.path):
            raise SafetensorsError(f"{self.path} is a directory, not a safetensors file")
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"no such file: {self.path}")
        _validate(self.path)
        with open(self.path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        self._data_start = 8 + length
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
        self._offsets: dict[str, tuple[int, int]] = {}
        self._specs: dict[str, TensorSpec] = {}
        for name, entry in entries:
            self._specs[name] = TensorSpec(name, entry["dtype"], tuple(int(s) for s in entry["shape"]))
            self._offsets[name] = (int(entry["data_offsets"][0]), int(entry["data_offsets"][1]))

    def names(self) -> list[str]:
        """Tensor names in the order their bytes appear in the file."""
        return list(self._specs)

    def spec(self, name: str) -> TensorSpec:
        """Name, dtype and shape of a tensor."""
        return self._specs[name]

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    @property
    def file_size(self) -> int:
        """Size of the file in bytes."""
        return os.path.getsize(self.path)

    def read(self, name: str) -> np.ndarray:
        """The tensor as a NumPy array of its shape (bfloat16 and 8-bit floats as raw bits)."""
        spec = self._specs[name]
        if spec.dtype not in _NUMPY_DTYPES:
            raise SafetensorsError(f"dtype of {name!r} must be one of {sorted(_NUMPY_DTYPES)}, got {spec.dtype}")
        start, _ = self._offsets[name]
        with open(self.path, "rb") as f:
            f.seek(self._data_start + start)
            data = np.fromfile(f, dtype=np.dtype(_NUMPY_DTYPES[spec.dtype]), count=spec.numel)
        return data.reshape(spec.shape)

    def chunks(self, name: str, chunk_bytes: int | None = None) -> Iterator[bytes]:
        """The tensor's raw bytes in pieces of at most ``chunk_bytes`` (default 64 MiB)."""
        chunk_bytes = _COPY_CHUNK if chunk_bytes is None else chunk_bytes
        start, end = self._offsets[name]
        with open(self.path, "rb") as f:
            f.seek(self._data_start + start)
            left = end - start
            while left > 0:
                piece = f.read(min(left, chunk_bytes))
                if not piece:
                    raise SafetensorsError(f"{self.path} ends inside tensor {name!r}")
                left -= len(piece)
                yield piece


def _validate(path: str) -> None:
    """Let the safetensors library check the header and offsets; one error type for all failures."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise ImportError("reading safetensors files needs the safetensors package: pip install safetensors") from None
    try:
        with safe_open(path, framework="numpy") as f:
            f.keys()
    except Exception as exc:  # noqa: BLE001 - the library raises several types for a bad file
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SafetensorsError(f"{path} is not a valid safetensors file ({first_line})") from None


def _header_bytes(entries: Iterable[tuple[TensorSpec, int, int]], metadata: dict[str, str] | None) -> bytes:
    """The header JSON of tensors at the given offsets (compact separators)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    for spec, start, end in entries:
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [start, end]}
    return json.dumps(header, separators=(",", ":")).encode("utf-8")


def header_size_bound(specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> int:
    """Bytes to reserve for the header of a file holding ``specs`` (in any order).

    A spec may overstate a tensor's shape (e.g. the longest a JSON entry can be): every
    number in the real header is then no longer than in this bound. The bound counts
    every offset as wide as the largest possible offset.
    """
    total = sum(spec.nbytes for spec in specs)
    entries = [(spec, total, total) for spec in specs]
    return _aligned(8 + len(_header_bytes(entries, metadata))) - 8


def _aligned(n: int) -> int:
    """``n`` rounded up to the data alignment."""
    return -(-n // _HEADER_ALIGN) * _HEADER_ALIGN


class SafetensorsStreamWriter:
    """Write a safetensors file tensor by tensor into an open binary file.

    ``header_reserve`` bytes (see :func:`header_size_bound`) are left for the header;
    :meth:`write` and :meth:`copy` append tensors, :meth:`finish` writes the header
    into the reserved room. The file is only valid after :meth:`finish`.

    Args:
        f: a binary file opened for writing, positioned at 0, seekable.
        header_reserve: room for the header JSON, a multiple of 8.
        metadata: string-to-string metadata (``__metadata__``).
    """

    def __init__(self, f: BinaryIO, header_reserve: int, metadata: dict[str, str] | None = None) -> None:
        if header_reserve % _HEADER_ALIGN or header_reserve <= 0:
            raise ValueError(f"header_reserve must be a positive multiple of {_HEADER_ALIGN}, got {header_reserve}")
        if header_reserve > _MAX_HEADER:
            raise ValueError(f"header_reserve must be at most {_MAX_HEADER} bytes, got {header_reserve}")
        for key, value in (metadata or {}).items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"metadata must map str to str, got {key!r}: {type(value).__name__}")
        self._f = f
        self._reserve = header_reserve
        self._metadata = dict(metadata or {})
        self._entries: list[tuple[TensorSpec, int, int]] = []
        self._names: set[str] = set()
        self._offset = 0
        f.write(b" " * (8 + header_reserve))

    def _add(self, spec: TensorSpec) -> None:
        """Record a tensor's header entry at the current end of the data."""
        if spec.dtype not in DTYPE_SIZES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_SIZES)}, got {spec.dtype!r}")
        if spec.name in self._names:
            raise ValueError(f"tensor names must be unique, got {spec.name!r} twice")
        self._names.add(spec.name)
        self._entries.append((spec, self._offset, self._offset + spec.nbytes))
        self._offset += spec.nbytes

    def write(self, name: str, array: np.ndarray, dtype: str | None = None) -> None:
        """Append a NumPy array (C order). ``dtype`` overrides the safetensors dtype,
        e.g. "BF16" for bfloat16 bits held as uint16."""
        shape = tuple(int(s) for s in np.shape(array))
        # (np.ascontiguousarray alone would turn a 0-d array into shape (1,))
        array = np.ascontiguousarray(array).reshape(shape)
        dtype = dtype or safetensors_dtype(array.dtype)
        if DTYPE_SIZES.get(dtype) != array.dtype.itemsize:
            raise ValueError(f"dtype {dtype} needs {DTYPE_SIZES.get(dtype)}-byte elements, got {array.dtype}")
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        self._add(TensorSpec(name, dtype, shape))
        self._f.write(memoryview(array.reshape(-1)).cast("B"))

    def copy(self, reader: SafetensorsReader, name: str, new_name: str | None = None) -> None:
        """Append a tensor of ``reader`` unchanged, copied in chunks."""
        spec = reader.spec(name)
        self._add(TensorSpec(new_name or name, spec.dtype, spec.shape))
        for piece in reader.chunks(name):
            self._f.write(piece)

    @property
    def data_bytes(self) -> int:
        """Bytes of tensor data written so far."""
        return self._offset

    def finish(self) -> None:
        """Write the header into its reserved room (padded with spaces) and flush."""
        header = _header_bytes(self._entries, self._metadata)
        if len(header) > self._reserve:
            raise SafetensorsError(
                f"the header needs {len(header)} bytes but only {self._reserve} were reserved; "
                "header_size_bound was given smaller specs than were written"
            )
        self._f.seek(0)
        self._f.write(struct.pack("<Q", self._reserve))
        self._f.write(header + b" " * (self._reserve - len(header)))
        self._f.seek(0, os.SEEK_END)
        self._f.flush()
