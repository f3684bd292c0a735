"""Device choices as pure functions of (device name, count, capability, dtype): which GPU a rank
takes and which process group it joins, what precision="auto" means, the peak FLOP/s behind MFU.
No GPU is needed: the tests pass fake device counts, names and bf16 support."""

import pytest
import torch

from moekit.config import RunConfig
from moekit.train import metrics, run
from moekit.train.metrics import PEAK_FLOPS_ENV, device_name, mfu, peak_flops
from moekit.train.run import auto_precision, device_plan, precision_of

NCCL = "cpu:gloo,cuda:nccl"


@pytest.mark.parametrize("name, count, local_rank, device, backend", [
    ("cpu", 0, 0, torch.device("cpu"), "gloo"),
    ("cpu", 8, 3, torch.device("cpu"), "gloo"),         # GPUs visible, CPU asked for: no NCCL, no GPU
    ("auto", 0, 1, torch.device("cpu"), "gloo"),
    ("auto", 2, 1, torch.device("cuda", 1), NCCL),
    ("cuda", 4, 0, torch.device("cuda", 0), NCCL),
    ("cuda", 4, 5, torch.device("cuda", 1), NCCL),      # more ranks than GPUs: LOCAL_RANK % count
    ("auto", 1, 7, torch.device("cuda", 0), NCCL),
])
def test_device_plan_table(name, count, local_rank, device, backend):
    assert device_plan(name, count, local_rank) == (device, backend)


def test_cuda_without_a_gpu_is_one_line_naming_the_field():
    with pytest.raises(ValueError, match=r"train.device='cuda'.*set train.device to 'cpu' or 'auto'"):
        device_plan("cuda", 0, 0)


def joined(monkeypatch, device: str, count: int, local_rank: int) -> dict:
    """What distributed_context does under torchrun with ``count`` fake GPUs."""
    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(run, "_cuda_count", lambda: count)
    monkeypatch.setattr(run.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(run.torch.cuda, "set_device", lambda d: calls.__setitem__("set_device", d))
    monkeypatch.setattr(run.dist, "init_process_group",
                        lambda backend, **kw: calls.__setitem__("init", (backend, kw)))
    assert run.distributed_context(device) == (0, 1)
    return calls


def test_a_cuda_rank_binds_its_gpu_modulo_the_count_and_passes_device_id(monkeypatch):
    calls = joined(monkeypatch, "cuda", count=2, local_rank=3)
    assert calls["set_device"] == torch.device("cuda", 1)
    assert calls["init"] == (NCCL, {"device_id": torch.device("cuda", 1)})


def test_a_cpu_run_joins_gloo_and_touches_no_gpu_even_with_gpus_visible(monkeypatch):
    calls = joined(monkeypatch, "cpu", count=8, local_rank=0)
    assert calls == {"init": ("gloo", {})}


@pytest.mark.parametrize("device_type, bf16, want", [
    ("cuda", True, "bf16"),     # A100, H100, L4, ...
    ("cuda", False, "fp32"),    # V100, T4: no bf16
    ("cpu", True, "fp32"),
    ("cpu", False, "fp32"),
])
def test_auto_precision_table(device_type, bf16, want):
    assert auto_precision(device_type, bf16) == want


@pytest.mark.parametrize("supported, want", [(True, "bf16"), (False, "fp32")])
def test_precision_of_asks_the_gpu_for_bf16(monkeypatch, supported, want):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: supported)
    cfg = RunConfig()
    assert cfg.train.precision == "auto"
    assert precision_of(cfg, torch.device("cuda", 0)) == want
    assert precision_of(cfg, torch.device("cpu")) == "fp32"


@pytest.mark.parametrize("name, precision, want", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),           # SXM
    ("NVIDIA H100 80GB HBM3", "fp32", 67e12),
    ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA H100 NVL", "bf16", 835e12),
    ("NVIDIA H200", "bf16", 989e12),
    ("NVIDIA H200", "tf32", 495e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA A100 80GB PCIe", "fp16", 312e12),
    ("NVIDIA A100-SXM4-40GB", "tf32", 156e12),
    ("NVIDIA L4", "bf16", 121e12),
    ("NVIDIA L40S", "bf16", 362e12),                      # not the L4's row
    ("NVIDIA L40", "fp32", 90.5e12),
    ("NVIDIA GeForce RTX 4090", "bf16", 165e12),
    ("Tesla V100-SXM2-16GB", "fp16", 125e12),
    ("Tesla V100-SXM2-16GB", "bf16", None),               # no bf16 tensor cores
    ("Tesla T4", "fp16", 65e12),
    ("Tesla T4", "fp32", 8.1e12),
    ("NVIDIA B200", "bf16", 2250e12),
    ("cpu", "fp32", 0.30e12),
    ("cpu", "bf16", 2.9e12),
    ("NVIDIA Some Future GPU", "bf16", None),             # unknown: no MFU rather than a wrong one
    ("AMD Instinct MI300X", "bf16", None),
])
def test_peak_flops_table(monkeypatch, name, precision, want):
    monkeypatch.delenv(PEAK_FLOPS_ENV, raising=False)
    assert peak_flops(name, precision) == want


def test_every_table_row_is_reachable():
    for parts, peaks in metrics.CUDA_PEAK_FLOPS:
        name = "NVIDIA " + " ".join(p.upper() for p in parts)
        assert peak_flops(name, "fp32") == peaks["fp32"], name


def test_the_override_replaces_the_table_and_a_bad_one_is_one_line(monkeypatch):
    monkeypatch.setenv(PEAK_FLOPS_ENV, "100e12")
    assert peak_flops("NVIDIA Some Future GPU", "bf16") == 100e12
    assert mfu(1e9, 1e4, "NVIDIA H100 PCIe", "bf16") == pytest.approx(0.1)
    monkeypatch.setenv(PEAK_FLOPS_ENV, "fast")
    with pytest.raises(ValueError, match=r"\$MOEKIT_PEAK_FLOPS='fast': must be a positive FLOP/s"):
        peak_flops("NVIDIA H100 PCIe", "bf16")


def test_mfu_is_none_for_an_unknown_gpu_and_the_formula_elsewhere(monkeypatch):
    monkeypatch.delenv(PEAK_FLOPS_ENV, raising=False)
    assert mfu(1e9, 1e4, "NVIDIA Some Future GPU", "bf16") is None
    assert mfu(6e9, 1e4, "NVIDIA A100-SXM4-80GB", "bf16") == pytest.approx(6e13 / 312e12)
    assert device_name(torch.device("cpu")) == "cpu"
