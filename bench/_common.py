"""Shared by the benchmark scripts: the layer shape arguments and a median timer."""

from __future__ import annotations

import argparse
import statistics
import time


def median_s(fn, reps: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def add_layer_shape_args(ap: argparse.ArgumentParser) -> None:
    """--tokens --d-model --d-ff --top-k --experts, defaulting to the issue's grid."""
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 64])
