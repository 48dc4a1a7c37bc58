"""Timing torch layers by CUDA-graph replay, shared by the layer benchmarks.

Layers are the rotated weight copies of one shape; each graph captures GRAPH_CALLS
calls, so that weights are read from DRAM, not L2, and launch gaps do not count.
"""

from __future__ import annotations

import statistics

import torch
from torch import nn

GRAPH_CALLS = 20


def time_graph(layers: list[nn.Module], x: torch.Tensor, repeats: int) -> float:
    """Median microseconds a call over replays of graphs of GRAPH_CALLS calls each."""
    side = torch.cuda.Stream()  # warm up (compiles, caches) off the capture stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for layer in layers[:GRAPH_CALLS]:
            layer(x)
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for first in range(0, len(layers), GRAPH_CALLS):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(GRAPH_CALLS):
                layers[(first + i) % len(layers)](x)
        graphs.append(graph)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start.record()
        for graph in graphs:
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (GRAPH_CALLS * len(graphs)))
    del graphs
    torch.cuda.synchronize()
    return statistics.median(times)
