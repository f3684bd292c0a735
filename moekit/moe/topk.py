"""Top-k with ties broken towards the lower index (router.py and dynamic.py choose with it)."""

from __future__ import annotations

import torch
from torch import Tensor


def topk_stable(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k along the last dim of a float32 tensor; among equal scores the lower index wins.

    ``torch.topk`` alone breaks ties arbitrarily, and a stable sort costs far more than a
    top-k at many experts (docs/benchmarks.md), so we take the top-k of an int64 key: the
    float's bits made order-preserving (negative floats have their magnitude bits flipped),
    then the reversed index below them.
    """
    n = scores.shape[-1]
    bits = (scores.detach().float() + 0.0).view(torch.int32).to(torch.int64)  # -0.0 -> +0.0
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    reversed_index = torch.arange(n - 1, -1, -1, device=scores.device)
    indices = torch.topk(bits * n + reversed_index, k, dim=-1).indices
    return scores.gather(-1, indices), indices
