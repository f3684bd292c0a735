"""Evaluation: the language-model loss, and the mean validation loss of a model.

Shape legend: B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moekit.data.stream import PackedSplit
from moekit.model.transformer import tag_kwargs


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in float32; targets of -100 are ignored.

    Example:
        >>> round(float(lm_loss(torch.zeros(1, 2, 4), torch.tensor([[0, 3]]))), 4)   # ln 4
        1.3863
    """
    return F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())


def eval_windows(val, batch_size: int, batches: int | None) -> int:
    """How many validation windows :func:`evaluate` averages over (a mixture: all its sources')."""
    if hasattr(val, "parts"):
        return sum(eval_windows(part, batch_size, batches) for part in val.parts)
    n = len(val) // batch_size if batches is None else min(batches, max(1, len(val) // batch_size))
    return min(max(n, 1) * batch_size, len(val))


@torch.no_grad()
def evaluate(model, val: PackedSplit, batch_size: int, device: torch.device, batches: int | None,
             rank: int = 0, world: int = 1, autocast=nullcontext, loads: dict | None = None,
             by_source: dict | None = None) -> float:
    """Mean LM loss over the first ``batches`` x batch_size windows of the validation split
    (all whole batches if None); ``loads``: a dict that receives {MoE layer: [tokens per expert]}
    over those windows (all ranks' tokens). The same windows for every layout: with several ranks, rank
    r takes windows r, r + world, ... and the sums are all-reduced. Every rank runs the same
    number of forward passes (a rank out of windows runs one with weight 0), since FSDP and
    expert parallelism communicate inside the forward. ``autocast``: a context factory
    (the run's precision).

    A data mixture's split (moekit.data.mixture.MixtureSplit): the mean of its sources' losses
    (each over its own first windows) weighted as training samples them; ``by_source``
    receives {tag: loss}."""
    if hasattr(val, "parts"):
        losses = {}
        for name, part in zip(val.names, val.parts):
            mine = {} if loads is not None else None
            losses[name] = evaluate(model, part, batch_size, device, batches, rank, world, autocast, mine)
            for i, c in (mine or {}).items():
                loads[i] = [a + b for a, b in zip(loads[i], c)] if i in loads else c
        if by_source is not None:
            by_source.update(losses)
        return sum(w * loss for w, loss in zip(val.weights, losses.values())) / sum(val.weights)
    if batches is not None and batches < 1:
        raise ValueError(f"evaluate: batches={batches}: must be >= 1 (or None for the whole split)")
    if len(val) == 0:
        raise ValueError("evaluate: the validation split has no whole window; use a shorter seq_len "
                         "or more validation text")
    was_training = model.training
    model.eval()
    B = batch_size
    windows = eval_windows(val, B, batches)
    mine = list(range(rank, windows, world))
    calls = math.ceil(math.ceil(windows / world) / B)
    total, count, counts = 0.0, 0, {}
    for b in range(calls):
        idx = mine[b * B:(b + 1) * B]
        weight = len(idx)
        x, y, tags = val.batch(idx or [0])
        with autocast():
            # task-level routing: each window's tag, as the router indexes it
            out = model(x.to(device), **tag_kwargs(model.cfg, val.tags, tags, device))
        total += float(lm_loss(out.logits, y.to(device))) * weight
        count += weight
        for i, aux in (out.moe.items() if loads is not None and weight else ()):
            counts[i] = counts.get(i, 0) + aux.tokens_per_expert.double().cpu()
    if world > 1:
        sums = torch.tensor([total, count], dtype=torch.float64)
        dist.all_reduce(sums)
        total, count = sums.tolist()
    if loads is not None:
        loads.update(_summed(counts, model, world))
    model.train(was_training)
    return total / count


def _summed(counts: dict, model, world: int) -> dict[int, list[float]]:
    """{MoE layer: tokens per expert} over all ranks (a rank without windows counted none)."""
    sizes = {i: layer.cfg.num_experts for i, layer in sorted(model.moe_layers().items())}
    if not sizes:
        return {}
    flat = torch.cat([counts.get(i, torch.zeros(n, dtype=torch.float64)) for i, n in sizes.items()])
    if world > 1:
        dist.all_reduce(flat)
    return {i: part.tolist() for i, part in zip(sizes, flat.split(list(sizes.values())))}
