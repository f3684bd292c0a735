"""MoELayer: router -> dispatch -> experts -> combine (+ shared experts, optionally gated).

Shape legend: T tokens (all leading dims flattened), D model dim, E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.moe import dynamic
from moekit.moe.balance import StatsReducer, load_balancing_loss, z_loss
from moekit.moe.config import MoEConfig
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
    experts_per_token: Tensor     # [max_k + 1] int64: tokens routed to 0, 1, ..., max_k experts
    sparsity_loss: Tensor         # relu routing: coef * ReMoE's L1 penalty (added unscaled); else 0


_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class MoELayer(nn.Module):
    """A sparse MoE feed-forward layer.

    Input: ``x`` [..., D], a float32, bfloat16 or float16 tensor with real data (not on the
    meta device). Returns (y [..., D] in x's dtype, :class:`MoEAux`).

    A NaN (or inf) in one token's input is not contained: that token's output is NaN, and so
    are the load-balancing and z losses (they average over every token's router scores), so
    any loss that adds them is NaN. Its backward makes the router's gradient NaN, and those
    of the experts the token reached; in a model the token's input gradient carries the NaN
    into every layer below, and one optimizer step into every token. The layer does not look
    for it (that would be a host sync per forward): check the data, or skip non-finite steps.

    Expert parallelism (moekit.parallel) changes two declared parts, nothing else:
    ``stats_reducer`` sums the load-balancing statistics over ranks (``aux_loss_scope=
    "global"``), and :meth:`keep_experts` keeps this rank's ``expert_range`` of the experts.

    Example:
        >>> layer = MoELayer(MoEConfig(d_model=32, d_ff=64, num_experts=4, top_k=2))
        >>> y, aux = layer(torch.randn(2, 5, 32))
        >>> y.shape, int(aux.tokens_per_expert.sum()), layer.expert_range
        (torch.Size([2, 5, 32]), 20, (0, 4))
    """

    def __init__(self, cfg: MoEConfig):
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"MoELayer cfg: got {type(cfg).__name__}, expected an MoEConfig; "
                            "build one with MoEConfig(d_model=..., d_ff=...)")
        super().__init__()
        self.cfg = cfg
        self.router = build_router(cfg)
        self.experts = GroupedExperts(cfg)
        self.dispatcher = LocalDispatcher(cfg.num_experts, cfg.top_k, cfg.capacity_factor
                                          if cfg.router != "expert_choice" else None,
                                          cfg.drop_policy)
        self.stats_reducer: StatsReducer | None = None   # None: this process's tokens only
        self.expert_range: tuple[int, int] = (0, cfg.num_experts)   # the experts this layer holds
        self.shared = (DenseFFN(cfg.d_model, cfg.shared_width, cfg.activation, cfg.dtype)
                       if cfg.num_shared_experts else None)
        # Qwen2-MoE's gate on the shared FFN: one logit per token, weight [1, D]
        self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False, dtype=cfg.dtype) if cfg.shared_gate else None

    @property
    def experts_sharded(self) -> bool:
        """True once :meth:`keep_experts` left this layer a strict part of the experts."""
        return self.expert_range != (0, self.cfg.num_experts)

    @torch.no_grad()
    def keep_experts(self, lo: int, hi: int, dispatcher: LocalDispatcher) -> None:
        """Keep experts ``lo .. hi-1`` (as new parameters: build the optimizer afterwards) and
        route through ``dispatcher``, which must hand the experts exactly the rows of those
        experts (expert parallelism: an all-to-all dispatcher). The router still scores all
        E experts, and the statistics in :class:`MoEAux` still count all E."""
        E = self.cfg.num_experts
        if self.experts_sharded:
            raise ValueError(f"MoELayer.keep_experts: the layer already holds experts {self.expert_range}; "
                             "shard a layer once, from the full one")
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo < hi <= E):
            raise ValueError(f"MoELayer.keep_experts: ({lo!r}, {hi!r}) is not a non-empty range of the "
                             f"{E} experts; pass integers 0 <= lo < hi <= num_experts={E}")
        ex = self.experts
        for name in ("w_gate_EDF", "w_up_EDF", "w_down_EFD"):
            w = getattr(ex, name)
            if w is not None:
                setattr(ex, name, nn.Parameter(w[lo:hi].clone(), requires_grad=w.requires_grad))
        self.dispatcher = dispatcher
        self.expert_range = (lo, hi)

    def _check_input(self, x) -> None:
        """Python attribute checks only: nothing here reads tensor data (no host sync)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"MoELayer input x: got {type(x).__name__}, expected a torch.Tensor "
                            f"[..., d_model={self.cfg.d_model}]; pass torch.as_tensor(x)")
        if x.dtype not in _INPUT_DTYPES:
            kind = "is not a floating type" if not x.dtype.is_floating_point else "is not supported"
            raise ValueError(f"MoELayer input x: dtype {x.dtype} {kind}; pass float32 or bfloat16 "
                             "(or float16), e.g. x.float()")
        if x.device.type == "meta":
            raise ValueError("MoELayer input x: is on the meta device (a shape without data); "
                             "allocate it on a real device (cpu, cuda)")
        if x.dim() == 0:
            raise ValueError(f"MoELayer input x: a 0-d tensor has no model dim; pass shape [..., "
                             f"d_model={self.cfg.d_model}]")
        if x.shape[-1] != self.cfg.d_model:
            raise ValueError(f"MoELayer input last dim is {x.shape[-1]}, expected d_model="
                             f"{self.cfg.d_model}; reshape the input or fix MoEConfig.d_model")

    def _check_tags(self, tags, x_TD: Tensor):
        """tags [...] (one per token of x) -> tags_T [T] int64, or None when the router reads no tag."""
        if self.cfg.router_input == "token":
            return None
        if tags is None:
            raise ValueError(f"MoELayer routes by tag (router_input={self.cfg.router_input!r}): pass "
                             "tags_T, each token's index into MoEConfig.route_tags")
        if not isinstance(tags, Tensor) or tags.dtype.is_floating_point or tags.dtype == torch.bool:
            raise ValueError(f"MoELayer tags_T: got {getattr(tags, 'dtype', type(tags).__name__)}, expected "
                             "an integer tensor of indices into MoEConfig.route_tags")
        if tags.numel() != x_TD.shape[0]:
            raise ValueError(f"MoELayer tags_T: {tags.numel()} tags for {x_TD.shape[0]} tokens; pass one "
                             "tag per token (the model broadcasts one per sequence)")
        return tags.reshape(-1).to(device=x_TD.device, dtype=torch.long)

    def forward(self, x: Tensor, tags_T: Tensor | None = None,
                stats: bool = True) -> tuple[Tensor, MoEAux | None]:
        """``tags_T`` [T] (or x's leading shape): each token's index into ``cfg.route_tags``;
        needed when ``cfg.router_input`` routes by tag, ignored otherwise. ``stats=False``
        (generation): no aux losses or statistics, the second value is None."""
        self._check_input(x)
        x_TD = x.reshape(-1, x.shape[-1])
        tags_T = self._check_tags(tags_T, x_TD)
        # Under autocast the experts run in the autocast dtype; everything else keeps its own
        # dtype: autocast would otherwise turn the float32 router GEMM and combine into bf16.
        device = x.device.type
        compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            routing = self.router(x_TD) if tags_T is None else self.router(x_TD, tags_T)
            x_cast = x_TD.to(compute_dtype)
            x_RD, counts_E, plan = self.dispatcher.dispatch(x_cast, routing)
            y_RD = self.experts(x_RD, counts_E)
            y_TD = self.dispatcher.combine(y_RD, plan)
            if self.shared is not None:
                y_TD = y_TD + self._shared(x_cast)
        return y_TD.view(x.shape), self._aux(routing, plan) if stats else None

    def _shared(self, x_TD: Tensor) -> Tensor:
        """The shared FFN's output [T, D], times sigmoid(x . w_gate) when gated (Qwen2-MoE); the
        gate is a combine weight, so it is computed and applied in float32."""
        s_TD = self.shared(x_TD)
        if self.shared_gate is None:
            return s_TD
        gate_T1 = torch.sigmoid(x_TD.float() @ self.shared_gate.weight.float().t())
        return (gate_T1 * s_TD.float()).to(s_TD.dtype)

    def _aux(self, routing: RouterOutput, plan: DispatchPlan) -> MoEAux:
        # plan.counts_E: this rank's routing over all E experts (the counts_E the experts saw
        # are per *local* expert under expert parallelism)
        counts_E = plan.counts_E
        T = routing.num_tokens
        if routing.experts_TK is not None:
            lb = load_balancing_loss(routing.probs_TE, routing.experts_TK, self.stats_reducer)
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
            hist = self._experts_per_token(routing)
        sparsity = (dynamic.relu_l1(routing.gates_TE, counts_E, self.router.k_control)
                    if routing.gates_TE is not None else routing.probs_TE.new_zeros(()))
        # relu routing has no exponential to keep stable, and a z-loss would push every logit
        # below 0, i.e. switch experts off past the budget controller: none
        z = z_loss(routing.all_logits_TE) if routing.gates_TE is None else routing.logits_TE.sum() * 0.0
        return MoEAux(load_balancing_loss=lb, z_loss=z,
                      tokens_per_expert=counts_E, dropped_fraction=dropped,
                      unrouted_fraction=unrouted, load_cv=load_cv(counts_E),
                      router_entropy=router_entropy(routing.probs_TE),
                      logit_mean=l_mean, logit_std=l_std, logit_max=l_max,
                      experts_per_token=hist, sparsity_loss=sparsity)

    def _experts_per_token(self, routing: RouterOutput) -> Tensor:
        """[max_k + 1] tokens per number of experts the router gave them (before capacity)."""
        hi = self.cfg.k_range[1]
        if routing.dynamic:
            return dynamic.experts_per_token_hist(routing.experts_TK, self.cfg.num_experts, hi)
        if routing.experts_TK is None:   # expert choice: a token gets 0 .. E experts
            E = self.cfg.num_experts
            k_T = torch.bincount(routing.tokens_EC.reshape(-1), minlength=routing.num_tokens)
            return torch.bincount(k_T, minlength=E + 1)
        hist = torch.zeros(hi + 1, dtype=torch.long, device=routing.probs_TE.device)
        hist[hi] = routing.num_tokens
        return hist

    @torch.no_grad()
    def update_budget(self, hist_K: Tensor) -> None:
        """The compute-budget controller's step (:func:`moekit.moe.dynamic.update_budget`): call it
        once per optimizer step with ``MoEAux.experts_per_token`` summed over the step's
        micro-batches and ranks, as :meth:`update_router_bias`."""
        self.router.update_budget(hist_K)

    @torch.no_grad()
    def update_router_bias(self, tokens_per_expert_E: Tensor) -> None:
        """Aux-loss-free balancing step (DeepSeek-V3); see :meth:`TopKRouter.update_bias`."""
        self.router.update_bias(tokens_per_expert_E)


def moe_layers(module: nn.Module) -> dict[str, MoELayer]:
    """{qualified module name: layer} for every MoELayer in ``module`` ("" for ``module`` itself):
    the one place that finds them.

    Example:
        >>> sorted(moe_layers(nn.Sequential(MoELayer(MoEConfig(d_model=8, d_ff=8)), nn.ReLU())))
        ['0']
    """
    return {name: m for name, m in module.named_modules() if isinstance(m, MoELayer)}
