"""Metrics: JSONL and TensorBoard in the run directory, namespaced keys, MFU from a formula."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

# The denominator of MFU: dense (no 2:4 sparsity) peak FLOP/s per precision, from each
# datasheet. "fp32" is plain fp32 (moekit leaves TF32 off); "tf32" is there for an override's
# sake and for runs that turn it on. None: the precision has no tensor-core path there.
PEAK_FLOPS_CPU = {"bf16": 2.9e12,   # the best large bf16 GEMM measured on a 2-core AMX machine
                  "fp32": 0.30e12}  # the best large f32 GEMM measured there (docs/benchmarks.md)

# (substrings of torch.cuda.get_device_name(), all present, lower case) -> peaks; the first
# row that matches wins, so the more specific names come first ("h100 pcie" before "h100").
CUDA_PEAK_FLOPS: list[tuple[tuple[str, ...], dict[str, float | None]]] = [
    (("b200",), {"bf16": 2250e12, "fp16": 2250e12, "tf32": 1100e12, "fp32": 75e12}),
    (("h200", "nvl"), {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    (("h200",), {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12}),
    (("h100", "pcie"), {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    (("h100", "nvl"), {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    (("h100",), {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12}),      # SXM (HBM3), GH200
    (("a100",), {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (("l40s",), {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    (("l40",), {"bf16": 181e12, "fp16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12}),
    (("l4",), {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    (("a10",), {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    (("rtx 4090",), {"bf16": 165e12, "fp16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12}),   # fp32 accumulate
    (("v100",), {"bf16": None, "fp16": 125e12, "tf32": None, "fp32": 15.7e12}),     # SXM2
    (("t4",), {"bf16": None, "fp16": 65e12, "tf32": None, "fp32": 8.1e12}),
]

PEAK_FLOPS_ENV = "MOEKIT_PEAK_FLOPS"     # FLOP/s of one device: overrides the table (any device)


def peak_flops(device_name: str, precision: str) -> float | None:
    """Peak FLOP/s of one ``device_name`` ("cpu" or torch.cuda.get_device_name()) in
    ``precision`` ("bf16", "fp16", "tf32", "fp32"); ``$MOEKIT_PEAK_FLOPS`` overrides it. None for
    a GPU the table does not know: no MFU rather than a wrong one.

    Example:
        >>> peak_flops("NVIDIA H100 PCIe", "bf16")      # doctest: +SKIP
        756000000000000.0
    """
    override = os.environ.get(PEAK_FLOPS_ENV)
    if override:
        try:
            value = float(override)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise ValueError(f"${PEAK_FLOPS_ENV}={override!r}: must be a positive FLOP/s (e.g. 989e12); "
                             "unset it to use the table in moekit/train/metrics.py")
        return value
    if device_name == "cpu":
        return PEAK_FLOPS_CPU.get(precision)
    name = device_name.lower()
    for parts, peaks in CUDA_PEAK_FLOPS:
        if all(part in name for part in parts):
            return peaks.get(precision)
    return None


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


def mfu(flops_per_token: float, tokens_per_s: float, device_name: str, precision: str) -> float | None:
    """Model FLOPs utilization (PaLM): achieved training FLOP/s over the peak of the device
    in the precision the matmuls run in (:func:`peak_flops`); None where the peak is unknown.
    CPU peaks are measured rates, not datasheets."""
    peak = peak_flops(device_name, precision)
    return None if peak is None else flops_per_token * tokens_per_s / peak


def device_name(device: torch.device) -> str:
    """"cpu", or the CUDA device's name (the key of :data:`CUDA_PEAK_FLOPS`)."""
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device)
