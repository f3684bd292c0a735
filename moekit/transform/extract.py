"""Task-level sub-models (Kudugunta et al. 2021, "Beyond Distillation"): keep only the experts
one tag (a language, a source, a task) is routed to.

    small, kept = extract_experts(model, "de")                    # router_input="tag": exact
    small, kept = extract_experts(model, "de", tag_loads(model, batches, "de"))   # otherwise

Shape legend: B batch, S sequence, V vocabulary, D model dim, E experts, N route tags.

A model that routes by the tag alone (``router_input="tag"``) sends every token of a tag to
the same experts: the top-k of the tag's row of the logit table (with the aux-loss-free bias
if any). Keeping just those k experts, and of the table that row's k columns, keeps the
function on the tag's text exactly when the combine weights of the chosen experts do not
depend on the others: softmax with renormalised top-k weights (or top-1 with
``top1_weight="one"``), or sigmoid scores (each expert's own), dropless. Every other case
(token routing, tag plus token, weights that are probabilities over all experts, a capacity)
is approximate: per layer the experts that took at least ``min_share`` of the tag's routed
tokens on its windows (``loads``), as many in every layer (one MoEConfig), at least top_k
(:func:`fewest_experts`).
Exact means in eval mode: noisy gating's noise is training-only.

A dynamic number of experts per token (``MoEConfig.dynamic_k``): relu routing by the tag
alone is exact too (a chosen expert's weight is its own gate, and an expert whose gate is 0
is never used, so the tag's experts are those with a positive gate, padded with zero-gate
ones to the same count in every layer). top_p is approximate (which experts reach the mass
p depends on the probabilities of all experts), and so is null routing (the null experts'
logits read the token, not the tag). The result's expert-count bounds follow the smaller
count (:func:`with_experts`): max_k and a target_k above it are cut to it; the null experts'
router rows and the budget controller's ``k_control`` are kept as they are.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from torch import Tensor

from moekit.checks import require_float
from moekit.model.transformer import MoETransformer
from moekit.moe.config import MoEConfig
from moekit.moe.topk import topk_stable


def is_exact(moe: MoEConfig) -> bool:
    """Whether removing the experts a tag is never routed to leaves its function unchanged."""
    if moe.router_input != "tag" or moe.capacity_factor is not None:
        return False
    if moe.dynamic:                     # relu: each chosen expert's weight is its own gate
        return moe.dynamic_k == "relu"
    if moe.router == "sigmoid":         # each chosen expert's weight is its own score
        return True
    return moe.normalize_topk if moe.top_k > 1 else moe.top1_weight == "one"


def tags_for(model, tag: str, batch: int) -> dict:
    """``{"tags": [B]}`` of ``tag`` for a model that routes by tag, else ``{}`` (forward kwargs)."""
    if not model.cfg.routes_by_tag:
        return {}
    index = model.cfg.moe.route_tags.index(tag)
    return {"tags": torch.full((batch,), index, dtype=torch.long, device=model.embed.weight.device)}


@torch.no_grad()
def tag_experts(model, tag: str) -> dict[int, list[int]]:
    """{MoE layer: the experts its router picks for ``tag``}: a tag-only router (router_input=
    "tag") gives every token of a tag the same top-k, so one token asks it. With a dynamic
    number of experts (relu routing) the layers may pick different counts: each is padded
    with its next experts by logit (ones the tag never uses) to the largest count, at least 1."""
    if model.cfg.moe is None or model.cfg.moe.router_input != "tag":
        raise ValueError("tag_experts: the model does not route by the tag alone (model.moe.router_input "
                         "!= 'tag'); count the tag's routing instead (extract_experts(..., loads=...))")
    index = model.cfg.moe.route_tags.index(tag)
    chosen, order = {}, {}
    for i, layer in model.moe_layers().items():
        router, E = layer.router, layer.cfg.num_experts
        was = router.training
        router.eval()                   # no noise: the tag's own choice
        x_1D = torch.zeros(1, layer.cfg.d_model, device=router.tag_logits_NE.device)
        tags_1 = torch.tensor([index], device=x_1D.device)
        routing = router(x_1D, tags_1)
        order[i] = topk_stable(router.logits(x_1D, tags_1), E)[1][0].tolist()
        router.train(was)
        # a dynamic router's unused slots hold expert id E (no expert)
        chosen[i] = [int(e) for e in routing.experts_TK[0] if int(e) < E]
    n = max(1, max(len(c) for c in chosen.values()))
    return {i: sorted(c + [e for e in order[i] if e not in c][:n - len(c)]) for i, c in chosen.items()}


def fewest_experts(moe: MoEConfig) -> tuple[int, str]:
    """(the fewest experts per layer a model of ``moe`` can keep, why): top_k for top-k routing
    (and null routing, whose top_k slots MoEConfig bounds by the expert count), min_k (at least
    1) for top_p, 1 for relu."""
    K = moe.top_k
    if moe.dynamic_k == "none":
        return K, f"model.moe.top_k={K} (every token needs {K} experts)"
    if moe.dynamic_k == "null":
        return K, f"model.moe.top_k={K} (null routing picks top_k of the real and null experts, at most " \
                  "num_experts)"
    lo = max(1, moe.k_range[0])
    if moe.min_k:
        return lo, f"model.moe.min_k={moe.min_k} (every token gets at least {lo} experts)"
    return lo, "1 (a layer needs an expert)"


def with_experts(moe: MoEConfig, n: int) -> MoEConfig:
    """``moe`` with ``n`` experts per layer and its expert-count bounds inside them: top_p and
    relu routing cut max_k (and min_k, top_k, which they do not read) to n and a target_k to the
    new max_k; top_k and null routing keep theirs (``n`` >= :func:`fewest_experts` keeps them
    valid).

    Example:
        >>> m = MoEConfig(d_model=8, d_ff=8, num_experts=8, dynamic_k="top_p", max_k=6, target_k=5.0)
        >>> small = with_experts(m, 4)
        >>> small.num_experts, small.max_k, small.target_k
        (4, 4, 4.0)
    """
    change: dict = {"num_experts": n}
    if moe.dynamic_k in ("top_p", "relu"):
        hi = n if moe.max_k is None else min(moe.max_k, n)
        change["top_k"] = min(moe.top_k, n)
        if moe.max_k is not None:
            change["max_k"] = hi
        if moe.min_k is not None:
            change["min_k"] = min(moe.min_k, hi)
        if moe.target_k is not None:
            change["target_k"] = min(moe.target_k, float(hi))
    return dataclasses.replace(moe, **change)


@torch.no_grad()
def tag_loads(model, batches: list[Tensor], tag: str) -> dict[int, list[int]]:
    """{MoE layer: token->expert assignments per expert} over ``batches`` (tokens [B, S]) of ``tag``."""
    was = model.training
    model.eval()
    loads: dict[int, Tensor] = {}
    for x_BS in batches:
        out = model(x_BS, **tags_for(model, tag, x_BS.shape[0]))
        for i, aux in out.moe.items():
            loads[i] = loads.get(i, 0) + aux.tokens_per_expert.cpu()
    model.train(was)
    return {i: c.tolist() for i, c in loads.items()}


def experts_by_load(loads: dict[int, list[int]], top_k: int, min_share: float) -> dict[int, list[int]]:
    """Per layer the n most loaded experts (ties: the lower index), in index order, where n is
    the largest count over layers of experts with a load > 0 and >= ``min_share`` of the
    layer's assignments, and at least ``top_k``."""
    n = top_k
    for counts in loads.values():
        c = np.asarray(counts, dtype=np.float64)
        share = c / max(c.sum(), 1.0)
        n = max(n, int(((c > 0) & (share >= min_share)).sum()))
    kept = {}
    for i, counts in loads.items():
        order = np.argsort(-np.asarray(counts, dtype=np.float64), kind="stable")
        kept[i] = sorted(int(e) for e in order[:n])
    return kept


def extract_experts(model, tag: str, loads: dict[int, list[int]] | None = None,
                    min_share: float = 0.0) -> tuple:
    """(a new model with only the experts ``tag`` is routed to, {MoE layer: kept experts}).

    Exact (:func:`is_exact`): the router's top-k for the tag. Otherwise ``loads`` (the tag's
    routing, :func:`tag_loads`) decides, see :func:`experts_by_load`. A tag-routed result knows
    one tag, ``route_tags=[tag]``; the input model is not changed.

    Example:
        >>> small, kept = extract_experts(model, "de")        # doctest: +SKIP
        >>> small.cfg.moe.num_experts == model.cfg.moe.top_k   # doctest: +SKIP
        True
    """
    require_float(model, "extract_experts")
    moe = model.cfg.moe
    if moe is None:
        raise ValueError("extract: the model is dense; it has no experts to extract")
    if moe.router_input != "token" and tag not in moe.route_tags:
        raise ValueError(f"extract: the model was never routed tag {tag!r}; its tags are "
                         f"{', '.join(moe.route_tags)}")
    if is_exact(moe):
        kept = tag_experts(model, tag)
    elif loads is None:
        raise ValueError("extract_experts: this model's routing is not the tag's alone; pass loads, the "
                         "tag's tokens per expert (tag_loads)")
    else:
        kept = experts_by_load(loads, fewest_experts(moe)[0], min_share)
    n = len(next(iter(kept.values())))
    by_tag = moe.router_input != "token"
    new_moe = dataclasses.replace(with_experts(moe, n), route_tags=[tag] if by_tag else None)
    cfg = dataclasses.replace(model.cfg, moe=new_moe)
    small = MoETransformer.build(cfg, device=model.embed.weight.device)
    tag_id = moe.route_tags.index(tag) if by_tag else None
    small.load_state_dict(sliced_state(model, kept, tag_id))
    return small.train(model.training), kept


def sliced_state(model, kept: dict[int, list[int]], tag_id: int | None) -> dict[str, Tensor]:
    """The model's state with each MoE layer's experts (and router rows) cut to ``kept``, and
    its tag tables to the row of ``tag_id``; the null experts' rows (``null_ND``, not experts)
    and the budget controller's ``k_control`` are kept as they are."""
    state = dict(model.state_dict())
    layers = {f"blocks.{i}.ffn.": kept[i] for i in kept}
    for key, value in list(state.items()):
        prefix = next((p for p in layers if key.startswith(p)), None)
        if prefix is None:
            continue
        idx = torch.tensor(layers[prefix], device=value.device)
        name = key[len(prefix):]
        if name.startswith("experts.") or name in ("router.weight_ED", "router.noise_ED",
                                                   "router.expert_bias_E"):
            state[key] = value.index_select(0, idx)
        elif name == "router.tag_embed_ND":
            state[key] = value[tag_id:tag_id + 1]
        elif name == "router.tag_logits_NE":
            state[key] = value[tag_id:tag_id + 1].index_select(1, idx)
        elif name in ("router.null_ND", "router.k_control"):
            continue
        elif name.startswith("router."):
            raise AssertionError(f"extract: no rule for the router tensor {key}")
    return state


@torch.no_grad()
def compare(full, small, batches: list[Tensor], tag: str, rounds: int = 2) -> dict:
    """Max |logit difference| of the two models on ``batches``, and each one's forward tokens/s
    (the same inputs, timed in turn batch by batch so that machine noise hits both alike)."""
    models = [full.eval(), small.eval()]
    diff = 0.0
    for x_BS in batches:
        a, b = (m(x_BS, **tags_for(m, tag, x_BS.shape[0])).logits for m in models)
        diff = max(diff, float((a.float() - b.float()).abs().max()))
    seconds = [0.0, 0.0]
    for _ in range(rounds):
        for x_BS in batches:
            for j, m in enumerate(models):
                kwargs = tags_for(m, tag, x_BS.shape[0])
                start = time.perf_counter()
                m(x_BS, **kwargs)
                seconds[j] += time.perf_counter() - start
    tokens = rounds * sum(x.numel() for x in batches)
    return {"max_abs_logit_diff": diff, "tokens_per_s": {"full": tokens / seconds[0],
                                                         "extracted": tokens / seconds[1]}}


__all__ = ["compare", "experts_by_load", "extract_experts", "fewest_experts", "is_exact",
           "sliced_state", "tag_experts", "tag_loads", "tags_for", "with_experts"]
