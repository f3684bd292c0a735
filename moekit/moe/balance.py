"""Balancing losses and the aux-loss-free bias rule.

Shape legend: T tokens, E experts, K experts per token.

Load-balancing loss (Switch eq. 4-6, GShard):  E * sum_i f_i * P_i
  f_i  fraction of tokens routed to expert i, counting all top-k assignments of a token
       (so sum_i f_i = K),
  P_i  mean router probability of expert i over tokens.
This is the convention of transformers' ``load_balancing_loss_func`` (Mixtral, OLMoE,
Qwen-MoE): at perfect balance the loss equals K. Switch (K=1) and MegaBlocks divide f_i
by K (each token counted once), which gives 1 at perfect balance for any K; to compare
coefficients with those codebases, divide ours by K (or scale their coefficient by 1/K).
The gradient flows through P_i only; f_i is a count.

With a dynamic number of experts per token (moekit.moe.dynamic) the same formula holds with
f_i over the assignments made: sum_i f_i = mean k, so the loss is mean k at perfect balance.
P_i is the distribution the router selects by: softmax probabilities (top_p); the real
experts' share of the E + N softmax renormalised to sum 1 (null: the null experts cost nothing
and are not balanced, and balancing the real ones puts no pressure on the null mass, which
would otherwise grow to lower the loss); each token's gates normalised to sum 1 (relu). The
z-loss covers every logit, the null experts' too, except under relu routing, where it is 0:
there is no exponential to stabilise, and pushing the logits down would switch experts off
behind the budget controller's back. Aux-loss-free balancing moves the bias by the variable
counts as it is.

Router z-loss (ST-MoE eq. 5): mean over tokens of logsumexp(logits)^2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


def tokens_per_expert(experts_TK: Tensor, num_experts: int) -> Tensor:
    """Counts of token->expert assignments: [E] int64 (a dynamic-k slot holding id E, no
    expert, is not counted)."""
    ids = experts_TK.reshape(-1)
    # a fixed-size scatter, not bincount: its data-dependent output shape breaks torch.compile's graph
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    return counts.scatter_add_(0, ids, torch.ones_like(ids, dtype=torch.int64))[:num_experts]


@dataclass(frozen=True)
class StatsReducer:
    """How a layer sums its load-balancing statistics over ranks (``aux_loss_scope="global"``).

    ``all_reduce`` sums a tensor in place over ``world`` ranks; moekit.parallel builds it
    (a process-group all-reduce), so the layer needs no process group. One process needs none.
    """

    all_reduce: Callable[[Tensor], None]
    world: int


def load_balancing_loss(probs_TE: Tensor, experts_TK: Tensor, reducer: StatsReducer | None = None) -> Tensor:
    """E * sum_i f_i * P_i with f_i over all K assignments (equals K at perfect balance).

    With a ``reducer``, f_i comes from every rank's tokens and P_i is this rank's share of the
    global mean, so the mean of the ranks' losses (what data parallelism optimizes) is the loss
    of one process on the global batch, for any token counts. Every rank must call it, with or
    without tokens."""
    num_tokens, num_experts = probs_TE.shape
    counts_E = tokens_per_expert(experts_TK, num_experts).to(probs_TE.dtype)
    if reducer is not None:
        with torch.no_grad():
            stats = torch.cat([counts_E, counts_E.new_tensor([num_tokens])])
            reducer.all_reduce(stats)
        # no tokens anywhere: the counts are zero and so is the loss; a tensor total, no host sync
        counts_E, total = stats[:-1], stats[-1].clamp_min(1)
        return num_experts * torch.dot(counts_E / total, probs_TE.sum(dim=0)) * (reducer.world / total)
    if num_tokens == 0:   # an empty batch is perfectly uninformative, not NaN
        return probs_TE.sum() * 0.0
    return num_experts * torch.dot(counts_E / num_tokens, probs_TE.mean(dim=0))


def z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean_t logsumexp(logits_t)^2, in float32 (0 for no tokens)."""
    if logits_TE.shape[0] == 0:
        return logits_TE.float().sum() * 0.0
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()
