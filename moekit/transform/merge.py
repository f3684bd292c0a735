"""Expert merging: cluster each MoE layer's experts into ``num_experts`` groups and merge each
group into one expert (retraining-free).

    small, groups = merge_experts(model, batches, 4)     # HC-SMoE grouping + MC-SMoE merging

Shape legend: T tokens, D model dim, F expert hidden dim, E experts, n merged experts.

Grouping (HC-SMoE, Chen et al. 2024, "Retraining-Free Merging of Sparse MoE via Hierarchical
Clustering"): one feature per expert on the layer's calibration inputs: its output F_e(x)
averaged over the tokens ("expert-output", the paper's default; [D]) or its router logit
column over the tokens ("router-logits"; [T]). Average-linkage hierarchical clustering on the
Euclidean distance between features (``metric="cosine"`` on request: Euclidean keeps the
scale, and two experts whose outputs differ only in scale do not compute the same thing), cut
at n clusters.

Merging (MC-SMoE, Li et al. 2024, "Merge, Then Compress"): in each group the members' hidden
units are permuted onto the group's most used expert (its dominant): the F columns of w_gate and
w_up and the F rows of w_down move together, which leaves each member's function unchanged,
matched by linear_sum_assignment on the dot products of the units' weight vectors (gate
column, up column, down row, concatenated). The aligned weights are averaged with the members'
token counts + 1 as weights (an unused expert still counts; all unused: uniform).

The router row of a merged expert (``weight_ED``, ``noise_ED``): ``router="mean"``, the same
count-weighted mean of the group's rows, or ``"dominant"``, the dominant's row. The
aux-loss-free selection bias of a sigmoid router is merged the same way. A softmax router's
logit offset (``expert_bias_E``) becomes the log of the group's summed exp(offset): a group
of c equal experts then keeps the probability mass of its c members (the inverse of
:func:`moekit.transform.grow_experts.grow_experts`, which splits one expert's mass with -log c).
On random 8-expert models merged to 4 this cut the relative layer error by 0.1-0.25 against a
plain mean of the offsets, top-1 and top-2 alike. What it cannot keep: a top-1 Switch weight
of one of c exact copies was 1/c of the group's mass, and the merged expert gets all of it.
Under relu routing (``dynamic_k="relu"``: gates relu(x W), unnormalised) the merged row is
the group size c times that row, so c equal experts keep their summed gate (relu is
positively homogeneous; the inverse of growing, which divides a copied row by c). A dynamic
number of experts keeps the null experts' rows and ``k_control``; max_k and target_k follow
the smaller count (:func:`moekit.transform.extract.with_experts`).
The router default "mean" measured lower than "dominant" for softmax routers (relative layer
error 0.84 vs 0.87 at top-2, 0.90 vs 0.96 at top-1) and slightly higher for sigmoid (0.95 vs
0.94); tests/transform/test_merge.py holds the softmax comparison.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from moekit.checks import check_choice
from moekit.moe.experts import expert_ffn
from moekit.moe.layer import MoELayer
from moekit.transform.calibrate import LayerCalibration, build_like, calibrate, check_target

SIMILARITIES = ("expert-output", "router-logits")
_PER_LAYER = ("null_ND", "k_control")      # router tensors that are not per expert (dynamic_k)
ROUTER_MERGES = ("mean", "dominant")
METRICS = ("euclidean", "cosine")


def merge_experts(model, batches: list[Tensor], num_experts: int, similarity: str = "expert-output",
                  align: bool = True, router: str = "mean", metric: str = "euclidean",
                  max_tokens: int = 4096) -> tuple:
    """(a new model with ``num_experts`` merged experts per MoE layer, {MoE layer: the groups,
    each a sorted list of the experts merged into new expert j}); ``model`` is not changed.

    Example:
        >>> small, groups = merge_experts(model, batches, 2)   # doctest: +SKIP
        >>> groups[0]                                          # doctest: +SKIP
        [[0, 2], [1, 3]]
    """
    check_target(model, num_experts, "merge_experts")
    for name, value, choices in (("similarity", similarity, SIMILARITIES), ("router", router, ROUTER_MERGES),
                                 ("metric", metric, METRICS)):
        check_choice("merge_experts", name, value, choices)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(f"merge_experts: max_tokens={max_tokens!r} must be a positive integer; "
                         "use e.g. 4096")
    calib = calibrate(model, batches, max_tokens)
    state = dict(model.state_dict())
    groups = {}
    for i, layer in model.moe_layers().items():
        features = expert_features(layer, calib[i].x_TD, similarity)
        groups[i] = group_experts(features, num_experts, metric)
        merged = merged_layer_state(layer, groups[i], calib[i], align, router)
        state.update({f"blocks.{i}.ffn.{key}": value for key, value in merged.items()})
    return build_like(model, num_experts, state), groups


@torch.no_grad()
def expert_features(layer: MoELayer, x_TD: Tensor, similarity: str) -> Tensor:
    """One feature per expert (float64): [E, D] mean outputs F_e(x), or [E, T] router logits."""
    x_TD = x_TD.to(layer.experts.w_up_EDF.device)
    if similarity == "router-logits":
        was = layer.router.training
        layer.router.eval()
        logits_TE = layer.router.logits(x_TD)
        layer.router.train(was)
        return logits_TE.t().double()
    ex = layer.experts
    gate, up, down = ex.weights(x_TD.dtype)
    rows = [expert_ffn(x_TD, gate[e] if gate is not None else None, up[e], down[e]).double().mean(0)
            for e in range(up.shape[0])]
    return torch.stack(rows)


def group_experts(features_EX: Tensor, n: int, metric: str = "euclidean") -> list[list[int]]:
    """Average-linkage clusters of the E features, cut at exactly n: a list of n sorted groups,
    ordered by their lowest expert. Where fcluster's maxclust cut gives fewer (merges at equal
    heights), the dendrogram is cut by count instead: its first E - n merges."""
    E = features_EX.shape[0]
    f = features_EX.detach().cpu().double().numpy()
    if metric == "cosine":   # zero vectors have no direction: give them a tiny one, not NaN
        f = f + np.where(np.linalg.norm(f, axis=1, keepdims=True) > 0, 0.0, 1e-12)
    Z = linkage(f, method="average", metric=metric)
    labels = fcluster(Z, t=n, criterion="maxclust")
    if len(set(labels.tolist())) != n:
        labels = _first_merges(Z, E, E - n)
    by_label: dict[int, list[int]] = {}
    for e, label in enumerate(labels.tolist()):
        by_label.setdefault(label, []).append(e)
    groups = sorted(by_label.values())
    assert len(groups) == n and sorted(sum(groups, [])) == list(range(E))
    return groups


def _first_merges(Z: np.ndarray, E: int, merges: int) -> np.ndarray:
    """Cluster labels [E] after the first ``merges`` rows of the linkage matrix ``Z``."""
    members = {e: [e] for e in range(E)}
    for j in range(merges):
        a, b = int(Z[j, 0]), int(Z[j, 1])
        members[E + j] = members.pop(a) + members.pop(b)
    labels = np.zeros(E, dtype=np.int64)
    for label, group in enumerate(members.values()):
        labels[group] = label
    return labels


def hidden_units(gate_DF: Tensor | None, up_DF: Tensor, down_FD: Tensor) -> Tensor:
    """Each hidden unit's weights [F, 2D or 3D]: its gate column, up column and down row."""
    parts = ([gate_DF.t()] if gate_DF is not None else []) + [up_DF.t(), down_FD]
    return torch.cat(parts, dim=1)


def align_units(anchor_FX: Tensor, member_FX: Tensor) -> Tensor:
    """perm [F]: the member's hidden units in the anchor's order, maximising the summed dot
    products of matched units (linear_sum_assignment); ``member[perm]`` lines up with the anchor."""
    sim_FF = (anchor_FX.double() @ member_FX.double().t()).cpu().numpy()
    rows, cols = linear_sum_assignment(sim_FF, maximize=True)
    return torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long, device=anchor_FX.device)


@torch.no_grad()
def merge_group(layer: MoELayer, group: list[int], weights: Tensor, dominant: int,
                align: bool) -> tuple[Tensor | None, Tensor, Tensor]:
    """One merged expert (w_gate_DF or None, w_up_DF, w_down_FD): the group's experts, each
    aligned to ``dominant`` when ``align``, averaged with ``weights`` [len(group)] (sum 1)."""
    ex = layer.experts
    gate_EDF = ex.w_gate_EDF.double() if ex.w_gate_EDF is not None else None
    up_EDF, down_EFD = ex.w_up_EDF.double(), ex.w_down_EFD.double()

    def unit(e):
        return hidden_units(gate_EDF[e] if gate_EDF is not None else None, up_EDF[e], down_EFD[e])

    F_ = up_EDF.shape[2]
    gate = torch.zeros_like(up_EDF[0]) if gate_EDF is not None else None
    up, down = torch.zeros_like(up_EDF[0]), torch.zeros_like(down_EFD[0])
    for e, w in zip(group, weights.tolist()):
        perm = align_units(unit(dominant), unit(e)) if align and e != dominant else torch.arange(F_)
        perm = perm.to(up.device)
        if gate is not None:
            gate += w * gate_EDF[e][:, perm]
        up += w * up_EDF[e][:, perm]
        down += w * down_EFD[e][perm]
    dtype = ex.w_up_EDF.dtype
    return (gate.to(dtype) if gate is not None else None), up.to(dtype), down.to(dtype)


@torch.no_grad()
def merged_layer_state(layer: MoELayer, groups: list[list[int]], calib: LayerCalibration, align: bool,
                       router: str) -> dict[str, Tensor]:
    """The layer's expert and router tensors with each group merged into one expert (state keys
    relative to the layer); the shared experts and their gate are not touched."""
    rank = {e: r for r, e in enumerate(calib.order())}          # 0 = the most used
    experts: list[tuple] = []
    rows: dict[str, list[Tensor]] = {}
    # per expert: the rows; the null experts' rows and the budget controller's knob are not
    # experts' and stay as they are (the model's own state holds them)
    router_state = {k: v for k, v in layer.router.state_dict().items() if k not in _PER_LAYER}
    softmax = layer.router.score == "softmax"      # relu routing adds no logit offset
    relu = layer.router.score == "relu"
    for group in groups:
        counts = calib.tokens_E[group].double() + 1           # +1: an unused member still counts
        weights = counts / counts.sum()
        dominant = min(group, key=rank.__getitem__)
        experts.append(merge_group(layer, group, weights, dominant, align))
        for key, value in router_state.items():
            v = value.double()[group]
            if key == "expert_bias_E" and softmax:            # the group's probability mass
                merged = torch.logsumexp(v, dim=0)
            elif router == "mean":
                merged = (weights.to(v.device).reshape(-1, *[1] * (v.dim() - 1)) * v).sum(0)
            else:
                merged = v[group.index(dominant)]
            if key == "weight_ED" and relu:                  # the group's gate: relu(c w) = c relu(w)
                merged = merged * len(group)
            rows.setdefault(key, []).append(merged.to(value.dtype))
    unknown = set(router_state) - {"weight_ED", "noise_ED", "expert_bias_E"}
    assert not unknown, f"merge: no rule for the router tensors {sorted(unknown)}"
    state = {f"router.{key}": torch.stack(value) for key, value in rows.items()}
    gates, ups, downs = zip(*experts)
    if gates[0] is not None:
        state["experts.w_gate_EDF"] = torch.stack(gates)
    state["experts.w_up_EDF"], state["experts.w_down_EFD"] = torch.stack(ups), torch.stack(downs)
    return state


__all__ = ["METRICS", "ROUTER_MERGES", "SIMILARITIES", "align_units", "expert_features", "group_experts",
           "hidden_units", "merge_experts", "merge_group", "merged_layer_state"]
