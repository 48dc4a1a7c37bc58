"""Timing by CUDA-graph replay, shared by the benchmarks: torch layers (:func:`time_graph`)
and plain CuPy calls (:func:`time_cupy_graph`).

Layers are the rotated weight copies of one shape; each graph captures GRAPH_CALLS
calls, so that weights are read from DRAM, not L2, and launch gaps do not count.
"""

from __future__ import annotations

import statistics
import time

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


def replay_for(replay, synchronize, seconds: float) -> None:
    """Replays a graph back to back for ``seconds``: a warm-up to the power limit's steady
    state (a card at its limit lowers its clocks under sustained load, so a short burst
    right after idle, or right after other work, times something else)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        replay()
        synchronize()


def time_cupy_graph(calls: list, repeats: int, stream=None, warm_seconds: float = 0.0) -> float:
    """Median microseconds a call over ``repeats`` replays of one CuPy graph of ``calls``
    (callables issuing work on the current CuPy stream), captured on ``stream`` (a fresh
    non-blocking one by default), after ``warm_seconds`` of replays (:func:`replay_for`).
    Every call runs once first: kernels compile, and the memory pool holds the blocks the
    captured calls allocate."""
    import cupy

    stream = stream if stream is not None else cupy.cuda.Stream(non_blocking=True)
    with stream:
        for f in calls:
            f()
        stream.synchronize()
        stream.begin_capture()
        for f in calls:
            f()
        graph = stream.end_capture()
        graph.launch(stream)  # the first replay uploads the graph
        stream.synchronize()
        replay_for(lambda: graph.launch(stream), stream.synchronize, warm_seconds)
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        times = []
        for _ in range(repeats):
            start.record(stream)
            graph.launch(stream)
            end.record(stream)
            end.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, end) * 1e3 / len(calls))
    return statistics.median(times)
