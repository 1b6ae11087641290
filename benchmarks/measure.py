"""Measurement helpers: interleaved medians, peak memory, FLOP counts, machine peak."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak extra memory of a block: CUDA allocator peak on GPU, sampled resident set size on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base, self._max, self._running = _rss_bytes(), 0, True
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while self._running:
            self._max = max(self._max, _rss_bytes())
            time.sleep(0.0005)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._running = False
            self._thread.join()
            self.peak = max(self._max, _rss_bytes()) - self._base


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call, synchronized on GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def interleaved_medians(
    candidates: dict[str, Callable[[], object]], repeats: int, device: torch.device, warmup: int = 1
) -> dict[str, dict[str, float]]:
    """Median time of each candidate, calling them in turn (A B C A B C ...) so that machine drift is
    shared; the first ``warmup`` rounds are not counted."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            times[name].append(timed(fn, device))
    return {name: {"median_s": statistics.median(ts), "times_s": ts} for name, ts in times.items()}


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call, as counted by ``torch.utils.flop_counter``."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak_gflops(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    """Measured float32 matmul throughput of this machine (median), the yardstick for 'fraction of peak'."""
    a, b = torch.randn(2, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    a @ b
    times = [timed(lambda: a @ b, device) for _ in range(repeats)]
    return 2 * size**3 / statistics.median(times) / 1e9
