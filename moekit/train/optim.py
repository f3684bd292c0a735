"""AdamW with weight-decay groups, the warmup + cosine learning-rate schedule, and the
optimizer state mapped the way a transformation maps the weights.

    optim = grow_optimizer_state(ckpt["optim"], model, big, mapping)   # after grow_experts
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from moekit.checks import is_int
from moekit.config import TrainConfig
from moekit.model.transformer import MoETransformer
from moekit.transform.grow_experts import block_key, per_expert


def param_groups(model: nn.Module, weight_decay: float, router_lr_scale: float = 1.0) -> list[dict]:
    """Decay matrices (linear and expert weights, embeddings); no decay on norms, biases,
    routers and the shared-expert gate (decaying a gate's or router's weights pulls its
    logits to zero: routing is not a capacity to regularise). With ``router_lr_scale`` != 1
    the routers are a third group whose ``lr_scale`` multiplies the schedule's LR."""
    decay, no_decay, routers = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".router." in name and router_lr_scale != 1.0:
            routers.append(p)
        elif p.ndim < 2 or ".router." in name or ".shared_gate." in name or name.endswith("norm.weight"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if routers:
        groups.append({"params": routers, "weight_decay": 0.0, "lr_scale": router_lr_scale})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.router_lr_scale), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2))


def load_named_state(opt: torch.optim.Optimizer, model: nn.Module, optim: dict, mesh=None) -> None:
    """``optim`` ({parameter name: {"step", "exp_avg", "exp_avg_sq"}}, full tensors: a checkpoint's
    or one carried through a transformation) into ``opt``, an AdamW over ``model`` in any layout
    (each rank takes its piece); a parameter without an entry starts fresh, and an entry for a
    parameter the optimizer does not train (frozen) is one error line."""
    from moekit.parallel.checkpointing import load_full_state, training_state
    view = training_state(model, opt, mesh)["optim"]
    extra = [name for name in optim if name not in view]
    if extra:
        raise ValueError(f"the optimizer state given holds {extra[0]!r}, which this run does not train "
                         f"({len(extra)} such); start from the model it was saved with, or a fresh optimizer")
    load_full_state({name: view[name] for name in optim}, optim)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine to cfg.lr * min_lr_ratio at ``decay_steps``
    (= max_steps unless a run was extended), then that floor. A pure function of the step,
    so a resumed run follows the same schedule exactly. The schedule's step is ``step +
    cfg.schedule_start`` (a continued stage; its decay ends at schedule_start + max_steps
    unless decay_steps says otherwise).

    Example:
        >>> cfg = TrainConfig(lr=1.0, warmup_steps=2, max_steps=10, min_lr_ratio=0.1)
        >>> [round(lr_at(s, cfg), 3) for s in (0, 1, 2, 10, 20)]
        [0.5, 1.0, 1.0, 0.1, 0.1]
    """
    step += cfg.schedule_start
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    end = cfg.schedule_start + cfg.max_steps if cfg.decay_steps is None else cfg.decay_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, end - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def grow_optimizer_state(optimizer_state: dict, model_before: MoETransformer, model_after: MoETransformer,
                         mapping: dict[int, list[int]]) -> dict:
    """The AdamW state of ``model_before`` for ``model_after`` (:func:`grow_experts`'s output):
    each expert tensor's and router row's moments copied along ``mapping`` (index_select on
    dim 0), every other entry (the step counts too) as it is. Two formats, returned in the one
    given: a checkpoint's ``"optim"`` ({parameter name: {"step", "exp_avg", "exp_avg_sq"}},
    moekit.parallel.checkpointing.training_state) or ``torch.optim.AdamW.state_dict()`` of an
    optimizer built by moekit.train.optim.build_optimizer (or over ``model.parameters()``).
    The input is not modified.
    """
    params = dict(model_before.named_parameters())
    _check_pair(model_before, model_after, mapping, params)
    index = {name: torch.tensor(mapping[layer]) for name in params
             for layer, key in [block_key(name)] if layer in mapping and per_expert(key)}
    torch_format = isinstance(optimizer_state, dict) and {"state", "param_groups"} <= set(optimizer_state)
    by_name = _names_of_ids(optimizer_state, model_before) if torch_format else None
    entries = optimizer_state["state"] if torch_format else optimizer_state
    if not isinstance(entries, dict):
        raise ValueError(f"grow_optimizer_state: got a {type(entries).__name__}, expected an optimizer "
                         "state_dict() or a checkpoint's 'optim' (parameter name -> state)")
    grown = {}
    for key, entry in entries.items():
        name = by_name[key] if torch_format else key
        if name not in params or not isinstance(entry, dict):
            raise ValueError(f"grow_optimizer_state: state entry {key!r} is not one of model_before's "
                             "parameters; pass the optimizer state saved with model_before")
        grown[key] = {k: _grow_moment(v, name, params[name], index.get(name)) for k, v in entry.items()}
    if not torch_format:
        return grown
    return {**optimizer_state, "state": grown, "param_groups": copy.deepcopy(optimizer_state["param_groups"])}


def _grow_moment(v, name: str, p: Tensor, idx: Tensor | None):
    """A moment (a tensor shaped like its parameter) copied along ``idx``; scalars as they are."""
    if not isinstance(v, Tensor) or v.dim() == 0:
        return v
    if tuple(v.shape) != tuple(p.shape):
        raise ValueError(f"grow_optimizer_state: the state of {name} has shape {tuple(v.shape)}, the "
                         f"parameter {tuple(p.shape)}; pass the optimizer state saved with model_before")
    return v.clone() if idx is None else v.index_select(0, idx.to(v.device))


def _check_pair(before: MoETransformer, after: MoETransformer, mapping: dict, params: dict) -> None:
    layers = before.moe_layers() if isinstance(before, MoETransformer) else {}
    grown = after.moe_layers() if isinstance(after, MoETransformer) else {}
    if not layers or set(mapping) != set(layers) or set(grown) != set(layers):
        raise ValueError(f"grow_optimizer_state: mapping covers layers {sorted(mapping)}, model_before's "
                         f"MoE layers are {sorted(layers)}, model_after's {sorted(grown)}; pass the two "
                         "models and the mapping of one grow_experts call")
    for i, src in mapping.items():
        E, N = layers[i].cfg.num_experts, grown[i].cfg.num_experts
        if len(src) != N or any(not is_int(s) or not 0 <= s < E for s in src):
            raise ValueError(f"grow_optimizer_state: mapping[{i}] is not {N} expert indices in [0, {E}); "
                             "pass the mapping of the grow_experts call that made model_after")
    if [n for n, _ in after.named_parameters()] != list(params):
        raise ValueError("grow_optimizer_state: model_after's parameters are not model_before's (grown in "
                         "more than experts?); pass the output of grow_experts(model_before, ...)")


def _names_of_ids(state: dict, model: MoETransformer) -> dict:
    """{parameter id in a torch optimizer state_dict: parameter name}: from the groups'
    ``param_names`` when saved, else by the order moekit's build_optimizer groups them in (or
    one group of ``model.parameters()``)."""
    groups = state["param_groups"]
    ids = [pid for g in groups for pid in g["params"]]
    if all("param_names" in g for g in groups):
        return dict(zip(ids, [n for g in groups for n in g["param_names"]]))
    name_of = {id(p): n for n, p in model.named_parameters()}
    ours = [[name_of[id(p)] for p in g["params"]] for g in param_groups(model, 0.0)]
    sizes = [len(g["params"]) for g in groups]
    if sizes == [len(g) for g in ours]:
        return dict(zip(ids, [n for g in ours for n in g]))
    if sizes == [len(name_of)]:
        return dict(zip(ids, name_of.values()))
    raise ValueError(f"grow_optimizer_state: the optimizer's parameter groups have sizes {sizes}, neither "
                     f"build_optimizer's {[len(g) for g in ours]} nor one group of all {len(name_of)}; build "
                     "it with moekit.train.optim.build_optimizer or pass a checkpoint's 'optim'")
