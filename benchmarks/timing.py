"""Interleaved median timing, shared by the benchmark scripts.

Every variant runs once per round, round-robin, after one warm-up round that is not counted;
the median over rounds is reported. Interleaving spreads load from other processes over all
variants alike, so ratios taken within one run stay meaningful on a shared machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_medians(calls: dict[str, Callable[[], object]], rounds: int, *,
                        clock: Callable[[], float] = time.perf_counter,
                        sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Median seconds of each ``calls[name]()`` over ``rounds`` interleaved rounds (plus one
    warm-up round). ``sync`` (e.g. ``torch.cuda.synchronize``) runs before and after each call,
    so asynchronous devices are timed to completion; ``clock`` may be ``time.thread_time``."""
    if rounds < 1:
        raise ValueError(f"interleaved_medians: rounds must be >= 1; got {rounds}")
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(rounds + 1):
        for name, call in calls.items():
            if sync is not None:
                sync()
            t0 = clock()
            call()
            if sync is not None:
                sync()
            if r:  # round 0 warms up
                times[name].append(clock() - t0)
    return {name: statistics.median(v) for name, v in times.items()}
