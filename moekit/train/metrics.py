"""Metrics: JSONL and TensorBoard in the run directory, namespaced keys, MFU from a formula."""

from __future__ import annotations

import json
from pathlib import Path

PEAK_FLOPS = {   # the denominator of MFU, per (device, precision)
    ("cpu", "bf16"): 2.9e12,    # best large bf16 GEMM measured on the 2-core AMX machine (bench_expert_gemm)
    ("cpu", "fp32"): 0.30e12,   # best large f32 GEMM measured there (bench_moe_layer, dense f32)
    ("cuda", "bf16"): 989e12,   # H100 SXM dense bf16 tensor cores (datasheet)
    ("cuda", "fp32"): 67e12,    # H100 SXM fp32 without TF32 (datasheet)
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


def mfu(flops_per_token: float, tokens_per_s: float, device: str, precision: str) -> float:
    """Model FLOPs utilization (PaLM): achieved training FLOP/s over the peak of the device
    in the precision the matmuls run in. CPU peaks are measured rates, not datasheets."""
    peak = PEAK_FLOPS.get((device, precision), PEAK_FLOPS[("cpu", "fp32")])
    return flops_per_token * tokens_per_s / peak
