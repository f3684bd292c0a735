"""Consolidated checkpoints from a parallel run: one single-device state (model and
optimizer), gathered on every rank and written by rank 0, so that a run saved with one
layout resumes with another (2 ranks -> 1 rank, ep=2 -> ep=1, ...).

Expert-parallel parameters and their AdamW moments are all-gathered along the expert
dimension over the "ep" group; FSDP2 states come from torch.distributed.checkpoint's
full-state-dict API. (Sharded torch.distributed.checkpoint files for models too large to
consolidate are not written yet.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moekit.moe.layer import MoELayer

_MOMENTS = ("exp_avg", "exp_avg_sq")


def _expert_params(model: nn.Module) -> dict[int, tuple[MoELayer, str]]:
    out = {}
    for layer in (m for m in model.modules() if isinstance(m, MoELayer) and hasattr(m, "expert_slice")):
        for name in ("w_gate_EDF", "w_up_EDF", "w_down_EFD"):
            p = getattr(layer.experts, name)
            if p is not None:
                out[id(p)] = (layer, name)
    return out


def _gather_dim0(t: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def full_state(model: nn.Module, opt: torch.optim.Optimizer, sharding: str,
               ep_group=None) -> tuple[dict, dict]:
    """(model state, optimizer state) as one device would hold them. Collective: every rank calls it."""
    if sharding == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, opt, options=opts)
    experts = _expert_params(model)
    model_sd = model.state_dict()
    opt_sd = opt.state_dict()
    if experts:
        names = {id(p): n for n, p in model.named_parameters()}
        for pid in experts:
            model_sd[names[pid]] = _gather_dim0(model_sd[names[pid]], ep_group)
        params = [p for g in opt.param_groups for p in g["params"]]
        for idx, p in enumerate(params):
            if id(p) in experts and idx in opt_sd["state"]:
                # opt.state_dict() shares the live per-parameter dicts: copy before replacing
                opt_sd["state"][idx] = dict(opt_sd["state"][idx])
                for k in _MOMENTS:
                    opt_sd["state"][idx][k] = _gather_dim0(opt_sd["state"][idx][k], ep_group)
    return model_sd, opt_sd


def load_full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict,
                              sharding: str) -> None:
    """Load a single-device optimizer state into this rank's (possibly expert-sharded) optimizer."""
    if sharding == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
        return
    experts = _expert_params(model)
    if experts:
        state = {**state, "state": {k: dict(v) for k, v in state["state"].items()}}
        params = [p for g in opt.param_groups for p in g["params"]]
        for idx, p in enumerate(params):
            if id(p) in experts and idx in state["state"]:
                lo, hi = experts[id(p)][0].expert_slice
                for k in _MOMENTS:
                    state["state"][idx][k] = state["state"][idx][k][lo:hi].clone()
    opt.load_state_dict(state)
