"""Routing statistics: what the router is doing, as numbers (no gradients).

Shape legend: T tokens, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def load_cv(tokens_per_expert_E: Tensor) -> Tensor:
    """Coefficient of variation of the expert loads, std / mean (0 = perfectly balanced, and 0
    for no load at all).

    No branch on the values: a Python ``if`` on a tensor would wait for the device on every
    layer of every forward. All-zero loads have std 0, and 0 / tiny is 0; a mean of at least
    ``tiny`` (any real count) is divided by unchanged.
    """
    load_E = tokens_per_expert_E.float()
    return load_E.std(unbiased=False) / load_E.mean().clamp_min(torch.finfo(torch.float32).tiny)


@torch.no_grad()
def router_entropy(probs_TE: Tensor) -> Tensor:
    """Mean over tokens of the entropy of the router distribution, in nats
    (log E for a uniform router, 0 for a one-hot one)."""
    if probs_TE.shape[0] == 0:
        return torch.zeros((), device=probs_TE.device)
    return -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1).mean()
