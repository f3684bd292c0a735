"""Optimizer state carried through a transformation: AdamW's moments mapped the way the
weights are (moekit.transform.upcycle.upcycled_optimizer_state, grow.grown_optimizer_state).

A transformation that has a moments mode (copies and slices as for the weights, no scale
factors, new entries zero) is run three times on twins of the model whose parameters hold the
first moments, the second moments, and a marker (1 where a parameter has state): the
marker's image says which new parameters come from old state (they keep its step count) and
which are new as a whole (no state: AdamW starts them as it starts any parameter).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

MOMENTS = ("exp_avg", "exp_avg_sq")


def carry_moments(optim: dict, model: nn.Module, transform) -> dict:
    """{new parameter name: {"step", "exp_avg", "exp_avg_sq"}} for ``transform(model)`` from
    ``optim``, ``model``'s state by parameter name; ``transform`` runs in its moments mode."""
    params = dict(model.named_parameters())
    if not isinstance(optim, dict):
        raise ValueError(f"optimizer state: got a {type(optim).__name__}, expected {{parameter name: "
                         "{'step', 'exp_avg', 'exp_avg_sq'}} (a checkpoint's 'optim')")
    for name, entry in optim.items():
        if name not in params:
            raise ValueError(f"optimizer state: {name!r} is not a parameter of the model; pass the state "
                             "saved with this model")
        if not isinstance(entry, dict) or any(k not in entry for k in ("step", *MOMENTS)):
            raise ValueError(f"optimizer state: the entry of {name!r} lacks 'step', 'exp_avg' or "
                             "'exp_avg_sq'; pass AdamW's state")
        for k in MOMENTS:
            if tuple(entry[k].shape) != tuple(params[name].shape):
                raise ValueError(f"optimizer state: {name!r} {k} has shape {tuple(entry[k].shape)}, the "
                                 f"parameter {tuple(params[name].shape)}; pass the state saved with this "
                                 "model")
    steps = {float(e["step"]) for e in optim.values()}
    images = {}
    for key in (*MOMENTS, None):
        twin = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in twin.named_parameters():
                entry = optim.get(name)
                if key is None:
                    p.fill_(0.0 if entry is None else 1.0)
                else:
                    p.copy_(torch.zeros_like(p) if entry is None else entry[key].to(p))
        device = p.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            images[key] = dict(transform(twin).named_parameters())
    out = {}
    for name, marker in images[None].items():
        if not bool(marker.detach().ne(0).any()):
            continue                       # new as a whole: no state
        own = optim.get(name)
        step = own["step"] if own is not None else torch.tensor(max(steps), dtype=torch.float32)
        out[name] = {"step": step.clone() if torch.is_tensor(step) else step,
                     **{k: images[k][name].detach().clone() for k in MOMENTS}}
    return out
