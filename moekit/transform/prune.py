"""Expert pruning: keep ``num_experts`` of each MoE layer's experts, with their router rows.

    small, kept = prune_experts(model, batches, 4, method="usage")            # most used
    small, kept = prune_experts(model, batches, 4, method="reconstruction")   # NAEE

Shape legend: T tokens, D model dim, E experts, n kept experts.

``usage`` keeps the experts that took the most tokens on the calibration batches (ties: the
higher mean router probability, then the lower index). ``reconstruction`` is NAEE (Lu et al.
2024, "Not All Experts are Equal"): per layer the subset S of n experts that minimises
||F(x) - F_S(x)||_F over the layer's calibration inputs, where F_S is the pruned layer itself
(router rows removed, so softmax over the remaining logits, then top-k, exactly as the new
model routes). All C(E, n) subsets when there are at most ``max_subsets``, otherwise greedy
removal of one expert at a time (E - n rounds, each trying every remaining expert).

Each layer is judged on the full model's inputs to it (layer by layer, as NAEE does), and
every layer keeps the same count (one MoEConfig). The router's rows (``weight_ED``,
``noise_ED``, ``expert_bias_E``) go with their experts: :func:`moekit.transform.extract.sliced_state`.
A dynamic number of experts per token (``MoEConfig.dynamic_k``) keeps the null experts' rows
and the budget controller's ``k_control``; max_k and a target_k above it are cut to the kept
count (:func:`moekit.transform.extract.with_experts`), and min_k (top_p) bounds it from below as
top_k does (top-k and null routing).
Pruning is exact when the removed experts never carry routing weight (e.g. a softmax logit
offset of -inf, or a selection bias that never lets them win with renormalised weights).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn

from moekit.checks import check_choice
from moekit.moe.layer import MoELayer
from moekit.transform.calibrate import LayerCalibration, build_like, calibrate, check_target
from moekit.transform.extract import sliced_state, with_experts

METHODS = ("usage", "reconstruction")


def prune_experts(model, batches: list[Tensor], num_experts: int, method: str = "usage",
                  max_tokens: int = 4096, max_subsets: int = 1000) -> tuple:
    """(a new model with ``num_experts`` experts per MoE layer, {MoE layer: kept experts in
    index order}); ``model`` is not changed.

    Example:
        >>> small, kept = prune_experts(model, batches, 4, method="reconstruction")  # doctest: +SKIP
        >>> small.cfg.moe.num_experts, len(kept[0])                                 # doctest: +SKIP
        (4, 4)
    """
    check_target(model, num_experts, "prune_experts")
    check_choice("prune_experts", "method", method, METHODS)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(f"prune_experts: max_tokens={max_tokens!r} must be a positive integer; "
                         "use e.g. 4096")
    calib = calibrate(model, batches, max_tokens if method == "reconstruction" else 0)
    if method == "usage":
        kept = {i: sorted(c.order()[:num_experts]) for i, c in calib.items()}
    else:
        kept = {i: best_subset(layer, calib[i], num_experts, max_subsets)
                for i, layer in model.moe_layers().items()}
    return build_like(model, num_experts, sliced_state(model, kept, None)), kept


def layer_state(layer: MoELayer, kept: list[int]) -> dict[str, Tensor]:
    """``layer``'s state with its experts and router rows cut to ``kept`` (extract's rules:
    :func:`sliced_state` reads a model's ``blocks.{i}.ffn`` keys, so the layer is lent to a
    one-block holder; ``layer`` itself is not changed)."""
    holder = nn.Module()
    holder.blocks = nn.ModuleList([nn.Module()])
    holder.blocks[0].ffn = layer
    state = sliced_state(holder, {0: kept}, None)
    return {key.removeprefix("blocks.0.ffn."): value for key, value in state.items()}


class SubsetLayer:
    """F_S: ``layer`` pruned to a subset of n experts, one module reloaded per subset."""

    def __init__(self, layer: MoELayer, n: int):
        self.layer = layer
        pruned = MoELayer(with_experts(layer.cfg, n))
        self.pruned = pruned.to(layer.experts.w_up_EDF.device)
        self.pruned.eval()

    @torch.no_grad()
    def __call__(self, kept: list[int], x_TD: Tensor) -> Tensor:
        self.pruned.load_state_dict(layer_state(self.layer, kept))
        return self.pruned(x_TD)[0]


@torch.no_grad()
def subset_errors(layer: MoELayer, x_TD: Tensor, subsets: list[list[int]]) -> list[float]:
    """||F(x) - F_S(x)||_F (float64) for each subset S of ``layer``'s experts, on x_TD [T, D]."""
    was = layer.training
    layer.eval()
    try:
        y_TD = layer(x_TD)[0].double()
        pruned = {}
        errors = []
        for kept in subsets:
            f = pruned.setdefault(len(kept), SubsetLayer(layer, len(kept)))
            errors.append(float((f(kept, x_TD).double() - y_TD).norm()))
    finally:
        layer.train(was)
    return errors


def best_subset(layer: MoELayer, calib: LayerCalibration, n: int, max_subsets: int = 1000) -> list[int]:
    """NAEE: the n experts (in index order) whose pruned layer best reconstructs the layer on
    ``calib.x_TD``; exhaustive up to ``max_subsets`` subsets, else greedy removal. Ties: the
    first subset in lexicographic order (greedy: removing the lower index)."""
    E = layer.cfg.num_experts
    x_TD = calib.x_TD.to(layer.experts.w_up_EDF.device)
    if math.comb(E, n) <= max_subsets:
        subsets = [list(s) for s in itertools.combinations(range(E), n)]
        errors = subset_errors(layer, x_TD, subsets)
        return subsets[min(range(len(subsets)), key=lambda j: (errors[j], j))]
    kept = list(range(E))
    while len(kept) > n:
        candidates = [[e for e in kept if e != drop] for drop in kept]
        errors = subset_errors(layer, x_TD, candidates)
        kept = candidates[min(range(len(candidates)), key=lambda j: (errors[j], j))]
    return kept


__all__ = ["METHODS", "best_subset", "layer_state", "prune_experts", "subset_errors"]
