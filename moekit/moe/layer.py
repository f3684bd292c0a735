"""MoELayer: router -> dispatch -> experts -> combine (+ shared experts).

Shape legend: T tokens (all leading dims flattened), D model dim, E experts, K top-k.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.moe.balance import load_balancing_loss, z_loss
from moekit.moe.dispatch import DispatchPlan, LocalDispatcher
from moekit.moe.experts import DenseFFN, GroupedExperts
from moekit.moe.router import RouterOutput, build_router
from moekit.moe.stats import load_cv, router_entropy


@dataclass
class MoEAux:
    """What one MoE layer reports besides its output. Losses are differentiable scalars;
    the rest are statistics (no gradient)."""

    load_balancing_loss: Tensor   # E * sum_i f_i P_i (K at perfect balance; 0 for expert choice)
    z_loss: Tensor                # mean logsumexp(logits)^2
    tokens_per_expert: Tensor     # [E] kept token->expert assignments (int64)
    dropped_fraction: Tensor      # share of assignments dropped by capacity
    unrouted_fraction: Tensor     # share of tokens that reached no expert (capacity / expert choice)
    load_cv: Tensor               # std / mean of tokens_per_expert (0 = balanced)
    router_entropy: Tensor        # mean entropy of the router distribution, nats (log E = uniform)
    logit_mean: Tensor            # router logits: mean, std and max over tokens and experts
    logit_std: Tensor
    logit_max: Tensor


class MoELayer(nn.Module):
    """A sparse MoE feed-forward layer.

    Example:
        >>> layer = MoELayer(MoEConfig(d_model=32, d_ff=64, num_experts=4, top_k=2))
        >>> y, aux = layer(torch.randn(2, 5, 32))
        >>> y.shape, int(aux.tokens_per_expert.sum())
        (torch.Size([2, 5, 32]), 20)
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = build_router(cfg)
        self.experts = GroupedExperts(cfg)
        self.dispatcher = LocalDispatcher(cfg.num_experts, cfg.top_k, cfg.capacity_factor
                                          if cfg.router != "expert_choice" else None,
                                          cfg.drop_policy)
        # set by moekit.parallel.parallelize for aux_loss_scope="global": a sum over all ranks
        self.stats_all_reduce: Callable[[Tensor], None] | None = None
        self.stats_world = 1
        self.shared = (DenseFFN(cfg.d_model, cfg.d_ff * cfg.num_shared_experts, cfg.activation,
                                cfg.dtype) if cfg.num_shared_experts else None)

    def forward(self, x: Tensor) -> tuple[Tensor, MoEAux]:
        if x.shape[-1] != self.cfg.d_model:
            raise ValueError(f"MoELayer input last dim is {x.shape[-1]}, expected d_model="
                             f"{self.cfg.d_model}; reshape the input or fix MoEConfig.d_model")
        x_TD = x.reshape(-1, x.shape[-1])
        # Under autocast the experts run in the autocast dtype; everything else keeps its own
        # dtype: autocast would otherwise turn the float32 router GEMM and combine into bf16.
        device = x.device.type
        compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            routing = self.router(x_TD)
            x_cast = x_TD.to(compute_dtype)
            x_RD, counts_E, plan = self.dispatcher.dispatch(x_cast, routing)
            y_RD = self.experts(x_RD, counts_E)
            y_TD = self.dispatcher.combine(y_RD, plan)
            if self.shared is not None:
                y_TD = y_TD + self.shared(x_cast)
        return y_TD.view(x.shape), self._aux(routing, plan)

    def _aux(self, routing: RouterOutput, plan: DispatchPlan) -> MoEAux:
        # plan.counts_E: this rank's routing over all E experts (the counts_E the experts saw
        # are per *local* expert under expert parallelism)
        counts_E = plan.counts_E
        T = routing.num_tokens
        if routing.experts_TK is not None:
            lb = load_balancing_loss(routing.probs_TE, routing.experts_TK, self.stats_all_reduce,
                                     self.stats_world)
        else:  # expert choice is balanced by construction
            lb = routing.probs_TE.new_zeros(())
        with torch.no_grad():
            dropped = torch.tensor(plan.dropped_fraction)
            if plan.inverse_A is not None:
                unrouted = torch.tensor(0.0)
            else:
                routed_T = torch.zeros(T, dtype=torch.bool, device=plan.token_R.device)
                routed_T[plan.token_R] = True
                unrouted = 1.0 - routed_T.float().mean() if T else torch.tensor(0.0)
            logits = routing.logits_TE.detach()
            if logits.numel():
                l_mean, l_std, l_max = logits.mean(), logits.std(unbiased=False), logits.max()
            else:
                l_mean = l_std = l_max = logits.new_zeros(())
        return MoEAux(load_balancing_loss=lb, z_loss=z_loss(routing.logits_TE),
                      tokens_per_expert=counts_E, dropped_fraction=dropped,
                      unrouted_fraction=unrouted, load_cv=load_cv(counts_E),
                      router_entropy=router_entropy(routing.probs_TE),
                      logit_mean=l_mean, logit_std=l_std, logit_max=l_max)

    @torch.no_grad()
    def update_router_bias(self, tokens_per_expert_E: Tensor) -> None:
        """Aux-loss-free balancing step (DeepSeek-V3); see :meth:`TopKRouter.update_bias`."""
        self.router.update_bias(tokens_per_expert_E)
