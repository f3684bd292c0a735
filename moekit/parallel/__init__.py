"""Parallelism from outside the single-device model: expert parallelism (all-to-all
dispatch), data parallelism (DDP / FSDP2), on torch.distributed."""
