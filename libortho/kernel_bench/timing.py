"""GPU timing for the benchmarks: calls captured in one CUDA graph and replayed under CUDA
events, and the card's device-to-device copy bandwidth (the reference for GB/s)."""
from __future__ import annotations

import statistics
from typing import Any, Callable, Dict, Sequence

import torch


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written), median."""
    a = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e-3)
    del a, b
    return 2 * nbytes / statistics.median(times) / 1e9


def time_calls(calls: Sequence[Callable[[], Any]], reps: int = 100, warmup: int = 10
               ) -> Dict[str, Any]:
    """Median µs per call over ``reps`` timed graph replays of all ``calls`` in sequence.

    Falls back to timing eager calls one by one with events when graph capture fails
    (``method`` says which). Returns {"us", "p10", "p90", "method", "reps"}.
    """
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in calls:
                c()
        run, per, method = graph.replay, len(calls), "cuda_graph"
    except Exception:  # e.g. a library call that cannot be captured
        torch.cuda.synchronize()
        graph = None
        idx = [0]

        def run():
            calls[idx[0] % len(calls)]()
            idx[0] += 1
        per, method = 1, "eager_events"
        reps = max(reps, 100)
    for _ in range(warmup):
        run()
    events = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        run()
        e1.record()
        events.append((e0, e1))
    torch.cuda.synchronize()
    us = sorted(e0.elapsed_time(e1) * 1e3 / per for e0, e1 in events)
    del graph
    return dict(us=statistics.median(us), p10=us[len(us) // 10], p90=us[(9 * len(us)) // 10],
                method=method, reps=reps)
