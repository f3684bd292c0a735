"""A dynamic number of experts per token (``MoEConfig.dynamic_k``; docs/dynamic_routing.md).

Shape legend: T tokens, E experts, N null experts, M = max_k slots per token.

Every mode returns the same padded form: ``experts_TM`` holds each token's experts in its M
slots, and a slot the token does not use holds the expert id E ("no expert") with weight 0.
The dispatcher drops those slots before any GEMM, so a token with j experts costs j expert
FFNs, and a token with none is carried by the residual alone.

- ``top_p`` (Huang et al. 2024): experts in order of score, each taken while the probability
  mass of those before it is below p; at least min_k, at most max_k. Combine weights are the
  probabilities of the taken experts (renormalised with ``normalize_topk``).
- ``null`` (AdaMoE, Zeng et al. 2024): the router scores E experts and N null experts (zero
  output, zero compute) and takes the top_k of all E + N; the weights are normalised over all
  k chosen (``normalize_topk``), so choosing a null expert also scales the others down, which is
  how the null logits learn. A token gets 0 to top_k real experts.
- ``relu`` (ReMoE, Wang et al. 2024): gates relu(logits); every positive gate, up to max_k
  (largest first), is an expert with that gate as its weight (no normalisation). Sparsity comes
  from the L1 penalty :func:`relu_l1`.

The compute-budget controller (:func:`update_budget`) holds the mean number of real experts
per token at ``target_k`` by moving one number per layer, the router's ``k_control`` buffer,
after each optimizer step and outside the backward pass (as the aux-loss-free bias is): p for
top_p, the null experts' selection logit bias for null, the L1 coefficient for relu.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.moe.config import MoEConfig
from moekit.moe.topk import topk_stable

P_MIN = 1e-6                 # top_p's controller keeps p in [P_MIN, 1]: p > 0 means min_k experts
L1_RANGE = (1e-12, 1e4)      # and relu's the L1 coefficient in this range


def initial_control(cfg: MoEConfig) -> float:
    """The controller's starting value: p, the null logit bias (0) or the L1 coefficient."""
    return {"top_p": cfg.top_p, "null": 0.0, "relu": cfg.relu_l1}[cfg.dynamic_k]


def top_p_slots(probs_TE: Tensor, choice_TE: Tensor, p: Tensor, k_min: int, k_max: int
                ) -> tuple[Tensor, Tensor, Tensor]:
    """(experts_TM with unused slots as E, order_TM, active_TM): the top max_k by ``choice_TE``
    (the probabilities, or a sigmoid router's biased scores) in ``order_TM``, each active while
    the mass of the ones before it (a float32 running sum, in slot order) is below p, the first
    min_k always, and all of them at p = 1."""
    E = probs_TE.shape[1]
    order_TM = topk_stable(choice_TE.detach(), k_max)[1]
    mass_TM = torch.cumsum(probs_TE.detach().gather(1, order_TM), dim=1)
    before_TM = torch.cat([torch.zeros_like(mass_TM[:, :1]), mass_TM[:, :-1]], dim=1)
    first_M = torch.arange(k_max, device=probs_TE.device) < k_min
    # p = 1 takes every max_k: a float32 running sum can reach 1 before the last slot
    active_TM = (before_TM < p) | first_M | (p >= 1)
    return torch.where(active_TM, order_TM, E), order_TM, active_TM


def null_slots(choice_TX: Tensor, k: int, num_experts: int) -> tuple[Tensor, Tensor]:
    """(experts_TK with null choices as E, ids_TK into the E + N scores) of the top k."""
    ids_TK = topk_stable(choice_TX.detach(), k)[1]
    return torch.where(ids_TK < num_experts, ids_TK, num_experts), ids_TK


def relu_slots(gates_TE: Tensor, k_max: int) -> tuple[Tensor, Tensor]:
    """(experts_TM, weights_TM): the largest max_k gates of each token; a zero gate is no expert."""
    E = gates_TE.shape[1]
    experts_TM = topk_stable(gates_TE.detach(), k_max)[1]
    weights_TM = gates_TE.gather(1, experts_TM)
    return torch.where(weights_TM.detach() > 0, experts_TM, E), weights_TM


def relu_l1(gates_TE: Tensor, counts_E: Tensor, coef: Tensor) -> Tensor:
    """ReMoE's load-weighted L1 penalty, coef * sum_e f_e * mean_t gate_te, with f_e = E *
    count_e / sum(counts) (1 for every expert at perfect balance; a count, no gradient): busier
    experts' gates are pushed down harder, which balances as it sparsifies. 0 for no tokens."""
    T, E = gates_TE.shape
    if T == 0:
        return gates_TE.sum() * 0.0
    f_E = E * counts_E.to(gates_TE.dtype) / counts_E.sum().clamp_min(1).to(gates_TE.dtype)
    return coef.detach() * torch.dot(f_E, gates_TE.mean(dim=0))


def experts_per_token_hist(experts_TM: Tensor, num_experts: int, k_max: int) -> Tensor:
    """[k_max + 1] int64: how many tokens were routed to 0, 1, ..., k_max real experts."""
    k_T = (experts_TM < num_experts).sum(dim=1)
    return torch.bincount(k_T, minlength=k_max + 1)


def mean_k(hist_K: Tensor) -> Tensor:
    """Mean real experts per token of a histogram (0 for no tokens), float64."""
    hist = hist_K.double()
    k_K = torch.arange(len(hist), dtype=torch.float64, device=hist.device)
    return (hist * k_K).sum() / hist.sum().clamp_min(1)


@torch.no_grad()
def update_budget(control: Tensor, cfg: MoEConfig, hist_K: Tensor) -> None:
    """One controller step from a step's histogram (summed over micro-batches and ranks):
    s = sign(mean k - target_k), then p -= rate * s (top_p, kept in [P_MIN, 1]), null bias +=
    rate * s (more null choices when over budget), L1 coefficient *= (1 + rate) ** s (relu,
    ReMoE's multiplicative rule, kept in L1_RANGE). No tokens, or no target: nothing moves."""
    if cfg.target_k is None:
        return
    hist = hist_K.to(control.device)
    s = torch.sign(mean_k(hist) - cfg.target_k).float() * (hist.sum() > 0).float()
    rate = cfg.rate
    if cfg.dynamic_k == "top_p":
        control.copy_((control - rate * s).clamp(min=P_MIN, max=1.0))
    elif cfg.dynamic_k == "null":
        control.add_(rate * s)
    else:   # kept finite: an infinite coefficient would make every step non-finite, for good
        control.copy_((control * (1.0 + rate) ** s).clamp(min=L1_RANGE[0], max=L1_RANGE[1]))
