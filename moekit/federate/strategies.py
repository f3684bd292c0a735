"""What a federated round sends and how the server averages it.

Three strategies, each a pure function on state dicts (tested by the averages they must
give) inside one Flower strategy (:class:`MoEFedAvg`, a ``FedAvg``):

    fedavg         every tensor, averaged weighted by the tokens each client trained on
    local-experts  the shared (non-expert) tensors only, averaged the same way; the routed
                   experts never leave their client (a personalised MoE); routers are shared
    routing        every tensor; expert e's weights (and router row e) averaged weighted by
                   how many tokens each client routed to expert e, so a client that never
                   used an expert does not pull it towards its own untrained copy

A tensor's role comes from its name: ``blocks.L.ffn.experts.*`` are layer L's routed experts
([E, ...]), ``blocks.L.ffn.router.*`` its router (rows [E, ...]); everything else (attention,
norms, embeddings, shared experts) is shared. With tied embeddings ``lm_head.weight`` is
``embed.weight`` and travels once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

_EXPERT = re.compile(r"^blocks\.(\d+)\.ffn\.experts\.")
_ROUTER = re.compile(r"^blocks\.(\d+)\.ffn\.router\.")


def expert_layer(key: str) -> int | None:
    """The layer whose routed experts ``key`` holds, else None."""
    m = _EXPERT.match(key)
    return int(m.group(1)) if m else None


def router_layer(key: str) -> int | None:
    m = _ROUTER.match(key)
    return int(m.group(1)) if m else None


def sent_keys(keys: Iterable[str], strategy: str, tied: bool) -> list[str]:
    """The tensors a client uploads (and the server sends back) under ``strategy``."""
    keys = [k for k in keys if not (tied and k == "lm_head.weight")]
    if strategy == "local-experts":
        return [k for k in keys if expert_layer(k) is None]
    return keys


def on_wire(state: dict[str, Tensor], keys: Iterable[str]) -> dict[str, Tensor]:
    """``keys`` of ``state`` as they travel: float32 (Flower's arrays are numpy, which has no
    bfloat16; the receiver's ``copy_`` casts back), contiguous, detached."""
    return {k: (state[k].detach().float() if state[k].is_floating_point() else state[k].detach()).contiguous()
            for k in keys}


def fedavg(states: Sequence[dict[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """sum_c w_c x_c / sum_c w_c for every tensor (float32; integer tensors keep client 0's).

    Example:
        >>> a, b = {"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([4.0, 6.0])}
        >>> fedavg([a, b], [3, 1])["w"].tolist()
        [1.0, 3.0]
    """
    _check(states, weights)
    total = float(sum(weights))
    out = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        acc = torch.zeros_like(first, dtype=torch.float32)
        for state, w in zip(states, weights):
            acc += state[key].float() * (float(w) / total)
        out[key] = acc.to(first.dtype)
    return out


def routing_weighted(states: Sequence[dict[str, Tensor]], weights: Sequence[float],
                     loads: Sequence[dict[int, Sequence[float]]]) -> dict[str, Tensor]:
    """FedAvg in which row e of layer L's expert and router tensors is weighted by the tokens
    each client routed to expert e of layer L (``loads[c][L][e]``); an expert no client used
    falls back to the token weights. Other tensors: :func:`fedavg`.

    Example:
        >>> a = {"blocks.0.ffn.experts.w_E1": torch.tensor([[0.0], [0.0]])}
        >>> b = {"blocks.0.ffn.experts.w_E1": torch.tensor([[4.0], [4.0]])}
        >>> routing_weighted([a, b], [1, 1], [{0: [3, 0]}, {0: [1, 0]}])["blocks.0.ffn.experts.w_E1"].tolist()
        [[1.0], [2.0]]
    """
    out = fedavg(states, weights)
    tokens = torch.tensor([float(w) for w in weights], dtype=torch.float64)
    for key in out:
        layer = expert_layer(key)
        layer = router_layer(key) if layer is None else layer
        if layer is None or not out[key].is_floating_point():
            continue
        counts = torch.tensor([_layer_load(c, layer) for c in loads], dtype=torch.float64)     # [C, E]
        if not _per_expert(key) or out[key].shape[0] != counts.shape[1]:
            continue                    # not one row per expert (a tag table): by tokens
        unused = counts.sum(0) == 0
        counts[:, unused] = tokens[:, None].expand(-1, int(unused.sum()))
        share = (counts / counts.sum(0, keepdim=True)).float()                                  # [C, E]
        stacked = torch.stack([s[key].float() for s in states])                                 # [C, E, ...]
        share = share.reshape(*share.shape, *([1] * (stacked.dim() - 2)))
        out[key] = (stacked * share).sum(0).to(out[key].dtype)
    return out


def _per_expert(key: str) -> bool:
    """Whether the tensor's first dimension is the expert (moekit's shape suffixes: weight_ED,
    w_up_EDF, expert_bias_E; not tag_logits_NE)."""
    return key.rsplit(".", 1)[-1].rsplit("_", 1)[-1].startswith("E")


def _layer_load(loads: dict, layer: int) -> list[float]:
    counts = loads.get(layer, loads.get(str(layer)))
    if counts is None:
        raise ValueError(f"routing-weighted averaging: a client reported no routing counts for layer "
                         f"{layer}; "
                         f"every client must send its load.{layer}")
    return [float(c) for c in counts]


def _check(states: Sequence[dict], weights: Sequence[float]) -> None:
    if not states:
        raise ValueError("averaging needs at least one client's weights")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"averaging weights {list(weights)}: must be >= 0 with a positive sum")
    keys = set(states[0])
    for i, s in enumerate(states[1:], 1):
        if set(s) != keys:
            raise ValueError(f"client {i} sent other tensors than client 0 "
                             f"({sorted(set(s) ^ keys)[:3]}...); every client must run the same model")


def aggregate(strategy: str, states: Sequence[dict[str, Tensor]], weights: Sequence[float],
              loads: Sequence[dict] | None = None) -> dict[str, Tensor]:
    """The server's average of the clients' uploads under ``strategy``."""
    if strategy == "routing":
        return routing_weighted(states, weights, loads or [{} for _ in states])
    return fedavg(states, weights)
