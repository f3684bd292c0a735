"""Metrics: JSONL and TensorBoard in the run directory, namespaced keys, MFU from a formula."""

from __future__ import annotations

import json
from pathlib import Path

PEAK_FLOPS = {   # dense bf16 (or f32 on CPU) peak, per device, for MFU
    "cpu": 2.0e12,          # measured ~2.5-2.9 TFLOP/s for large bf16 GEMMs on the 2-core AMX machine
    "cuda": 989e12,         # H100 SXM bf16 dense
}


class MetricsWriter:
    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            except ImportError:   # tensorboard not installed: JSONL only
                self.tb = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def mfu(flops_per_token: float, tokens_per_s: float, device: str) -> float:
    """Model FLOPs utilization: achieved training FLOP/s over the device's peak."""
    return flops_per_token * tokens_per_s / PEAK_FLOPS.get(device, PEAK_FLOPS["cpu"])
