"""Metrics: JSONL and TensorBoard in the run directory, namespaced keys, MFU from a formula."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

PEAK_FLOPS = {   # the denominator of MFU, per (device, precision)
    ("cpu", "bf16"): 2.9e12,    # the best large bf16 GEMM measured on a 2-core AMX machine
                                # (docs/benchmarks.md)
    ("cpu", "fp32"): 0.30e12,   # the best large f32 GEMM measured there
    ("cuda", "bf16"): 989e12,   # H100 SXM dense bf16 tensor cores (datasheet)
    ("cuda", "fp32"): 67e12,    # H100 SXM fp32 without TF32 (datasheet)
}


class MetricsWriter:
    """``metrics.jsonl`` (one JSON object per logged step) and TensorBoard event files.

    ``purge_after``: a resumed run's checkpoint step. What the interrupted run logged after it
    is dropped, from the JSONL (rewritten atomically) and from TensorBoard (``purge_step``), so
    every step appears once when the resumed run logs it again."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, purge_after: int | None = None):
        path = run_dir / "metrics.jsonl"
        if purge_after is not None and path.exists():
            _truncate_after(path, purge_after)
        if purge_after is not None:
            _after_older_event_files(run_dir / "tensorboard")
        self.jsonl = open(path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                        purge_step=None if purge_after is None else purge_after + 1)
            except ImportError:   # tensorboard not installed: JSONL only
                self.tb = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def histograms(self, step: int, per_bin: dict[str, list[float]]) -> None:
        """TensorBoard histograms whose bins are the experts (bin e holds expert e's count)."""
        if self.tb is None:
            return
        for key, counts in per_bin.items():
            n = len(counts)
            total = float(sum(counts))
            mean = sum(e * c for e, c in enumerate(counts)) / total if total else 0.0
            self.tb.add_histogram_raw(key, min=0, max=n - 1, num=total, sum=mean * total,
                                      sum_squares=sum(e * e * c for e, c in enumerate(counts)),
                                      bucket_limits=[e + 0.5 for e in range(n)], bucket_counts=list(counts),
                                      global_step=step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _after_older_event_files(tb_dir: Path) -> None:
    """TensorBoard reads a run's event files in name order, and a name starts with the second
    it was made in, then the host and the pid. A resumed writer whose file sorted before the
    interrupted run's (the same second, a lower pid) would have its purge read first and the
    old steps after it: wait until the clock has passed every existing file's second."""
    newest = 0
    for f in tb_dir.glob("events.out.tfevents.*"):
        try:
            newest = max(newest, int(f.name.split(".")[3]))
        except (IndexError, ValueError):
            continue
    # at most 2 s: a name from a skewed clock or a copied run must not hold the resume up
    deadline = min(newest + 1, time.time() + 2)
    while time.time() < deadline:
        time.sleep(0.05)


def _truncate_after(path: Path, step: int) -> None:
    """Keep the records of steps <= ``step`` (a torn last line from a kill goes too)."""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
    os.replace(tmp, path)


def mfu(flops_per_token: float, tokens_per_s: float, device: str, precision: str) -> float:
    """Model FLOPs utilization (PaLM): achieved training FLOP/s over the peak of the device
    in the precision the matmuls run in. CPU peaks are measured rates, not datasheets."""
    peak = PEAK_FLOPS.get((device, precision), PEAK_FLOPS[("cpu", "fp32")])
    return flops_per_token * tokens_per_s / peak
