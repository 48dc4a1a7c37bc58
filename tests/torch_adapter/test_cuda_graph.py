"""Linear4bit inside CUDA graphs, and the GPU path's zero-copy promise (GPU only)."""

from __future__ import annotations

import pytest
import torch

from cupyquant.torch import LinearNF4
from cupyquant.torch import functional as F

pytestmark = pytest.mark.gpu


def _warmed_up(layer: torch.nn.Module, x: torch.Tensor) -> None:
    """Run a few calls on a side stream first: kernels compile and tables are uploaded
    outside the capture, as torch.cuda.graphs asks."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            layer(x)
    torch.cuda.current_stream().wait_stream(side)


@pytest.mark.parametrize("rows", [1, 16, 300], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_linear4bit_replays_in_a_cuda_graph(rows, dtype):
    layer = LinearNF4(512, 256, compute_dtype=dtype).cuda()
    static_x = torch.randn(rows, 512, device="cuda", dtype=dtype)
    with torch.no_grad():
        _warmed_up(layer, static_x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        for _ in range(3):
            x = torch.randn_like(static_x)
            static_x.copy_(x)
            graph.replay()
            torch.testing.assert_close(static_y, layer(x))


def test_replay_reads_the_quant_state_in_place():
    layer = LinearNF4(256, 64, compute_dtype=torch.float16).cuda()
    x = torch.randn(1, 256, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        _warmed_up(layer, x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = layer(x)
        layer.weight.quant_state.absmax.mul_(2)  # in place: the graph reads the same memory
        graph.replay()
        torch.testing.assert_close(y, layer(x))


@pytest.mark.parametrize(("dtype", "rows"), [(torch.float16, 1), (torch.float32, 1), (torch.float32, 4)])
def test_fused_forward_does_not_copy_the_weight(dtype, rows):
    # Tile order (a CUDA layer's default for fp16, tile_() for float32): every fused kernel
    # reads it in place.
    layer = LinearNF4(4096, 4096, compute_dtype=dtype).cuda()
    assert layer.weight.quant_state.tiled == (dtype != torch.float32)
    layer.tile_()
    x = torch.randn(rows, 4096, device="cuda", dtype=dtype)
    with torch.no_grad():
        layer(x)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        layer(x)
        torch.cuda.synchronize()
    # the output (<= 64 KiB) and small scratch at most; a weight copy would be >= 8 MiB
    assert torch.cuda.max_memory_allocated() - before < (1 << 20)


def test_kernels_run_on_the_tensors_device_and_stream():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    layer = LinearNF4(256, 64, compute_dtype=torch.bfloat16).to("cuda:1")
    x = torch.randn(3, 256, device="cuda:1", dtype=torch.bfloat16)
    stream = torch.cuda.Stream(device="cuda:1")
    with torch.no_grad(), torch.cuda.stream(stream):
        y = layer(x)
    stream.synchronize()
    expected = x.float() @ F.dequantize_4bit(layer.weight, layer.quant_state).float().t() + layer.bias
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)
