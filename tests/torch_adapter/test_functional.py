"""cupyquant.torch.functional: bitsandbytes' fixtures reproduced, the custom ops, error paths."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import cupyquant
from cupyquant.torch import functional as F

from .helpers import BLOCKWISE8_CASES, FLOAT_DTYPES, QUANT4_CASES, load_fixture, relative_error, same_bytes

# A float32 product of a K-long dot product carries about K * eps32 of rounding; both sides
# accumulate in float32 in different orders.
MATMUL_FP32_RTOL = 1e-5
# fp16 / bf16 outputs are rounded once to the format: one ulp of relative error, twice
# for two differently ordered accumulations (2 * 2**-10 and 2 * 2**-7).
MATMUL_RTOL = {torch.float32: MATMUL_FP32_RTOL, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# The nested offset is mean(absmax): the core sums in float64 and rounds once, bitsandbytes
# reduces in float32 on the GPU, so the two may differ in the last bit (one fixture does).
NESTED_OFFSET_ULPS = 1


def _state_dict_of(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _meta(stats: dict[str, torch.Tensor]) -> dict:
    key = next(k for k in stats if k.startswith("quant_state."))
    return json.loads(bytes(stats[key].numpy()).decode())


# ---------------------------------------------------------------------------------------
# 4-bit
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", QUANT4_CASES)
def test_quantize_4bit_reproduces_bitsandbytes(device, case):
    data = load_fixture(case)
    stats = _state_dict_of("state.", data)
    meta = _meta(stats)
    packed, state = F.quantize_4bit(
        data["A"].to(device),
        blocksize=meta["blocksize"],
        compress_statistics="nested_offset" in meta,
        quant_type=meta["quant_type"],
    )
    assert same_bytes(packed, data["packed"])
    ours = state.as_dict(packed=True)
    assert set(ours) == set(stats)
    for key, value in ours.items():
        if not key.startswith("quant_state."):
            assert same_bytes(value, stats[key]), key
    our_meta = _meta({k: v.cpu() for k, v in ours.items()})
    assert list(our_meta) == list(meta)
    assert {k: v for k, v in our_meta.items() if k != "nested_offset"} == {
        k: v for k, v in meta.items() if k != "nested_offset"
    }
    if "nested_offset" in meta:
        gap = abs(np.float32(our_meta["nested_offset"]) - np.float32(meta["nested_offset"]))
        assert gap <= NESTED_OFFSET_ULPS * np.spacing(np.float32(meta["nested_offset"]))
    assert same_bytes(F.dequantize_4bit(packed, state), data["dequantized"])


@pytest.mark.parametrize("case", QUANT4_CASES)
def test_dequantize_4bit_of_a_bitsandbytes_state(device, case):
    data = load_fixture(case)
    state = F.QuantState.from_dict(_state_dict_of("state.", data), device=device)
    assert same_bytes(F.dequantize_4bit(data["packed"].to(device), state), data["dequantized"])


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [1, 7, 64, 1001])
def test_quant_storage_is_a_view_of_the_same_bytes(device, quant_storage, n):
    A = torch.randn(n, device=device)
    reference, _ = F.quantize_4bit(A, quant_type="nf4")
    packed, state = F.quantize_4bit(A, quant_type="nf4", quant_storage=quant_storage)
    itemsize = packed.element_size()
    assert packed.dtype == quant_storage and packed.shape == (-(-((n + 1) // 2) // itemsize), 1)
    assert torch.equal(packed.view(torch.uint8).reshape(-1)[: reference.numel()], reference.reshape(-1))
    torch.testing.assert_close(F.dequantize_4bit(packed, state), F.dequantize_4bit(reference, state))


def test_quantize_4bit_fills_out_and_absmax(device):
    A = torch.randn(4, 100, device=device)
    out = torch.empty(200, 1, dtype=torch.uint8, device=device)
    absmax = torch.empty(7, dtype=torch.float32, device=device)
    packed, state = F.quantize_4bit(A, absmax=absmax, out=out, quant_type="fp4")
    reference, ref_state = F.quantize_4bit(A, quant_type="fp4")
    assert packed is out and torch.equal(out, reference)
    assert state.absmax is absmax and torch.equal(absmax, ref_state.absmax)


def test_dequantize_4bit_without_state(device):
    A = torch.randn(3, 64, device=device)
    packed, state = F.quantize_nf4(A, blocksize=32)
    out = torch.empty(3, 64, device=device)
    result = F.dequantize_nf4(packed, absmax=state.absmax, out=out, blocksize=32)
    assert result is out
    assert torch.equal(out, F.dequantize_4bit(packed, state))


def test_dequantize_fp4_into_out(device):
    A = torch.randn(5, 32, device=device, dtype=torch.float16)
    packed, state = F.quantize_fp4(A, compress_statistics=True)
    out = torch.empty_like(A)
    assert F.dequantize_fp4(packed, state, out=out) is out
    assert torch.equal(out, F.dequantize_4bit(packed, state))


def test_dequantize_of_the_transposed_packed_weight_is_transposed(device):
    W = torch.randn(6, 40, device=device)
    packed, state = F.quantize_4bit(W, quant_type="nf4")
    assert torch.equal(F.dequantize_4bit(packed.t(), state), F.dequantize_4bit(packed, state).t())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_matmul_4bit_equals_dequantize_then_matmul(device, dtype, quant_type, M, nested):
    N, K = 24, 96
    W = torch.randn(N, K, device=device) / K**0.5
    A = torch.randn(2, M, K, device=device).to(dtype)
    bias = torch.randn(N, device=device).to(dtype)
    packed, state = F.quantize_4bit(W, quant_type=quant_type, compress_statistics=nested)
    reference = A.float() @ F.dequantize_4bit(packed, state).t() + bias.float()
    result = F.matmul_4bit(A, packed, state, bias=bias)
    assert result.dtype == dtype and result.shape == (2, M, N)
    assert relative_error(result, reference) < MATMUL_RTOL[dtype]
    out = torch.empty(2, M, N, device=device, dtype=dtype)
    assert F.matmul_4bit(A, packed.t(), state, out=out, bias=bias) is out
    torch.testing.assert_close(out, result)


def test_cpu_switch_point_does_not_depend_on_the_hosts_gpu(monkeypatch):
    # On an H100 / H200 the fused range of 4096..8191-row weights is 128 tokens (gemm_4bit_wgmma);
    # CPU tensors keep the range every device shares, so 40 rows dequantize and call torch's
    # GEMM whatever GPU the host has, and give the same bits.
    core = F._mm
    packed, state = F.quantize_4bit(torch.randn(4096, 64) / 8)
    A = torch.randn(40, 64, dtype=torch.float16)
    expected = F.matmul_4bit(A, packed, state)
    monkeypatch.setattr(core._xp, "gpu_available", lambda: True)
    monkeypatch.setattr(core, "_wgmma_supported", lambda: True)
    assert F.fused_max_m("float16", 4096, 64) == 128
    assert F.fused_max_m("float16", 4096, 64, current_device=False) == 32
    monkeypatch.setattr(core, "matmul_4bit_bits", lambda *args: pytest.fail("a fused call for 40 CPU rows"))
    assert same_bytes(F.matmul_4bit(A, packed, state), expected)


def test_matmul_4bit_of_an_empty_batch(device):
    packed, state = F.quantize_4bit(torch.randn(8, 16, device=device))
    assert F.matmul_4bit(torch.empty(0, 16, device=device), packed, state).shape == (0, 8)


def test_gemv_4bit(device):
    W = torch.randn(16, 64, device=device)
    packed, state = F.quantize_4bit(W, quant_type="nf4")
    A = torch.randn(1, 64, device=device)
    torch.testing.assert_close(F.gemv_4bit(A, packed.t(), state=state), F.matmul_4bit(A, packed, state))
    with pytest.raises(ValueError, match=r"exactly one row .* got A of shape \(2, 64\)"):
        F.gemv_4bit(torch.randn(2, 64, device=device), packed, state=state)
    with pytest.raises(ValueError, match="state cannot be None"):
        F.gemv_4bit(A, packed)


def test_get_4bit_type_and_dynamic_map():
    assert torch.equal(F.get_4bit_type("nf4"), torch.from_numpy(cupyquant.get_4bit_type("nf4")))
    code = F.create_dynamic_map()
    assert torch.equal(code, torch.from_numpy(cupyquant.create_dynamic_map()))
    code[0] = 5.0  # a fresh tensor each call: the cached table is not shared
    assert F.create_dynamic_map()[0].item() != 5.0
    with pytest.raises(ValueError, match="typename must be one of .* got 'int4'"):
        F.get_4bit_type("int4")


# ---------------------------------------------------------------------------------------
# 8-bit blockwise
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", BLOCKWISE8_CASES)
def test_quantize_blockwise_reproduces_bitsandbytes(device, case):
    data = load_fixture(case)
    nested = "nested_absmax" in data
    blocksize = int(case.split("_bs")[1].split("_")[0])
    q, state = F.quantize_blockwise(data["A"].to(device), blocksize=blocksize, nested=nested)
    assert same_bytes(q, data["quantized"])
    assert same_bytes(state.code, data["code"])
    if nested:
        assert same_bytes(state.state2.absmax, data["nested_absmax"])
    else:
        assert same_bytes(state.absmax, data["absmax"])
    assert same_bytes(F.dequantize_blockwise(q, state), data["dequantized"])


def test_blockwise_without_state_and_with_buffers(device):
    A = torch.randn(300, device=device)
    out = torch.empty(300, dtype=torch.uint8, device=device)
    absmax = torch.empty(5, device=device)
    q, state = F.quantize_blockwise(A, blocksize=64, out=out, absmax=absmax)
    assert q is out and state.absmax is absmax
    deq = F.dequantize_blockwise(q, absmax=absmax, blocksize=64)
    assert torch.equal(deq, F.dequantize_blockwise(q, state))
    assert (deq - A).abs().max() <= absmax.max() * 0.02


# ---------------------------------------------------------------------------------------
# QuantState
# ---------------------------------------------------------------------------------------
def test_quant_state_round_trips_and_moves(device):
    packed, state = F.quantize_4bit(torch.randn(10, 70, device=device), quant_type="nf4", compress_statistics=True)
    entries = state.as_dict(packed=True)
    assert list(entries) == [
        "absmax",
        "quant_map",
        "nested_absmax",
        "nested_quant_map",
        "quant_state.bitsandbytes__nf4",
    ]
    meta = json.loads(bytes(entries["quant_state.bitsandbytes__nf4"].cpu().numpy()))
    assert list(meta) == ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype",
                          "nested_offset"]  # fmt: skip
    rebuilt = F.QuantState.from_dict({f"weight.{k}": v for k, v in entries.items()})
    assert rebuilt == state and rebuilt.dtype is torch.float32
    numpy_entries = {k: v.cpu().numpy() for k, v in entries.items()}
    assert F.QuantState.from_dict(numpy_entries, device=device) == state
    moved = F.QuantState.from_dict(entries, device="cpu").to("cpu")
    assert moved.absmax.device.type == "cpu" and moved.offset.device.type == "cpu"


def test_quant_state_views_follow_changes():
    packed, state = F.quantize_4bit(torch.randn(4, 64), quant_type="fp4")
    first = state.kernel_state("float32")
    assert state.kernel_state("float32") is first
    state.absmax = state.absmax * 2
    assert state.kernel_state("float32") is not first
    np.testing.assert_array_equal(state.kernel_state("float32").absmax, state.absmax.numpy())


def test_quant_state_errors():
    with pytest.raises(ValueError, match="quant_type must be one of .* got 'int4'"):
        F.QuantState(absmax=torch.ones(1), quant_type="int4")
    with pytest.raises(ValueError, match="missing keys"):
        F.QuantState.from_dict({"quant_type": "nf4", "absmax": torch.ones(1)})


# ---------------------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------------------
def test_custom_ops_pass_opcheck():
    A = torch.randn(3, 64)
    packed, state = F.quantize_4bit(A, quant_type="nf4", compress_statistics=True)
    q, bstate = F.quantize_blockwise(A, blocksize=64, nested=True)
    checks = [
        (torch.ops.cupyquant.quantize_4bit.default, (A, 64, True, "nf4", 96)),
        (torch.ops.cupyquant.dequantize_4bit.default,
         (packed, *state.tensors(), 64, "nf4", [3, 64], torch.bfloat16)),
        (torch.ops.cupyquant.matmul_4bit.default,
         (torch.randn(2, 64), packed, *state.tensors(), 64, "nf4", [3, 64], torch.randn(3))),
        (torch.ops.cupyquant.quantize_blockwise.default, (A, F.create_dynamic_map(), 64, True)),
        (torch.ops.cupyquant.dequantize_blockwise.default,
         (q, bstate.absmax, bstate.code, *bstate.tensors()[1:], 64, torch.float16)),
    ]  # fmt: skip
    for op, args in checks:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_custom_ops_read_tile_ordered_bytes():
    # tiled=True: the ops read the packed bytes in the tile order of cupyquant.tiled_4bit
    # (Linear4bit.tile_) and give the results of the bitsandbytes layout.
    from cupyquant.torch.parameters import tile_order_copy

    W = torch.randn(32, 256)
    packed, state = F.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
    tiled = tile_order_copy(packed, (32, 256), to_tiles=True)
    A = torch.randn(2, 256)
    fields = (*state.tensors(), 64, "nf4", [32, 256])
    for op, args, expected in (
        (torch.ops.cupyquant.dequantize_4bit.default, (tiled, *fields, torch.float32, True),
         F.dequantize_4bit(packed, state)),
        (torch.ops.cupyquant.matmul_4bit.default, (A, tiled, *fields, None, True), F.matmul_4bit(A, packed, state)),
    ):  # fmt: skip
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
        assert same_bytes(op(*args), expected)


# ---------------------------------------------------------------------------------------
# error paths
# ---------------------------------------------------------------------------------------
def test_quantize_4bit_errors():
    A = torch.randn(64)
    with pytest.raises(TypeError, match="A must be a torch.Tensor, got ndarray"):
        F.quantize_4bit(np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match="A must be float32, float16 or bfloat16, got torch.float64"):
        F.quantize_4bit(A.double())
    with pytest.raises(ValueError, match=r"blocksize must be one of \(32, .*\), got 96"):
        F.quantize_4bit(A, blocksize=96)
    with pytest.raises(ValueError, match="quant_type must be one of .* got 'int4'"):
        F.quantize_4bit(A, quant_type="int4")
    with pytest.raises(ValueError, match="quant_storage must be one of .* got torch.int32"):
        F.quantize_4bit(A, quant_storage=torch.int32)
    with pytest.raises(ValueError, match=r"out must be a \(32, 1\) tensor of torch.uint8, got \(32,\)"):
        F.quantize_4bit(A, out=torch.empty(32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"out must be a \(1,\) tensor of torch.float32, got \(2,\)"):
        F.quantize_4bit(A, absmax=torch.empty(2))


def test_dequantize_4bit_errors():
    packed, state = F.quantize_4bit(torch.randn(4, 64))
    with pytest.raises(ValueError, match="needs quant_state, or both absmax and out"):
        F.dequantize_4bit(packed)
    with pytest.raises(TypeError, match="quant_state must be a cupyquant.torch.functional.QuantState, got dict"):
        F.dequantize_4bit(packed, {"absmax": state.absmax})
    with pytest.raises(ValueError, match=r"out must be a \(4, 64\) tensor of torch.float32, got .* of torch.float16"):
        F.dequantize_4bit(packed, state, out=torch.empty(4, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="A holds 16 bytes but quant_state.shape"):
        F.dequantize_4bit(packed[:16], state)


def test_matmul_4bit_errors():
    packed, state = F.quantize_4bit(torch.randn(8, 64))
    A = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"last dimension must equal the weight's K = 64, got A of shape \(2, 32\)"):
        F.matmul_4bit(torch.randn(2, 32), packed, state)
    with pytest.raises(ValueError, match="A must be float32, float16 or bfloat16, got torch.int64"):
        F.matmul_4bit(torch.ones(2, 64, dtype=torch.int64), packed, state)
    with pytest.raises(ValueError, match=r"bias must be \(8,\) of torch.float32, got \(8,\) of torch.float16"):
        F.matmul_4bit(A, packed, state, bias=torch.zeros(8, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"out must be a \(2, 8\) tensor"):
        F.matmul_4bit(A, packed, state, out=torch.empty(2, 9))
    _, vector_state = F.quantize_4bit(torch.randn(64))
    with pytest.raises(ValueError, match=r"2-D \(N, K\) weight, got quant_state.shape \(64,\)"):
        F.matmul_4bit(A, packed, vector_state)
    with pytest.raises(TypeError, match="B must be a torch.Tensor"):
        F.matmul_4bit(A, None, state)


def test_blockwise_errors():
    A = torch.randn(64)
    with pytest.raises(ValueError, match=r"blocksize must be one of \(64, .*\), got 32"):
        F.quantize_blockwise(A, blocksize=32)
    with pytest.raises(ValueError, match=r"code must be float32\[256\], got torch.float32\[16\]"):
        F.quantize_blockwise(A, code=torch.zeros(16))
    with pytest.raises(ValueError, match="A must be uint8 codes, got torch.float32"):
        F.dequantize_blockwise(A)
    q = torch.zeros(64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="needs quant_state or absmax"):
        F.dequantize_blockwise(q)
    with pytest.raises(ValueError, match="nested=True needs the quant_state"):
        F.dequantize_blockwise(q, absmax=torch.ones(1), nested=True)


def test_a_strided_bias_is_read_at_every_call():
    """A non-contiguous bias crosses as a copy: it must not be cached, or later in-place
    updates of the bias would be missed."""
    from cupyquant.torch import LinearNF4

    layer = LinearNF4(64, 16, compute_dtype=torch.float32).cpu()
    x = torch.randn(3, 64)
    backing = torch.randn(32)
    bias = backing[::2]
    first = F.matmul_4bit(x, layer.weight, layer.weight.quant_state, bias=bias)
    backing.add_(100.0)
    second = F.matmul_4bit(x, layer.weight, layer.weight.quant_state, bias=bias)
    torch.testing.assert_close(second - first, torch.full_like(first, 100.0))


def test_matmul_4bit_refuses_a_state_on_another_device():
    from cupyquant.torch import LinearNF4

    layer = LinearNF4(64, 16).cpu()
    state = layer.weight.quant_state
    state.absmax = state.absmax.to("meta")
    with pytest.raises(ValueError, match="quant_state is on meta but B is on cpu"):
        F.matmul_4bit(torch.randn(2, 64), layer.weight, state)
