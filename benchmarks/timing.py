"""Shared by the benchmark scripts: the median wall time of a call."""

from __future__ import annotations

import statistics
import time


def median_time(fn, repeat: int = 3) -> float:
    """Median seconds of `repeat` calls of `fn` (medians: these machines are shared and noisy)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
