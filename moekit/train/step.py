"""One optimizer step, for any objective.

    stats = train_step(run, micro_batches, objective)

An *objective* (moekit.train.objectives) maps (model output, batch) to a Loss: the scalar
that backward sees and its named parts (logged as ``loss/<name>``). Pretraining,
fine-tuning, distillation, federated rounds and search trials each pass theirs, and get
gradient accumulation, every parallel layout, clipping, the aux-loss-free bias update, the
compute-budget controller, telemetry and non-finite protection from here.

Gradient accumulation over k micro-batches is the mean of their losses: each backward
sees loss / k, so k micro-batches of B give the gradient of one batch of k*B (when the
objective is a mean over equally many tokens per micro-batch), and the gradients are
reduced across ranks in the last micro-batch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moekit.train.objectives import Batch, Objective
from moekit.train.optim import lr_at


@dataclass
class StepStats:
    losses: dict[str, float]            # each part's mean over micro-batches (and ranks)
    grad_norm: float                    # global, before clipping
    lr: float
    tokens: int                         # input tokens of the step, all ranks
    skipped: bool = False               # non-finite loss or gradient: no update was made


def _reduce(losses: dict[str, float], counts: dict, world: int) -> tuple[dict[str, float], dict]:
    """One all-reduce per step: the losses averaged over ranks and the counts (the aux-loss-free
    bias and the budget controller: every rank must move them the same way) summed."""
    names = list(losses)
    parts = [torch.tensor([losses[n] for n in names], dtype=torch.float64)]
    parts += [c.double().cpu() for c in counts.values()]
    flat = torch.cat(parts)
    dist.all_reduce(flat)
    pieces = flat.split([len(t) for t in parts])
    summed = {i: t.to(c.device, c.dtype) for (i, c), t in zip(counts.items(), pieces[1:])}
    return dict(zip(names, (pieces[0] / world).tolist())), summed


def train_step(run, micro_batches: list[Batch], objective: Objective) -> StepStats:
    """Forward and backward every micro-batch, reduce, clip, and (if the loss and gradient
    norm are finite) take the optimizer step and the aux-loss-free bias update; the step
    counter advances either way. ``run``: a moekit.train.run.Run."""
    if not micro_batches:
        raise ValueError("train_step: no micro-batches; pass at least one Batch")
    lr = lr_at(run.step, run.cfg.train)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr
    k = len(micro_batches)
    # summed over the step for the updates outside backward: tokens per expert for the
    # aux-loss-free bias, tokens per number of experts for the compute-budget controller
    counts = {("bias", i): 0 for i, layer in run.moe_layers.items() if layer.cfg.aux_loss_free}
    counts.update({("k", i): 0 for i, layer in run.moe_layers.items() if layer.cfg.target_k is not None})
    by_tag = run.model.cfg.routes_by_tag   # task-level routing: the routers read each window's tag
    sums: dict[str, float] = {}
    stats = StepStats(losses={}, grad_norm=0.0, lr=lr, tokens=0)
    for j, batch in enumerate(micro_batches):
        batch = _on(batch, run.device)
        with run.accumulate(j == k - 1):
            with run.autocast():
                out = run.forward(batch.inputs, tags=batch.tags) if by_tag else run.forward(batch.inputs)
            loss = objective(out, batch)
            (loss.total / k).backward()
        for name, value in loss.parts.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        sums["total"] = sums.get("total", 0.0) + float(loss.total.detach())
        for kind, i in counts:
            aux = out.moe[i]
            step_counts = aux.tokens_per_expert if kind == "bias" else aux.experts_per_token
            counts[kind, i] = counts[kind, i] + step_counts
        if run.telemetry is not None:
            run.telemetry.update(out.moe)
        stats.tokens += batch.inputs.numel() * run.world
    run.sync_expert_grads()
    losses = {name: s / k for name, s in sums.items()}
    if run.world > 1:
        losses, counts = _reduce(losses, counts, run.world)
    stats.losses = losses
    stats.grad_norm = run.clip_grad_norm()
    stats.skipped = not (math.isfinite(losses["total"]) and math.isfinite(stats.grad_norm))
    if not stats.skipped:
        run.optimizer.step()
        for (kind, i), c in counts.items():
            layer = run.moe_layers[i]
            layer.update_router_bias(c) if kind == "bias" else layer.update_budget(c)
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return stats


def _on(batch: Batch, device: torch.device) -> Batch:
    """The batch on the run's device (``.to`` returns the same tensor when it is there already)."""
    tags = batch.tags.to(device) if batch.tags is not None else None
    return Batch(batch.inputs.to(device), batch.targets.to(device), tags)
