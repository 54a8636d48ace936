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


def median_ms(fn, reps: int, cuda: bool) -> float:
    """The median of :func:`call_ms` (one warm-up call)."""
    return sorted(call_ms(fn, reps, warmup=1, cuda=cuda))[reps // 2]


def kernel_ms(fn, reps: int) -> dict[str, float]:
    """Mean GPU milliseconds per call of each kernel ``fn`` launches (``torch.profiler``, after one warm-up call),
    by kernel name; empty off CUDA."""
    if not torch.cuda.is_available():
        return {}
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for ev in prof.key_averages():
        dev_us = _device_us(ev, "")
        if dev_us:
            out[ev.key[:80]] = dev_us / 1e3 / reps
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _device_us(ev, prefix: str) -> float:
    """A profiler average's GPU microseconds, ``prefix`` ``""`` (total) or ``"self_"``, under the name of newer
    PyTorch (``device_time_total``) or older (``cuda_time_total``)."""
    dev_us = getattr(ev, f"{prefix}device_time_total", None)
    return getattr(ev, f"{prefix}cuda_time_total", 0.0) if dev_us is None else dev_us


def aten_ms(fn, reps: int, top: int = 16) -> dict[str, float]:
    """Mean GPU milliseconds per call of ``fn`` by the aten operator that launched them and its input shapes
    (``torch.profiler`` with ``record_shapes``, after one warm-up call): which PyTorch call a kernel of
    :func:`kernel_ms` comes from (a copy's dtypes and sizes, say). The ``top`` largest; empty off CUDA."""
    if not torch.cuda.is_available():
        return {}
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for ev in prof.key_averages(group_by_input_shape=True):
        if not ev.key.startswith("aten::"):
            continue
        dev_us = _device_us(ev, "self_")
        if dev_us:
            out[f"{ev.key} {ev.input_shapes}"[:160]] = dev_us / 1e3 / reps
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:top])


def gpu_ms(fn, reps: int, graph: bool = False, flush_l2: bool = False, sleep_cycles: int = 2_000_000) -> list[float]:
    """GPU milliseconds of each of ``reps`` calls of ``fn`` (CUDA only), without the host's overhead: before each
    timed call the GPU is kept busy (``torch.cuda._sleep``, about 1 ms) while the host enqueues the call, so the time
    between the two CUDA events is the GPU's, from its first kernel to its last (gaps between kernels included), as in
    a decode loop that runs ahead of the GPU. ``graph``: ``fn`` is captured once in a CUDA graph and each call is one
    replay (how a decode step runs under CUDA graphs). ``flush_l2``: a 256 MB buffer is overwritten before each call,
    so the call starts with a cold L2 cache (as after the other layers' work), instead of finding its inputs left
    there by the previous call."""
    run = fn
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    else:
        fn()
    scratch = torch.empty(64 * 2**20, dtype=torch.float32, device="cuda") if flush_l2 else None
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if scratch is not None:
            scratch.fill_(1.0)
        torch.cuda._sleep(sleep_cycles)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times
