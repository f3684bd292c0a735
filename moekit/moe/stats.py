"""Routing statistics: what the router is doing, as numbers (no gradients).

Shape legend: T tokens, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def load_cv(tokens_per_expert_E: Tensor) -> Tensor:
    """Coefficient of variation of the expert loads, std / mean (0 = perfectly balanced)."""
    load_E = tokens_per_expert_E.float()
    mean = load_E.mean()
    if mean == 0:
        return torch.zeros((), device=load_E.device)
    return load_E.std(unbiased=False) / mean


@torch.no_grad()
def router_entropy(probs_TE: Tensor) -> Tensor:
    """Mean over tokens of the entropy of the router distribution, in nats
    (log E for a uniform router, 0 for a one-hot one)."""
    if probs_TE.shape[0] == 0:
        return torch.zeros((), device=probs_TE.device)
    return -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1).mean()
