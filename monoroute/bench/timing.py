"""Timing and memory measurement shared by the benchmarks.

Times are wall-clock medians over repeats after warm-up (`time.perf_counter`, with
`torch.cuda.synchronize` around each phase on GPU). Machines are noisy: compare ratios measured in
one run, never absolute seconds across runs.
"""
from __future__ import annotations

import ctypes
import gc
import re
import resource
import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

# Peak DRAM bandwidth in bytes/s by device-name substring (first match wins).
PEAK_BANDWIDTH = (("H200", 4.8e12), ("H100 SXM", 3.35e12), ("H100 80GB HBM3", 3.35e12))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_phases(
    phases: list[Callable[[Any], Any]], device: torch.device, warmup: int, repeats: int
) -> list[float]:
    """Median seconds of each phase of a chain: phase i gets phase i-1's result (the first None).

    E.g. [forward, backward]: forward builds the graph, backward consumes it, each timed alone.
    """
    samples: list[list[float]] = [[] for _ in phases]
    for rep in range(warmup + repeats):
        value = None
        for i, phase in enumerate(phases):
            sync(device)
            start = time.perf_counter()
            value = phase(value)
            sync(device)
            if rep >= warmup:
                samples[i].append(time.perf_counter() - start)
    return [statistics.median(s) for s in samples]


def _rss_peak_bytes() -> int:
    """This process's peak resident set (Linux VmHWM; resettable via clear_refs), in bytes."""
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _reset_rss_peak() -> bool:
    gc.collect()
    try:  # hand freed heap memory back to the OS, so the baseline RSS is what is really in use
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False  # then maxrss only ever grows: the delta is a lower bound


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Yields a dict whose "bytes" is, after the block, its peak memory above the start
    (so whatever the block allocates and keeps, e.g. a layer's parameters, counts).

    GPU: torch.cuda.max_memory_allocated. CPU: peak RSS (VmHWM, reset at entry where the kernel
    allows it, else getrusage maxrss, which can only report growth past the earlier peak).
    """
    result = {"bytes": 0, "method": ""}
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        sync(device)
        result.update(bytes=torch.cuda.max_memory_allocated(device) - start, method="cuda.max_memory_allocated")
        return
    reset = _reset_rss_peak()
    start = _rss_peak_bytes()
    yield result
    result.update(bytes=max(0, _rss_peak_bytes() - start), method="VmHWM" if reset else "maxrss (growth only)")


def peak_bandwidth(device: torch.device) -> float | None:
    """The device's peak memory bandwidth in bytes/s, or None when it is not in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in PEAK_BANDWIDTH if key in name), None)
