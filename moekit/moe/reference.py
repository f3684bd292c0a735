"""The slow reference MoE: plain loops, read like the papers. Tests hold the fast path to it.

Shape legend: T tokens, D model dim, E experts, K top-k, N route tags.

It reads a :class:`MoELayer`'s parameters and recomputes the layer's output with its own
routing, dropping and combine code (no sort, no permutation, no custom autograd), so
autograd through it gives reference gradients for the same parameters. Only the slot count
is shared: :func:`moekit.moe.router.capacity`, the definition both paths must agree on. Training-time
noise (noisy gating, jitter) is left out: compare in ``eval()`` mode or with it off.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.moe.experts import expert_ffn
from moekit.moe.router import capacity
from moekit.moe.router import slots as capacity_slots  # the dynamic-k slot count, T * mean k


def _top(scores: list[float], k: int) -> list[int]:
    """Indices of the k largest scores; ties go to the lower index."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def _router_logits(layer, x_TD: Tensor, tags_T: Tensor | None) -> Tensor:
    """logits [T, E] in float32 whatever the weights' dtype: x W, W (x + e_tag) or the tag's row."""
    cfg, router = layer.cfg, layer.router
    h_TD = x_TD.float()
    if cfg.router_input == "token":
        return h_TD @ router.weight_ED.float().t()
    table = router.tag_logits_NE if cfg.router_input == "tag" else router.tag_embed_ND
    rows = [table[int(n)].float() for n in tags_T]            # each token's tag row, one by one
    rows_T = torch.stack(rows) if rows else table.new_zeros(0, table.shape[1], dtype=torch.float32)
    if cfg.router_input == "tag":
        return rows_T
    return (h_TD + rows_T) @ router.weight_ED.float().t()


def _token_slots(layer, t: int, x_D: Tensor, logits_E: Tensor) -> list[tuple[int, int, Tensor]]:
    """One token's (slot, expert, weight) under a dynamic number of experts, read off the papers."""
    cfg, router = layer.cfg, layer.router
    E, control = cfg.num_experts, router.k_control
    lo, hi = cfg.k_range
    if cfg.dynamic_k == "relu":   # ReMoE: every positive gate, the largest max_k of them
        gates = torch.relu(logits_E)
        top = _top(gates.tolist(), hi)
        return [(j, e, gates[e]) for j, e in enumerate(top) if float(gates[e].detach()) > 0]
    if cfg.dynamic_k == "null":   # AdaMoE: top_k of E experts and N zero-output ones
        null_N = x_D.float() @ router.null_ND.float().t()
        every = torch.cat([logits_E, null_N])
        if cfg.router == "softmax":
            scores = torch.softmax(every, dim=0)
            choice = torch.cat([logits_E, null_N + control])
        else:
            scores = torch.sigmoid(every)
            real = scores[:E] + router.expert_bias_E if cfg.aux_loss_free else scores[:E]
            choice = torch.cat([real, torch.sigmoid(null_N + control)])
        ids = _top(choice.tolist(), cfg.top_k)
        w = torch.stack([scores[i] for i in ids])
        if cfg.normalize_topk and cfg.top_k > 1:   # over all k chosen, the null experts' share too
            w = w / w.sum()
        return [(j, i, w[j]) for j, i in enumerate(ids) if i < E]
    # top_p (Huang et al.): in order of score while the mass before is below p, min_k .. max_k
    if cfg.router == "softmax":
        scores = probs = choice = torch.softmax(logits_E, dim=0)
    else:
        scores = torch.sigmoid(logits_E)
        probs = scores / scores.sum()
        choice = scores + router.expert_bias_E if cfg.aux_loss_free else scores
    taken, mass = [], torch.zeros((), dtype=torch.float32)
    for j, e in enumerate(_top(choice.tolist(), hi)):
        if j >= lo and not bool(mass < control) and float(control) < 1:   # p = 1: every max_k
            break
        taken.append(e)
        mass = mass + probs[e].detach()
    w = torch.stack([scores[e] for e in taken])
    if cfg.normalize_topk and len(taken) > 1:     # one expert keeps its probability (Switch)
        w = w / w.sum()
    return [(j, e, w[j]) for j, e in enumerate(taken)]


def _dynamic_ranked(layer, x_TD: Tensor, logits_TE: Tensor) -> list[tuple[int, Tensor, Tensor]]:
    """Every token's (token, expert, weight) in GShard priority: all first slots (in token
    order), then all second slots, ...; a slot a token left empty claims nothing."""
    cfg = layer.cfg
    if cfg.router == "softmax" and cfg.dynamic_k != "relu":   # the grown experts' logit offset
        logits_TE = logits_TE + layer.router.expert_bias_E
    per_token = [_token_slots(layer, t, x_TD[t], logits_TE[t]) for t in range(x_TD.shape[0])]
    ranked = []
    for j in range(cfg.k_range[1]):
        for t, slots in enumerate(per_token):
            ranked += [(t, e, w) for slot, e, w in slots if slot == j]
    return ranked


def reference_moe(layer, x: Tensor, tags_T: Tensor | None = None) -> Tensor:
    """y = sum over a token's experts of weight * expert(x), token by token. ``tags_T`` [T]:
    each token's route tag, for a layer that routes by tag (``cfg.router_input``)."""
    cfg = layer.cfg
    E, K = cfg.num_experts, cfg.top_k
    x_TD = x.reshape(-1, cfg.d_model)
    T = x_TD.shape[0]
    if cfg.router_input != "token" and tags_T is None:
        raise ValueError(f"reference_moe: the layer routes by tag (router_input={cfg.router_input!r}); "
                         "pass tags_T")
    tags_T = None if tags_T is None else tags_T.reshape(-1)
    logits_TE = _router_logits(layer, x_TD, tags_T)

    # assignments: (token, expert, weight), in the order they claim capacity
    assignments: list[tuple[int, int, Tensor]] = []
    if cfg.router == "expert_choice":
        probs_TE = torch.softmax(logits_TE, dim=-1)
        C = layer.router.capacity(T)
        for e in range(E):
            for t in _top(probs_TE[:, e].tolist(), C):
                assignments.append((t, e, probs_TE[t, e]))
    elif cfg.dynamic:
        ranked = _dynamic_ranked(layer, x_TD, logits_TE)
        if cfg.capacity_factor is not None and cfg.drop_policy == "probability":
            ranked.sort(key=lambda a: -float(a[2].detach()))
        slots = None if cfg.capacity_factor is None else capacity_slots(cfg.capacity_factor, len(ranked), E)
        used = [0] * E
        for t, e, w in ranked:
            if slots is None or used[e] < slots:
                used[e] += 1
                assignments.append((t, e, w))
    else:
        if cfg.router == "softmax":   # + the logit offset grown experts share (zero otherwise)
            scores_TE = torch.softmax(logits_TE + layer.router.expert_bias_E, dim=-1)
            choice_TE = scores_TE
        else:
            scores_TE = torch.sigmoid(logits_TE)
            choice_TE = scores_TE + layer.router.expert_bias_E if cfg.aux_loss_free else scores_TE
        chosen = [_top(choice_TE[t].tolist(), K) for t in range(T)]
        weights = []
        for t in range(T):
            w_K = torch.stack([scores_TE[t, e] for e in chosen[t]])
            if cfg.normalize_topk and K > 1:
                w_K = w_K / w_K.sum()
            elif cfg.top1_weight == "one":
                w_K = w_K / w_K.detach()
            weights.append(w_K)
        # GShard priority: all first choices (in token order), then all second choices, ...
        ranked = [(t, chosen[t][k], weights[t][k]) for k in range(K) for t in range(T)]
        if cfg.capacity_factor is not None and cfg.drop_policy == "probability":
            ranked.sort(key=lambda a: -float(a[2].detach()))
        if cfg.capacity_factor is None:
            assignments = ranked
        else:
            slots = capacity(cfg.capacity_factor, T, K, E)   # the fast path's slot count, exactly
            used = [0] * E
            for t, e, w in ranked:
                if used[e] < slots:
                    used[e] += 1
                    assignments.append((t, e, w))

    w_gate, w_up, w_down = layer.experts.weights(x.dtype)
    y_TD = [torch.zeros(cfg.d_model, dtype=torch.float32, device=x.device) for _ in range(T)]
    for t, e, w in assignments:
        gate = w_gate[e] if w_gate is not None else None
        expert_out_D = expert_ffn(x_TD[t:t + 1], gate, w_up[e], w_down[e])[0]
        y_TD[t] = y_TD[t] + w * expert_out_D.float()
    y_TD = torch.stack(y_TD).to(x.dtype) if T else x_TD.new_zeros(0, cfg.d_model)
    if layer.shared is not None:
        shared_TD = layer.shared(x_TD)
        if layer.shared_gate is not None:   # Qwen2-MoE: a sigmoid gate per token, in float32
            gate_T1 = torch.sigmoid((x_TD.float() * layer.shared_gate.weight.float()).sum(-1, keepdim=True))
            shared_TD = (gate_T1 * shared_TD.float()).to(x.dtype)
        y_TD = y_TD + shared_TD
    return y_TD.view(x.shape)
