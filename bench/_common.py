"""Shared by the benchmark scripts: the layer shape arguments, a median timer, training one
arm with ``moekit train`` (where a curve first reaches a loss: moekit.report.compare)."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def train_arm(run: Path, argv: list[str], sets: list[str], command: list[str] = ("train",)) -> float:
    """``moekit COMMAND --out RUN ARGV --set S ...`` (``train``, or e.g. ``finetune SRC``), or a
    finished run's reuse; its wall-clock in seconds, kept in RUN/wall_s.json, so an interrupted
    benchmark continues."""
    wall = Path(run) / "wall_s.json"
    if not wall.exists():
        cmd = [*command, "--out", str(run), *argv, *[x for s in sets for x in ("--set", s)]]
        print("$ moekit " + " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "moekit", *cmd], check=True, stdout=subprocess.DEVNULL)
        wall.write_text(json.dumps(time.perf_counter() - t0))
    return json.loads(wall.read_text())


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
