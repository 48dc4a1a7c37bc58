"""Quantize and inspect safetensors checkpoints (the work behind ``cupyquant quantize`` / ``inspect``).

A checkpoint is processed one tensor at a time: each 2-D floating ``*.weight`` is read,
quantized (on the GPU when one is usable, else with the NumPy path; both give the same
bytes), dequantized once to measure its error, and written in bitsandbytes' state-dict
layout; every other tensor is copied through unchanged. The output is written to a
temporary file beside it and renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import _reference as ref
from . import _xp
from ._safetensors_stream import (
    SafetensorsReader,
    SafetensorsStreamWriter,
    TensorSpec,
    header_size_bound,
)
from .blockwise import BLOCKSIZES_4BIT, dequantize_4bit_bits, quantize_4bit_bits
from .int8 import int8_vectorwise_dequant_bits, int8_vectorwise_quant_bits

__all__ = [
    "FORMATS",
    "COMPUTE_DTYPES",
    "CheckpointError",
    "QuantizeOptions",
    "TensorReport",
    "InspectRow",
    "quantization_config",
    "quantize_checkpoint",
    "inspect_checkpoint",
]

FORMATS = ("nf4", "fp4", "int8")
# Accepted spellings of the 4-bit compute dtype -> the name transformers' config stores.
COMPUTE_DTYPES = {
    "fp32": "float32", "float32": "float32",
    "fp16": "float16", "float16": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}  # fmt: skip
LLM_INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold, transformers' default

# safetensors dtype -> the kernels' float format. float64 is quantized through float32
# (the kernels read 16- and 32-bit floats only).
_FLOAT_INPUTS = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float32"}
_SAFETENSORS_OF_FORMAT = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_PACKED_PREFIX = "quant_state.bitsandbytes__"
# The longest repr of a Python float ("-2.2250738585072014e-308"): bounds the length of
# the nested offset in a quant_state JSON entry.
_MAX_FLOAT_REPR = 24
# Elements per step of the error sum (four float64 temporaries of this size): small on
# the CPU so memory stays near one tensor's size; larger on the GPU, where each step
# ends in a device sync.
_ERROR_CHUNK = {"numpy": 1 << 18, "cupy": 1 << 24}


class CheckpointError(ValueError):
    """A checkpoint or option the command cannot work with (the message says which and why)."""


@dataclass(frozen=True)
class QuantizeOptions:
    """What ``quantize_checkpoint`` makes.

    Attributes:
        fmt: "nf4", "fp4" or "int8" (LLM.int8 row-wise).
        blocksize: 4-bit blocksize, one of ``BLOCKSIZES_4BIT``.
        double_quant: 4-bit only: also quantize the absmax (nested state).
        compute_dtype: 4-bit compute dtype recorded in the config ("float32", "float16", "bfloat16").
        skip: module-name patterns left unquantized (transformers' ``llm_int8_skip_modules`` rules).
    """

    fmt: str
    blocksize: int = 64
    double_quant: bool = False
    compute_dtype: str = "float32"
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Check every option; errors name the constraint and the value."""
        if self.fmt not in FORMATS:
            raise CheckpointError(f"format must be one of {FORMATS}, got {self.fmt!r}")
        if self.blocksize not in BLOCKSIZES_4BIT:
            raise CheckpointError(f"blocksize must be one of {BLOCKSIZES_4BIT}, got {self.blocksize}")
        if self.compute_dtype not in COMPUTE_DTYPES.values():
            raise CheckpointError(f"compute dtype must be one of {tuple(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        for pattern in self.skip:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise CheckpointError(
                    f"skip pattern must be a valid regular expression, got {pattern!r} ({exc})"
                ) from None


@dataclass
class TensorReport:
    """One input tensor's fate: ``action`` is the format it was quantized to, or
    "kept" with ``note`` saying why. ``rel_error`` is ||W - deq(W)|| / ||W|| (None when kept)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    action: str
    bytes_before: int
    bytes_after: int
    rel_error: float | None = None
    note: str = ""


@dataclass
class _Plan:
    name: str
    spec: TensorSpec
    quantize: bool
    note: str = ""
    outputs: list[TensorSpec] = field(default_factory=list)


def quantization_config(options: QuantizeOptions) -> dict[str, Any]:
    """The ``quantization_config`` transformers' ``BitsAndBytesConfig.to_dict()`` gives for these options."""
    four_bit = options.fmt in ("nf4", "fp4")
    return {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": not four_bit,
        "_load_in_4bit": four_bit,
        "llm_int8_threshold": LLM_INT8_THRESHOLD,
        "llm_int8_skip_modules": list(options.skip) if options.skip else None,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": options.fmt if four_bit else "fp4",
        "bnb_4bit_use_double_quant": bool(options.double_quant and four_bit),
        "bnb_4bit_compute_dtype": options.compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "load_in_4bit": four_bit,
        "load_in_8bit": not four_bit,
    }


def is_skipped(module: str, patterns: Sequence[str]) -> bool:
    """transformers' rule: a pattern matches from the start up to a module boundary
    (as a regex: "layer.1" matches "layer.1.attn", not "layer.11.attn"), or as a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{p}){boundary}", module) or module.endswith(p) for p in patterns)


# ---------------------------------------------------------------------------------------
# planning: what becomes of each tensor, and the size of everything written
# ---------------------------------------------------------------------------------------
def _module_of(name: str) -> str | None:
    """The module prefix of a weight name ("a.b.weight" -> "a.b"; "weight" -> ""), else None."""
    if name == "weight":
        return ""
    if name.endswith(".weight"):
        return name[: -len(".weight")]
    return None


def _decide(spec: TensorSpec, options: QuantizeOptions) -> tuple[bool, str]:
    """(quantize?, why not) for one input tensor."""
    module = _module_of(spec.name)
    if module is None:
        return False, "not a weight"
    if spec.dtype not in _FLOAT_INPUTS:
        return False, f"{spec.dtype} is not a float"
    if len(spec.shape) != 2:
        return False, f"{len(spec.shape)}-D"
    if spec.numel == 0:
        return False, "empty"
    if options.skip and is_skipped(module, options.skip):
        return False, "skipped"
    return True, ""


def _quant_state_json_bound(spec: TensorSpec, fmt: str, options: QuantizeOptions) -> int:
    """The longest the quant_state JSON of this weight can be."""
    fields: dict[str, Any] = {"quant_type": options.fmt, "blocksize": options.blocksize, "dtype": fmt,
                              "shape": list(spec.shape)}  # fmt: skip
    if options.double_quant:
        fields.update({"nested_blocksize": ref.NESTED_BLOCKSIZE, "nested_dtype": "float32", "nested_offset": 0.0})
        return len(json.dumps(fields)) - len("0.0") + _MAX_FLOAT_REPR
    return len(json.dumps(fields))


def _output_specs(spec: TensorSpec, options: QuantizeOptions) -> list[TensorSpec]:
    """What a quantized weight becomes (a JSON entry's length is an upper bound)."""
    prefix = spec.name
    module = prefix[: -len("weight")]
    fmt = _FLOAT_INPUTS[spec.dtype]
    n = spec.numel
    if options.fmt == "int8":
        return [
            TensorSpec(prefix, "I8", spec.shape),
            TensorSpec(module + "SCB", "F32", (spec.shape[0],)),
            TensorSpec(module + "weight_format", "U8", ()),
        ]
    blocks = ref.num_blocks(n, options.blocksize)
    out = [TensorSpec(prefix, "U8", ((n + 1) // 2, 1))]
    out.append(TensorSpec(prefix + ".absmax", "U8" if options.double_quant else "F32", (blocks,)))
    out.append(TensorSpec(prefix + ".quant_map", "F32", (16,)))
    if options.double_quant:
        out.append(TensorSpec(prefix + ".nested_absmax", "F32", (ref.num_blocks(blocks, ref.NESTED_BLOCKSIZE),)))
        out.append(TensorSpec(prefix + ".nested_quant_map", "F32", (256,)))
    json_bound = _quant_state_json_bound(spec, fmt, options)
    out.append(TensorSpec(f"{prefix}.{_PACKED_PREFIX}{options.fmt}", "U8", (json_bound,)))
    return out


def _plan(reader: SafetensorsReader, options: QuantizeOptions) -> list[_Plan]:
    """What becomes of each tensor; refuses inputs whose outputs would collide."""
    if "quantization_config" in reader.metadata:
        raise CheckpointError(f"{reader.path} is already quantized (its metadata holds a quantization_config)")
    plans = []
    for name in reader.names():
        spec = reader.spec(name)
        quantize, note = _decide(spec, options)
        outputs = _output_specs(spec, options) if quantize else [spec]
        plans.append(_Plan(name, spec, quantize, note, outputs))
    seen: dict[str, str] = {}
    for plan in plans:
        for out in plan.outputs:
            if out.name in seen:
                raise CheckpointError(
                    f"output tensor names must be unique, but {out.name!r} comes from both {seen[out.name]!r} and "
                    f"{plan.name!r} (is the input already quantized?)"
                )
            seen[out.name] = plan.name
    return plans


# ---------------------------------------------------------------------------------------
# per-tensor quantization
# ---------------------------------------------------------------------------------------
def _relative_error(ref_bits: Any, ref_fmt: str, deq: Any, deq_fmt: str, xp: Any) -> float:
    """||W - deq|| / ||W|| summed in float64, a chunk at a time (0 when W is all zero)."""
    num = den = 0.0
    chunk = _ERROR_CHUNK["numpy" if xp is np else "cupy"]
    for start in range(0, ref_bits.size, chunk):
        a = ref.to_float32(ref_bits[start : start + chunk], ref_fmt).astype(xp.float64)
        b = ref.to_float32(deq[start : start + chunk], deq_fmt).astype(xp.float64)
        num += float(((a - b) ** 2).sum())
        den += float((a * a).sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return float(np.sqrt(num / den))


def _host(a: Any) -> np.ndarray:
    """A NumPy copy of a NumPy or CuPy array."""
    return a.get() if _xp.is_cupy_array(a) else np.asarray(a)


def _load_bits(reader: SafetensorsReader, spec: TensorSpec, xp: Any) -> tuple[Any, str]:
    """The tensor as a flat storage array on ``xp``'s device, and its float format."""
    host = reader.read(spec.name).reshape(-1)
    if spec.dtype == "F64":
        host = host.astype(np.float32)
    return (host if xp is np else xp.asarray(host)), _FLOAT_INPUTS[spec.dtype]


def _quantize_4bit(
    bits: Any, fmt: str, spec: TensorSpec, options: QuantizeOptions, xp: Any
) -> tuple[list[tuple[str, Any]], float]:
    """(the weight's checkpoint entries, relative error) in NF4 / FP4."""
    packed, state = quantize_4bit_bits(bits, fmt, spec.shape, options.blocksize, options.double_quant, options.fmt)
    deq = xp.empty(bits.size, dtype=_xp.storage_dtype(fmt))
    dequantize_4bit_bits(packed, state, deq)
    error = _relative_error(bits, fmt, deq, fmt, xp)
    entries = [(spec.name, packed.reshape(-1, 1))]
    entries += [(f"{spec.name}.{key}", value) for key, value in state.as_dict(packed=True).items()]
    return entries, error


def _quantize_int8(bits: Any, fmt: str, spec: TensorSpec, xp: Any) -> tuple[list[tuple[str, Any]], float]:
    """(the weight's checkpoint entries, relative error) in LLM.int8 row-wise int8."""
    rows, k = spec.shape
    # Rounded to float16 first, as bitsandbytes' Int8Params (and cupyquant.torch's) does,
    # so the file holds the bytes those layers would.
    half = ref.to_float32(bits, fmt).astype(xp.float16)
    ca, sca, _ = int8_vectorwise_quant_bits(half, "float16", rows, k, 0.0)
    deq = int8_vectorwise_dequant_bits(ca, sca, rows, k)
    error = _relative_error(bits, fmt, deq, "float32", xp)
    module = spec.name[: -len("weight")]
    entries = [
        (spec.name, ca.reshape(rows, k)),
        (module + "SCB", sca),
        (module + "weight_format", np.array(0, np.uint8)),
    ]
    return entries, error


# ---------------------------------------------------------------------------------------
# the command's work
# ---------------------------------------------------------------------------------------
def _temp_path(out: Path) -> Path:
    """A fresh hidden name beside ``out`` (same directory, so the final rename is atomic)."""
    return out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def quantize_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    options: QuantizeOptions,
    use_gpu: bool | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[TensorReport]:
    """Quantize the checkpoint ``src`` into ``dst`` (bitsandbytes' state-dict layout).

    Args:
        src: a safetensors file.
        dst: the output file; written to a temporary file beside it and renamed at the
            end, so it is either complete or untouched (the temporary file is removed on
            any error).
        options: format, blocksize, double quantization, compute dtype, skip patterns.
        use_gpu: True / False, or None for "when ``cupyquant._xp.gpu_available()``".
        progress: called as ``progress("", 0, total)`` once the input is checked and the
            work begins, then ``progress(tensor_name, done, total)`` after each tensor
            (``done`` and ``total`` count input tensor bytes).

    Returns:
        One :class:`TensorReport` per input tensor, in file order.

    Raises:
        FileNotFoundError: ``src`` does not exist.
        CheckpointError: ``src`` is not valid safetensors or cannot be quantized as asked,
            or ``dst`` cannot be written where it is asked for.
    """
    reader = SafetensorsReader(src)
    dst = Path(dst)
    if dst.is_dir():
        raise CheckpointError(f"the output must be a file name, got the directory {str(dst)!r}")
    if not dst.parent.is_dir():
        raise CheckpointError(f"the output's directory must exist, got {str(dst.parent)!r}")
    if dst.exists() and dst.resolve() == Path(reader.path).resolve():
        raise CheckpointError(f"the output must differ from the input, got {str(dst)!r} for both")
    plans = _plan(reader, options)
    use_gpu = _xp.gpu_available() if use_gpu is None else use_gpu
    xp = _xp.cupy() if use_gpu else np
    metadata = dict(reader.metadata)
    metadata["quantization_config"] = json.dumps(quantization_config(options))
    reserve = header_size_bound([out for plan in plans for out in plan.outputs], metadata)

    tmp = _temp_path(dst)
    reports = []
    total = sum(plan.spec.nbytes for plan in plans)
    if progress is not None:
        progress("", 0, total)
    try:
        # O_EXCL: never write through a file someone else made; 0o666 lets the umask decide
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            writer = SafetensorsStreamWriter(f, reserve, metadata)
            done = 0
            for plan in plans:
                reports.append(_process(reader, writer, plan, options, xp))
                done += plan.spec.nbytes
                if progress is not None:
                    progress(plan.name, done, total)
            writer.finish()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        # Interrupts included: a half-written output must never be left behind.
        tmp.unlink(missing_ok=True)
        raise
    return reports


def _process(
    reader: SafetensorsReader, writer: SafetensorsStreamWriter, plan: _Plan, options: QuantizeOptions, xp: Any
) -> TensorReport:
    """Quantize or copy one input tensor into the writer; its report."""
    spec = plan.spec
    if not plan.quantize:
        writer.copy(reader, spec.name)
        return TensorReport(spec.name, spec.shape, spec.dtype, "kept", spec.nbytes, spec.nbytes, note=plan.note)
    bits, fmt = _load_bits(reader, spec, xp)
    if options.fmt == "int8":
        entries, error = _quantize_int8(bits, fmt, spec, xp)
    else:
        entries, error = _quantize_4bit(bits, fmt, spec, options, xp)
    after = 0
    for name, value in entries:
        host = _host(value)
        writer.write(name, host)
        after += host.nbytes
    return TensorReport(spec.name, spec.shape, spec.dtype, options.fmt, spec.nbytes, after, error)


# ---------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------
@dataclass
class InspectRow:
    """One logical tensor of a checkpoint: a quantized weight with all its entries, or a plain tensor."""

    name: str
    fmt: str
    shape: tuple[int, ...]
    nbytes: int
    numel: int

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per logical element, every entry of a quantized weight counted."""
        return 8.0 * self.nbytes / self.numel if self.numel else 0.0


def _json_entry(reader: SafetensorsReader, key: str) -> dict[str, Any]:
    """The fields of a quant_state JSON entry, or a CheckpointError."""
    try:
        fields = json.loads(reader.read(key).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{key} must hold UTF-8 JSON, got undecodable bytes ({exc})") from None
    if not isinstance(fields, dict) or "shape" not in fields:
        raise CheckpointError(f"{key} must hold a JSON object with a 'shape', got {fields!r}")
    return fields


def inspect_checkpoint(path: str | os.PathLike) -> tuple[list[InspectRow], dict[str, str], int]:
    """The logical tensors of a checkpoint (quantized weights grouped with their state),
    its metadata and its file size in bytes."""
    reader = SafetensorsReader(path)
    names = reader.names()
    grouped: set[str] = set()
    rows: dict[str, InspectRow] = {}
    for name in names:
        if _PACKED_PREFIX not in name:
            continue
        weight = name.split("." + _PACKED_PREFIX)[0]
        fields = _json_entry(reader, name)
        members = [n for n in names if n == weight or n.startswith(weight + ".")]
        grouped.update(members)
        shape = tuple(int(s) for s in fields["shape"])
        label = f"{fields.get('quant_type', '?')} bs{fields.get('blocksize', '?')}"
        if "nested_absmax" in {m[len(weight) + 1 :] for m in members}:
            label += " nested"
        nbytes = sum(reader.spec(m).nbytes for m in members)
        rows[weight] = InspectRow(weight, label, shape, nbytes, int(np.prod(shape, dtype=np.int64)))
    for name in names:
        module = _module_of(name)
        if module is None or name in grouped or reader.spec(name).dtype != "I8":
            continue
        scb = f"{module}.SCB" if module else "SCB"
        if scb not in reader:
            continue
        members = [name, scb] + [m for m in (f"{module}.weight_format" if module else "weight_format",) if m in reader]
        grouped.update(members)
        spec = reader.spec(name)
        nbytes = sum(reader.spec(m).nbytes for m in members)
        rows[name] = InspectRow(name, "int8 row-wise", spec.shape, nbytes, spec.numel)
    ordered = []
    for name in names:
        if name in rows:
            ordered.append(rows[name])
        elif name not in grouped:
            spec = reader.spec(name)
            ordered.append(InspectRow(name, spec.dtype, spec.shape, spec.nbytes, spec.numel))
    return ordered, reader.metadata, reader.file_size
