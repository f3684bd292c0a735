"""Routers: token -> expert assignments.

Shape legend: T tokens, D model dim, E experts, K experts per token (top-k),
C tokens per expert (expert choice), N route tags (``MoEConfig.route_tags``).

All router math (logits, softmax / sigmoid, top-k, combine weights) runs in float32
whatever the input dtype (ST-MoE, section 3: bf16 router logits destabilize training).
Ties in top-k are broken towards the lower expert index (see :func:`topk_stable`:
``torch.topk`` gives no such guarantee and on CPU picks arbitrary indices among equals).
The router's parameters may be in any dtype (``layer.to(torch.bfloat16)``): they are cast
to float32 where they are used, and the aux-loss-free bias stays a float32 buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.moe import dynamic
from moekit.moe.config import MoEConfig
from moekit.moe.topk import topk_stable  # noqa: F401  (re-exported: moekit.moe.router.topk_stable)


@dataclass
class RouterOutput:
    """What the router decided. Token choice fills ``*_TK``; expert choice fills ``*_EC``."""

    probs_TE: Tensor               # score distribution over experts (float32), for losses/stats
    logits_TE: Tensor              # raw router logits (float32), for the z-loss
    weights_TK: Tensor | None = None   # combine weights (float32)
    experts_TK: Tensor | None = None   # expert ids (int64)
    tokens_EC: Tensor | None = None    # expert choice: token ids each expert took (int64)
    weights_EC: Tensor | None = None   # expert choice: their combine weights (float32)
    # a dynamic number of experts per token (MoEConfig.dynamic_k): experts_TK has max_k slots,
    # and a slot a token does not use holds expert id E (no expert) with weight 0
    dynamic: bool = False
    null_logits_TN: Tensor | None = None   # null routing: the null experts' logits (for the z-loss)
    gates_TE: Tensor | None = None     # relu routing: relu(logits), for the L1 penalty

    @property
    def all_logits_TE(self) -> Tensor:
        """Every logit the router made: the experts', then the null experts' (null routing)."""
        if self.null_logits_TN is None:
            return self.logits_TE
        return torch.cat([self.logits_TE, self.null_logits_TN], dim=-1)

    @property
    def num_tokens(self) -> int:
        return self.probs_TE.shape[0]


def capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """Slots per expert: ceil(capacity_factor * T * K / E) (Switch eq. 4, GShard).

    The product is rounded to 9 decimals before the ceiling, so that binary floating point
    does not add a slot: 1.1 * 100 / 10 is 11.000000000000002 in floats, and 11 slots here.
    """
    return slots(capacity_factor, num_tokens * top_k, num_experts)


def slots(capacity_factor: float, num_assignments: int, num_experts: int) -> int:
    """ceil(capacity_factor * A / E) for A token->expert assignments: :func:`capacity` with
    A = T * K, or, with a dynamic number of experts per token, A = T * mean k (the assignments
    the router made), so capacity follows the mean k of the batch."""
    return math.ceil(round(capacity_factor * num_assignments / num_experts, 9))


def jitter(x_TD: Tensor, eps: float, training: bool) -> Tensor:
    """Switch's router-input jitter: x * U(1 - eps, 1 + eps) elementwise, in training only
    (eval and ``eps = 0`` return ``x_TD`` itself)."""
    if not training or eps == 0:
        return x_TD
    return x_TD * torch.empty_like(x_TD).uniform_(1 - eps, 1 + eps)


class TopKRouter(nn.Module):
    """Token-choice router: each token picks its top-k experts.

    ``score="softmax"``: softmax over all experts, then top-k, then (optionally) renormalize
    the k weights (Mixtral). With ``top_k=1`` this is the Switch router.
    ``score="sigmoid"``: independent sigmoid scores (DeepSeek-V3). With ``aux_loss_free`` a
    per-expert bias is added to the scores *for selection only*; the combine weights are the
    unbiased scores. The bias is a buffer moved by :meth:`update_bias`, never by gradients.

    ``expert_bias_E`` under ``score="softmax"`` is a fixed logit offset: softmax(x W + b). It is
    zero (adding it changes no bit) unless the experts were grown
    (:func:`moekit.transform.grow_experts.grow_experts`): an expert and its c - 1 copies then share
    one router row and an offset of -log(c), which splits the expert's probability evenly over
    them. Nothing trains it; it is saved in state dicts like the sigmoid bias (one buffer, so
    checkpoints of models that never grew keep their keys).

    Noisy top-k (Shazeer et al. 2017): logits + N(0, 1) * softplus(x W_noise), in training.
    Input jitter (Switch): x * U(1 - eps, 1 + eps) on the router's input, in training.

    Task-level routing (Kudugunta et al. 2021, ``router_input``): "token+tag" routes
    W (x + e_tag), with a learned tag embedding ``tag_embed_ND`` (zeros at init: the token
    router's function); "tag" routes by a learned logit table ``tag_logits_NE`` alone (no
    ``weight_ED``), so all tokens of a tag pick the same experts. Both take ``tags_T`` [T], each
    token's index into ``route_tags``. Jitter applies to the token part; noise, the logit
    offset, the aux-loss-free bias and the losses act on the resulting logits.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.init_std = cfg.router_init_std
        self.score = "relu" if cfg.dynamic_k == "relu" else cfg.router
        self.normalize_topk = cfg.normalize_topk
        self.unit_top1 = cfg.top1_weight == "one"
        self.jitter_eps = cfg.jitter_eps
        self.aux_loss_free = cfg.aux_loss_free
        self.bias_update_rate = cfg.bias_update_rate
        self.dtype = torch.float32   # router math is float32 (ST-MoE)
        self.router_input = cfg.router_input
        by_tag = cfg.router_input != "token"
        N = cfg.num_route_tags if by_tag else 0
        self.weight_ED = (nn.Parameter(torch.empty(cfg.num_experts, cfg.d_model, dtype=self.dtype))
                          if cfg.router_input != "tag" else None)
        self.tag_embed_ND = (nn.Parameter(torch.zeros(N, cfg.d_model, dtype=self.dtype))
                             if cfg.router_input == "token+tag" else None)
        self.tag_logits_NE = (nn.Parameter(torch.empty(N, cfg.num_experts, dtype=self.dtype))
                              if cfg.router_input == "tag" else None)
        self.noise_ED = (nn.Parameter(torch.zeros(cfg.num_experts, cfg.d_model, dtype=self.dtype))
                         if cfg.noisy_gating else None)
        self.register_buffer("expert_bias_E", torch.zeros(cfg.num_experts, dtype=torch.float32),
                             persistent=True)
        # a dynamic number of experts per token (moekit.moe.dynamic): the null experts' router
        # rows, and the budget controller's knob (p, the null logit bias or the L1 coefficient)
        self.dynamic_cfg = cfg if cfg.dynamic else None
        self.k_min, self.k_max = cfg.k_range
        self.null_ND = (nn.Parameter(torch.empty(cfg.num_null_experts, cfg.d_model, dtype=self.dtype))
                        if cfg.dynamic_k == "null" else None)
        if cfg.dynamic:
            self.register_buffer("k_control", torch.tensor(dynamic.initial_control(cfg), dtype=torch.float32),
                                 persistent=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight_ED is not None:
            nn.init.normal_(self.weight_ED, std=self.init_std or self.weight_ED.shape[1] ** -0.5)
        if self.tag_embed_ND is not None:
            nn.init.zeros_(self.tag_embed_ND)
        if self.tag_logits_NE is not None:
            nn.init.normal_(self.tag_logits_NE, std=self.init_std or 0.02)
        if self.noise_ED is not None:
            nn.init.zeros_(self.noise_ED)
        if self.null_ND is not None:
            nn.init.normal_(self.null_ND, std=self.init_std or self.null_ND.shape[1] ** -0.5)
        self.expert_bias_E.zero_()
        if self.dynamic_cfg is not None:
            self.k_control.fill_(dynamic.initial_control(self.dynamic_cfg))

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .bfloat16() cast every floating buffer; the bias is a counter moved in
        # steps of bias_update_rate, which bf16 rounds away once |bias| is large: keep the
        # float32 values (on whatever device the buffer moved to)
        kept = {name: getattr(self, name) for name in ("expert_bias_E", "k_control") if hasattr(self, name)}
        super()._apply(fn, recurse)
        for name, value in kept.items():   # (the budget controller's knob, likewise)
            if getattr(self, name).dtype != torch.float32:
                setattr(self, name, value.to(getattr(self, name).device))
        return self

    def logits(self, x_TD: Tensor, tags_T: Tensor | None = None) -> Tensor:
        with torch.autocast(x_TD.device.type, enabled=False):   # float32 even under autocast
            return self._logits(jitter(x_TD.to(self.dtype), self.jitter_eps, self.training), tags_T)

    def _logits(self, x_TD: Tensor, tags_T: Tensor | None = None) -> Tensor:
        """The experts' logits of the (already jittered) router input."""
        if self.router_input == "token":
            # .float(): a no-op for float32 weights, a cast for weights .to() made bf16
            logits_TE = F.linear(x_TD, self.weight_ED.float())
        else:
            if tags_T is None:
                raise ValueError(f"the router has router_input={self.router_input!r}: it routes by tag; "
                                 "pass tags_T, each token's index into MoEConfig.route_tags")
            if self.router_input == "token+tag":   # W (x + e_tag): the tag only steers the router
                x_TD = x_TD + self.tag_embed_ND.float()[tags_T]
                logits_TE = F.linear(x_TD, self.weight_ED.float())
            else:                                  # the tag's row of the logit table
                logits_TE = self.tag_logits_NE.float()[tags_T]
        if self.training and self.noise_ED is not None:
            std_TE = F.softplus(F.linear(x_TD, self.noise_ED.float()))
            logits_TE = logits_TE + torch.randn_like(logits_TE) * std_TE
        if self.score == "softmax":   # the logit offset of grown experts (zero otherwise)
            logits_TE = logits_TE + self.expert_bias_E
        return logits_TE

    def forward(self, x_TD: Tensor, tags_T: Tensor | None = None) -> RouterOutput:
        with torch.autocast(x_TD.device.type, enabled=False):
            x_TD = jitter(x_TD.to(self.dtype), self.jitter_eps, self.training)
            logits_TE = self._logits(x_TD, tags_T)
            if self.dynamic_cfg is None:
                return self._route(logits_TE)
            if self.null_ND is not None:
                return self._route_null(logits_TE, F.linear(x_TD, self.null_ND.float()))
            return self._route_relu(logits_TE) if self.score == "relu" else self._route_top_p(logits_TE)

    def _scores(self, logits_TE: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(scores, the distribution the losses see, selection scores) of softmax or sigmoid."""
        if self.score == "softmax":
            probs_TE = torch.softmax(logits_TE, dim=-1)
            return probs_TE, probs_TE, probs_TE
        scores_TE = torch.sigmoid(logits_TE)
        choice_TE = scores_TE + self.expert_bias_E if self.aux_loss_free else scores_TE
        return scores_TE, scores_TE / scores_TE.sum(dim=-1, keepdim=True), choice_TE

    def _normalized(self, weights_TK: Tensor, several_T: Tensor | bool) -> Tensor:
        """The weights renormalised to sum 1 (``normalize_topk``) where ``several_T``: a token with
        one slot keeps its probability (the Switch weight, as a fixed top_k=1 does), which a
        weight of 1 would take the router's gradient from."""
        if not self.normalize_topk:
            return weights_TK
        total_T1 = weights_TK.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        if isinstance(several_T, bool):
            return weights_TK / total_T1 if several_T else weights_TK
        return torch.where(several_T.unsqueeze(1), weights_TK / total_T1, weights_TK)

    def _route_top_p(self, logits_TE: Tensor) -> RouterOutput:
        scores_TE, probs_TE, choice_TE = self._scores(logits_TE)
        experts_TM, order_TM, active_TM = dynamic.top_p_slots(probs_TE, choice_TE, self.k_control,
                                                              self.k_min, self.k_max)
        # the slots' own scores (a sigmoid router's raw scores, as in top-k); unused slots 0
        weights_TM = self._normalized(scores_TE.gather(1, order_TM) * active_TM, active_TM.sum(dim=1) > 1)
        return RouterOutput(probs_TE=probs_TE, logits_TE=logits_TE, weights_TK=weights_TM,
                            experts_TK=experts_TM, dynamic=True)

    def _route_null(self, logits_TE: Tensor, null_TN: Tensor) -> RouterOutput:
        E = self.num_experts
        if self.score == "softmax":     # one softmax over the E + N experts; select on the logits
            scores_TX = probs_TX = torch.softmax(torch.cat([logits_TE, null_TN], dim=-1), dim=-1)
            choice_TX = torch.cat([logits_TE, null_TN + self.k_control], dim=-1)
        else:
            scores_TX = torch.sigmoid(torch.cat([logits_TE, null_TN], dim=-1))
            probs_TX = scores_TX / scores_TX.sum(dim=-1, keepdim=True)
            real_TE = scores_TX[:, :E] + self.expert_bias_E if self.aux_loss_free else scores_TX[:, :E]
            choice_TX = torch.cat([real_TE, torch.sigmoid(null_TN + self.k_control)], dim=-1)
        experts_TK, ids_TK = dynamic.null_slots(choice_TX, self.top_k, E)
        weights_TK = self._normalized(scores_TX.gather(1, ids_TK), self.top_k > 1) * (ids_TK < E)
        # the losses see the real experts' share renormalised: balancing among them puts no
        # pressure on how much mass the null experts get (the controller's business)
        real_TE = probs_TX[:, :E]
        probs_TE = real_TE / real_TE.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return RouterOutput(probs_TE=probs_TE, logits_TE=logits_TE, weights_TK=weights_TK,
                            experts_TK=experts_TK, dynamic=True, null_logits_TN=null_TN)

    def _route_relu(self, logits_TE: Tensor) -> RouterOutput:
        gates_TE = torch.relu(logits_TE)
        experts_TM, weights_TM = dynamic.relu_slots(gates_TE, self.k_max)
        probs_TE = gates_TE / gates_TE.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return RouterOutput(probs_TE=probs_TE, logits_TE=logits_TE, weights_TK=weights_TM,
                            experts_TK=experts_TM, dynamic=True, gates_TE=gates_TE)

    @torch.no_grad()
    def update_budget(self, hist_K: Tensor) -> None:
        """The compute-budget controller's step (:func:`moekit.moe.dynamic.update_budget`)."""
        if self.dynamic_cfg is None:
            raise ValueError("update_budget: the router has dynamic_k='none'; set MoEConfig.dynamic_k and "
                             "target_k to use the compute-budget controller")
        dynamic.update_budget(self.k_control, self.dynamic_cfg, hist_K)

    def _route(self, logits_TE: Tensor) -> RouterOutput:
        if self.score == "softmax":
            probs_TE = torch.softmax(logits_TE, dim=-1)
            weights_TK, experts_TK = topk_stable(probs_TE, self.top_k)
        else:
            scores_TE = torch.sigmoid(logits_TE)
            choice_TE = scores_TE + self.expert_bias_E if self.aux_loss_free else scores_TE
            experts_TK = topk_stable(choice_TE.detach(), self.top_k)[1]
            weights_TK = scores_TE.gather(1, experts_TK)
            # the distribution the balancing loss sees (DeepSeek-V3 eq. 18: normalized scores)
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        if self.normalize_topk and self.top_k > 1:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        elif self.unit_top1:   # 1 in value, the probability's gradient (straight through)
            weights_TK = weights_TK / weights_TK.detach()
        return RouterOutput(probs_TE=probs_TE, logits_TE=logits_TE, weights_TK=weights_TK,
                            experts_TK=experts_TK)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: Tensor) -> None:
        """Aux-loss-free balancing (DeepSeek-V3, section 2.1.2): after an optimizer step,
        b_i += rate * sign(mean load - load_i). Overloaded experts become less likely to be
        chosen, underloaded ones more likely; combine weights are untouched.

        Call it once per optimizer step with the counts summed over every micro-batch of the
        step (and over data-parallel ranks): the bias then stays fixed within a step, so all
        micro-batches of a gradient-accumulation step see the same routing rule, and the
        update is the same whatever the accumulation factor.
        """
        if not self.aux_loss_free:
            raise ValueError("update_bias: router has aux_loss_free=False; set aux_loss_free=True "
                             "(with router='sigmoid') to use the bias")
        if not isinstance(tokens_per_expert_E, Tensor):
            raise TypeError(f"update_bias tokens_per_expert_E: got {type(tokens_per_expert_E).__name__}, "
                            "expected a tensor; pass MoEAux.tokens_per_expert (summed over the step)")
        if tuple(tokens_per_expert_E.shape) != (self.num_experts,):
            raise ValueError(f"update_bias tokens_per_expert_E: shape {tuple(tokens_per_expert_E.shape)} is "
                             f"not ({self.num_experts},), one count per expert; pass "
                             "MoEAux.tokens_per_expert (summed over the step)")
        load_E = tokens_per_expert_E.to(self.expert_bias_E)
        self.expert_bias_E.add_(self.bias_update_rate * torch.sign(load_E.mean() - load_E))


class ExpertChoiceRouter(nn.Module):
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens by softmax score.

    C = ceil(capacity_factor * T * top_k / E) (capacity_factor defaults to 1), at most T.
    Perfectly balanced by construction; a token may get several experts or none (the
    residual carries it). It looks at every token of the batch, so it is not causal:
    use it for encoders or for training, not for token-by-token decoding.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.init_std = cfg.router_init_std
        self.capacity_factor = cfg.capacity_factor if cfg.capacity_factor is not None else 1.0
        self.dtype = torch.float32   # router math is float32 (ST-MoE)
        self.jitter_eps = cfg.jitter_eps
        self.weight_ED = nn.Parameter(torch.empty(cfg.num_experts, cfg.d_model, dtype=self.dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight_ED, std=self.init_std or self.weight_ED.shape[1] ** -0.5)

    def capacity(self, num_tokens: int) -> int:
        """C = ceil(capacity_factor * T * top_k / E), at least 1 and at most T (0 for T = 0)."""
        if num_tokens == 0:
            return 0
        return max(1, min(num_tokens, capacity(self.capacity_factor, num_tokens, self.top_k,
                                               self.num_experts)))

    def update_bias(self, tokens_per_expert_E: Tensor) -> None:
        raise ValueError("update_bias: the expert_choice router is balanced by construction and has no "
                         "bias; aux-loss-free balancing needs router='sigmoid', aux_loss_free=True")

    def forward(self, x_TD: Tensor, tags_T: Tensor | None = None) -> RouterOutput:
        """``tags_T`` is ignored: expert choice routes by token only (MoEConfig refuses tags)."""
        with torch.autocast(x_TD.device.type, enabled=False):   # float32 even under autocast
            return self._route(x_TD.to(self.dtype))

    def _route(self, x_TD: Tensor) -> RouterOutput:
        x_TD = jitter(x_TD, self.jitter_eps, self.training)
        logits_TE = F.linear(x_TD, self.weight_ED.float())   # float32 whatever .to() made the weight
        probs_TE = torch.softmax(logits_TE, dim=-1)
        weights_EC, tokens_EC = topk_stable(probs_TE.t(), self.capacity(x_TD.shape[0]))   # C = 0: [E, 0]
        return RouterOutput(probs_TE=probs_TE, logits_TE=logits_TE, tokens_EC=tokens_EC,
                            weights_EC=weights_EC)


def build_router(cfg: MoEConfig) -> nn.Module:
    return ExpertChoiceRouter(cfg) if cfg.router == "expert_choice" else TopKRouter(cfg)
