"""Timing shared by the GPU benchmark scripts (imported as ``from _timing import call_ms`` when a script runs as
``python benchmarks/<script>.py``)."""

from __future__ import annotations

import time

import torch


def call_ms(fn, reps: int, warmup: int, cuda: bool) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``fn`` after ``warmup`` untimed calls: CUDA events around each call
    on the GPU (synchronised after it), the wall clock elsewhere (the CPU smoke runs, no timing value)."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return times
