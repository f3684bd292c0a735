"""AdamW with weight-decay groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from moekit.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float, router_lr_scale: float = 1.0) -> list[dict]:
    """Decay matrices (linear and expert weights, embeddings); no decay on norms, biases,
    routers and the shared-expert gate (decaying a gate's or router's weights pulls its
    logits to zero: routing is not a capacity to regularise). With ``router_lr_scale`` != 1
    the routers are a third group whose ``lr_scale`` multiplies the schedule's LR."""
    decay, no_decay, routers = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".router." in name and router_lr_scale != 1.0:
            routers.append(p)
        elif p.ndim < 2 or ".router." in name or ".shared_gate." in name or name.endswith("norm.weight"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if routers:
        groups.append({"params": routers, "weight_decay": 0.0, "lr_scale": router_lr_scale})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.router_lr_scale), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine to cfg.lr * min_lr_ratio at ``decay_steps``
    (= max_steps unless a run was extended), then that floor. A pure function of the step,
    so a resumed run follows the same schedule exactly.

    Example:
        >>> cfg = TrainConfig(lr=1.0, warmup_steps=2, max_steps=10, min_lr_ratio=0.1)
        >>> [round(lr_at(s, cfg), 3) for s in (0, 1, 2, 10, 20)]
        [0.5, 1.0, 1.0, 0.1, 0.1]
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    end = cfg.max_steps if cfg.decay_steps is None else cfg.decay_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, end - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))
