"""The NumPy path against real bitsandbytes 0.50.2 CUDA output, bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

import cupyquant as cq
from cupyquant import _reference as ref
from cupyquant.codebooks import dynamic_map

from .conftest import FIXTURES

QUANT4_CASES = sorted(p.stem for p in FIXTURES.glob("quant4_*.safetensors"))
BLOCKWISE8_CASES = {
    "blockwise8_bs256_fp32": (256, False),
    "blockwise8_bs4096_fp16": (4096, False),
    "blockwise8_bs64_nested_fp32": (64, True),
}


def load_case(name: str) -> dict[str, np.ndarray]:
    """Load a fixture; bfloat16 tensors come back as their uint16 bits."""
    import torch
    from safetensors.torch import load_file as load_torch

    tensors = load_torch(str(FIXTURES / f"{name}.safetensors"))
    out = {}
    for key, t in tensors.items():
        out[key] = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
    return out


def packed_json(case: dict[str, np.ndarray]) -> tuple[str, dict]:
    key = next(k for k in case if "quant_state" in k)
    return key, json.loads(case[key].tobytes().decode("utf-8"))


@pytest.mark.parametrize("name", QUANT4_CASES)
def test_quantize_4bit_matches_bitsandbytes(name):
    case = load_case(name)
    key, meta = packed_json(case)
    fmt = meta["dtype"]
    bits = case["A"].reshape(-1)
    packed, absmax = ref.quantize_4bit(bits, fmt, meta["blocksize"], meta["quant_type"])
    np.testing.assert_array_equal(packed, case["packed"].reshape(-1))
    if "nested_offset" in meta:
        q, nested_absmax, offset = ref.nest_absmax(absmax)
        np.testing.assert_array_equal(q, case["state.absmax"])
        np.testing.assert_array_equal(nested_absmax, case["state.nested_absmax"])
        # bitsandbytes sums the mean in float32 (CUDA order), we sum in float64: <= 1 ulp apart.
        assert abs(int(offset.view(np.int32)) - int(np.float32(meta["nested_offset"]).view(np.int32))) <= 1
        np.testing.assert_array_equal(case["state.nested_quant_map"], dynamic_map())
    else:
        np.testing.assert_array_equal(absmax, case["state.absmax"])
    np.testing.assert_array_equal(case["state.quant_map"], cq.get_4bit_type(meta["quant_type"]))


@pytest.mark.parametrize("name", QUANT4_CASES)
def test_dequantize_4bit_from_bitsandbytes_state(name):
    """Load the packed state dict as bitsandbytes wrote it and dequantize: same bytes."""
    case = load_case(name)
    state_dict = {
        k[len("state.") :] if k.startswith("state.") else k: v for k, v in case.items() if k.startswith("state.")
    }
    qs = cq.QuantState.from_dict(state_dict, device="cpu")
    target = np.empty(case["dequantized"].size, dtype=case["dequantized"].dtype)
    cq.blockwise.dequantize_4bit_bits(case["packed"].reshape(-1), qs, target)
    np.testing.assert_array_equal(target, case["dequantized"].reshape(-1))


@pytest.mark.parametrize("name", QUANT4_CASES)
def test_packed_state_dict_matches_bitsandbytes(name):
    """as_dict(packed=True) gives the same keys, arrays and JSON bytes as bitsandbytes."""
    case = load_case(name)
    key, meta = packed_json(case)
    A = case["A"]
    _, state = cq.blockwise.quantize_4bit_bits(
        A.reshape(-1), meta["dtype"], A.shape, meta["blocksize"], "nested_offset" in meta, meta["quant_type"]
    )
    if "nested_offset" in meta:
        state.offset = np.asarray(np.float32(meta["nested_offset"]))  # see the 1-ulp note above
    ours = state.as_dict(packed=True)
    theirs = {k[len("state.") :]: v for k, v in case.items() if k.startswith("state.")}
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        np.testing.assert_array_equal(ours[k], v, err_msg=k)
    assert ours[key[len("state.") :]].tobytes() == case[key].tobytes()


@pytest.mark.parametrize("name", sorted(BLOCKWISE8_CASES))
def test_blockwise_8bit_matches_bitsandbytes(name):
    blocksize, nested = BLOCKWISE8_CASES[name]
    case = load_file(str(FIXTURES / f"{name}.safetensors"))
    A = case["A"]
    q, state = cq.quantize_blockwise(A, blocksize=blocksize, nested=nested)
    np.testing.assert_array_equal(q, case["quantized"])
    np.testing.assert_array_equal(state.code, case["code"])
    np.testing.assert_array_equal(state.absmax, case["absmax"])
    if nested:
        np.testing.assert_array_equal(state.state2.absmax, case["nested_absmax"])
        np.testing.assert_array_equal(state.offset.reshape(1), case["offset"])
    out = cq.dequantize_blockwise(q, state)
    assert out.dtype == A.dtype
    np.testing.assert_array_equal(out, case["dequantized"])


def test_dynamic_map_matches_bitsandbytes():
    case = load_file(str(FIXTURES / "blockwise8_bs256_fp32.safetensors"))
    np.testing.assert_array_equal(cq.create_dynamic_map(), case["code"])
    assert cq.create_dynamic_map().min() == np.float32(-0.99296875)
