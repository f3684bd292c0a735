"""More experts: every MoE layer's E experts become E' > E, the new ones copies of old ones.

    big, mapping = grow_experts(model, 16)                    # 8 -> 16: every expert copied once
    big, mapping = grow_experts(model, 12, which="most_loaded", loads=last_loads("runs/moe"))

``mapping[layer][j]`` is the old expert new expert ``j`` copies; old experts keep their
indices (``mapping[layer][:E] == range(E)``). ``which="all"``: expert ``j`` copies ``j mod E``
(E' a multiple of E). ``which="most_loaded"``: the E' - E new experts copy the layer's most
loaded experts (by ``loads``, e.g. a run's last logged ``moe/layer{i}/load``), the most loaded
first, cycling when there are more new experts than old ones.

Copied exactly: each expert's gate/up/down, its router row (and noisy-gating row). A source
with c - 1 copies (c experts share it) is split by its router:

- ``softmax``: the source and its copies get a logit offset of -log(c), held in the router's
  ``expert_bias_E`` buffer, which a softmax router adds to its logits (zero, and so no change
  of a single bit, for a model that never grew). For every token the c probabilities then sum
  to the source's probability, and the logsumexp (the z-loss) is the source's. The router has
  no bias and reads an RMS-normalised input, so no weight can hold the shift; that buffer is
  saved in every state dict already, so checkpoints and exports carry it, and the ones of
  models that never grew keep their keys. A Hugging Face export refuses an offset that is not
  constant per layer (``most_loaded``; a constant one changes no softmax probability).
- ``sigmoid``: rows and the aux-loss-free bias copied; scores do not sum to one, so each copy
  is as likely as its source: the score mass of a copied expert is multiplied by c.
- ``expert_choice``: rows copied; each copy takes the same tokens as its source.

``top_k`` stays, so the function changes: a token's top-k now holds copies (ties among equal
probabilities go to the lower index: the source, then its copies). What holds exactly, with
``which="all"`` and m = E'/E copies of each expert: dropless, top_k = 1 with
``top1_weight="one"`` is the source function (the same source expert, weight 1; with
``"prob"`` the weight is p/m; with a capacity the source expert keeps 1/m of its slots, so
more tokens drop); top_k' = m * top_k with renormalised weights (or top_k = 1 with
``normalize_topk=False``) is the source function, dropless or not (all m copies of each chosen
expert; capacity ceil(capacity_factor * T * K / E') keeps its slots per expert).
``most_loaded`` divides the copied experts' probabilities by c, so a token may change experts.
``noise_std`` adds N(0, noise_std) (seeded) to the copies' router rows to break their symmetry.

A dynamic number of experts per token (``MoEConfig.dynamic_k``): ``relu`` routing (gates
relu(x W), unnormalised) divides the router rows of a source and its copies by c instead of
an offset: relu is positively homogeneous, so each of the c gates is the source's gate / c and
they sum to it, with the same tokens (and with ``which="all"`` the load-weighted L1 penalty is
unchanged too; uneven copies change its load weights). Every positive gate is
taken, so this is the source function (any ``which``, dropless; with a capacity under
``which="all"``) unless ``max_k`` cuts: max_k and target_k (the compute budget, which the
controller then returns to) stay as they are, as top_k does, and max_k = m * max_k would be
exact. ``top_p`` and ``null`` are refused (no copy keeps which experts a token takes).
The null experts' rows and the budget controller's ``k_control`` are per layer, not per
expert: carried as they are.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from torch import Tensor

from moekit.checks import is_int, is_real, require_fixed_k, require_float
from moekit.model.transformer import MoETransformer
from moekit.transform.grow import _build

WHICH = ("all", "most_loaded")
# per MoE layer, every tensor under these has one row per expert on dim 0 (but _PER_LAYER's)
_PER_EXPERT = ("ffn.experts.", "ffn.router.")
_PER_LAYER = ("ffn.router.k_control", "ffn.router.null_ND")   # dynamic_k: not per expert
# why no copy keeps a dynamic number of experts' function (relu's is kept: see the docstring)
_DYNAMIC_WHY = {
    "top_p": "takes experts until their probability mass reaches p, and a source's copies share its "
             "probability, so a token may take some of them but not all (a different function)",
    "null": "compares each expert's logit with the null experts', and copies (logit offset -log c, the "
            "null experts uncopied) lose to them where the source won (a different function)",
}
_LOAD_KEY = re.compile(r"moe/layer(\d+)/load")


def grow_experts(model: MoETransformer, num_experts: int, *, which: str = "all",
                 loads: dict[int, Tensor] | None = None, noise_std: float = 0.0,
                 seed: int = 0) -> tuple[MoETransformer, dict[int, list[int]]]:
    """(a new model whose MoE layers have ``num_experts`` experts, {MoE layer: the old expert each
    new expert copies}). Everything but the experts and routers is copied as it is.

    Example:
        >>> from moekit.model.config import ModelConfig
        >>> from moekit.moe.config import MoEConfig
        >>> cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, d_ff=32,
        ...                   moe=MoEConfig(d_model=16, d_ff=16, num_experts=2, top_k=1))
        >>> big, mapping = grow_experts(MoETransformer.build(cfg), 4)
        >>> big.cfg.moe.num_experts, mapping
        (4, {0: [0, 1, 0, 1]})
    """
    require_float(model, "grow_experts")
    mode = getattr(model.cfg.moe, "dynamic_k", "none")
    require_fixed_k(model.cfg.moe, "grow_experts", _DYNAMIC_WHY.get(mode, ""), "grow the experts of a "
                    "dynamic_k='none' or 'relu' model, or train this one with more experts from the "
                    "start (model.moe.num_experts)", allowed=("relu",))
    if model.cfg.routes_by_tag:
        raise ValueError(f"grow_experts: the model routes by tag (model.moe.router_input="
                         f"{model.cfg.moe.router_input!r}); growing its tag tables is not supported yet")
    mapping = expert_mapping(model, num_experts, which=which, loads=loads)
    if not is_real(noise_std) or noise_std < 0:
        raise ValueError(f"grow_experts: noise_std={noise_std!r} must be a finite number >= 0; use 0 for "
                         "exact copies or e.g. 1e-3")
    if not is_int(seed):
        raise ValueError(f"grow_experts: seed={seed!r} must be an integer")
    m = model.cfg.moe
    cfg = dataclasses.replace(model.cfg, moe=dataclasses.replace(m, num_experts=num_experts))
    new = _build(cfg, model)
    gen = torch.Generator().manual_seed(seed)
    grown = {}
    for name, t in model.state_dict().items():
        layer, key = block_key(name)
        if layer in mapping and per_expert(key):
            t = t.index_select(0, torch.tensor(mapping[layer], device=t.device))
        grown[name] = t
    score = "relu" if m.dynamic_k == "relu" else m.router
    for i, src in mapping.items():
        _split_router(grown, f"blocks.{i}.ffn.router.", src, m.num_experts, score, noise_std, gen)
    with torch.no_grad():
        new.load_state_dict(grown)
    return new, mapping


def expert_mapping(model: MoETransformer, num_experts: int, *, which: str = "all",
                   loads: dict[int, Tensor] | None = None) -> dict[int, list[int]]:
    """{MoE layer: source expert of each of the ``num_experts`` experts} that :func:`grow_experts`
    builds, after checking every argument (one line each)."""
    if not isinstance(model, MoETransformer):
        raise ValueError(f"grow_experts: got a {type(model).__name__}, expected an MoETransformer; load one "
                         "with moekit.load_model")
    if model.cfg.moe is None:
        raise ValueError("grow_experts: the model is dense (no MoE layers); upcycle it first "
                         "(moekit upcycle)")
    E = model.cfg.moe.num_experts
    if which not in WHICH:
        raise ValueError(f"grow_experts: which={which!r} is not one of {WHICH}")
    if not is_int(num_experts) or num_experts <= E:
        raise ValueError(f"grow_experts: num_experts={num_experts!r} must be an integer > the model's {E} "
                         "experts; grow only grows")
    layers = model.moe_layers()
    if any(layer.experts_sharded for layer in layers.values()):
        raise ValueError("grow_experts: the model's experts are sharded (expert parallelism); grow the full "
                         "model on one process")
    if which == "all":
        if loads is not None:
            raise ValueError("grow_experts: loads are read by which='most_loaded' only; drop them or use "
                             "which='most_loaded'")
        if num_experts % E:
            raise ValueError(f"grow_experts: num_experts={num_experts} is not a multiple of {E}: which='all' "
                             f"copies every expert equally; use a multiple of {E} or which='most_loaded'")
        return {i: list(range(E)) + [j % E for j in range(E, num_experts)] for i in layers}
    counts = _checked_loads(loads, sorted(layers), E)
    out = {}
    for i in layers:
        ranked = sorted(range(E), key=lambda e: (-counts[i][e], e))   # most loaded first; ties: lower index
        out[i] = list(range(E)) + [ranked[r % E] for r in range(num_experts - E)]
    return out


def _checked_loads(loads, layers: list[int], E: int) -> dict[int, list[float]]:
    """{layer: E token counts} for exactly the MoE layers, finite and >= 0, or one line."""
    where = "e.g. the last moe/layer{i}/load of the run's metrics.jsonl (last_loads(run_dir))"
    if loads is None:
        raise ValueError(f"grow_experts: which='most_loaded' needs loads={{layer: [{E}] token counts}}, "
                         f"{where}")
    if not isinstance(loads, dict) or set(loads) != set(layers):
        given = sorted(loads, key=str) if isinstance(loads, dict) else type(loads).__name__
        raise ValueError(f"grow_experts: loads holds layers {given}, expected the MoE layers {layers}; pass "
                         f"one [{E}] count per MoE layer, {where}")
    out = {}
    for i in layers:
        try:
            v = torch.as_tensor(loads[i], dtype=torch.float64).detach().cpu()
        except (TypeError, ValueError, RuntimeError):
            v = None
        if v is None or tuple(v.shape) != (E,) or not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
            shape = "a non-numeric value" if v is None else f"shape {tuple(v.shape)}"
            raise ValueError(f"grow_experts: loads[{i}] ({shape}) is not {E} finite counts >= 0, one per "
                             f"expert of layer {i}; pass {where}")
        out[i] = v.tolist()
    return out


def per_expert(key: str) -> bool:
    """Whether a block's tensor (``key`` without "blocks.i.") has one row per expert on dim 0."""
    return key.startswith(_PER_EXPERT) and key not in _PER_LAYER


def block_key(name: str) -> tuple[int | None, str]:
    """"blocks.3.ffn.router.weight_ED" -> (3, "ffn.router.weight_ED"); (None, name) outside blocks."""
    hit = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    return (int(hit[1]), hit[2]) if hit else (None, name)


def _split_router(state: dict[str, Tensor], prefix: str, src: list[int], E: int, router: str,
                  noise_std: float, gen: torch.Generator) -> None:
    """The -log(c) offset of a softmax router (c experts share a source), the 1/c rows of a
    relu router, and the copies' noise, in ``state``, whose per-expert rows are already the
    sources' (index_select copies them)."""
    src_N = torch.tensor(src)
    shared_E = torch.bincount(src_N, minlength=E).double()              # c per source
    if router == "softmax":
        bias = state[prefix + "expert_bias_E"]
        state[prefix + "expert_bias_E"] = bias - shared_E.log()[src_N].to(bias)   # c = 1: minus 0, exact
    elif router == "relu":                                              # relu(x w / c) = relu(x w) / c
        w = state[prefix + "weight_ED"]
        state[prefix + "weight_ED"] = w / shared_E[src_N].to(device=w.device, dtype=w.dtype)[:, None]
    if noise_std:
        w = state[prefix + "weight_ED"].clone()
        noise = torch.randn(len(src) - E, w.shape[1], generator=gen, dtype=torch.float32) * noise_std
        w[E:] += noise.to(w)
        state[prefix + "weight_ED"] = w


def last_loads(run_dir: str | Path) -> dict[int, list[float]]:
    """{MoE layer: tokens per expert} of the last ``moe/layer{i}/load`` a run logged in its
    ``metrics.jsonl`` (a torn last line from a kill is skipped); one line if it logged none."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{str(run_dir)!r} has no metrics.jsonl to read expert loads from "
                         "(which='most_loaded'); give the run directory that trained the model, or use "
                         "which='all'")
    loads = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        for key, value in row.items() if isinstance(row, dict) else ():
            hit = _LOAD_KEY.fullmatch(key)
            if hit and isinstance(value, list):
                loads[int(hit[1])] = value
    if not loads:
        raise ValueError(f"{str(path)!r} logs no moe/layer{{i}}/load (a dense run, or none logged yet); "
                         "train until a log step, or use which='all'")
    return loads


def grow_experts_is_exact(model: MoETransformer, grown: MoETransformer,
                          mapping: dict[int, list[int]]) -> bool:
    """True when ``grown`` computes ``model``'s function at step 0 as it is: a dropless softmax
    top-1 router with weight one (``top1_weight="one"``), every expert copied equally, no router
    noise (with a capacity, each expert's slots shrink by the copy factor). (Every
    softmax growth keeps each expert's probability mass; see the module docstring.) relu
    routing: no max_k and no noise, dropless or every expert copied equally."""
    m = model.cfg.moe
    even = all(src == [j % m.num_experts for j in range(len(src))] for src in mapping.values())
    if m.dynamic_k == "relu":
        return _relu_exact(model, grown, mapping, even)
    if m.router != "softmax" or m.top_k != 1 or m.top1_weight != "one" or not even:
        return False
    if m.capacity_factor is not None:   # E' experts have 1/m of the slots each: more tokens dropped
        return False
    old, new = model.moe_layers(), grown.moe_layers()
    return all(torch.equal(new[i].router.weight_ED, old[i].router.weight_ED[mapping[i]]) for i in mapping)


def _relu_exact(model: MoETransformer, grown: MoETransformer, mapping: dict[int, list[int]],
                even: bool) -> bool:
    """relu routing: every positive gate taken (no max_k), the rows the sources' / c (no noise),
    and dropless or every expert copied equally (the same slots per expert)."""
    m = model.cfg.moe
    if m.max_k is not None or (m.capacity_factor is not None and not even):
        return False
    old, new = model.moe_layers(), grown.moe_layers()
    for i, src in mapping.items():
        w = old[i].router.weight_ED
        c = torch.bincount(torch.tensor(src), minlength=m.num_experts).double()[src]
        if not torch.equal(new[i].router.weight_ED, w[src] / c.to(w)[:, None]):
            return False
    return True


def exact_max_k(model: MoETransformer, mapping: dict[int, list[int]]) -> int | None:
    """relu routing with a max_k, every expert copied m times: m * max_k takes the m copies of
    each expert a token took, the source function; None otherwise."""
    m = model.cfg.moe
    copies = _copies_each(mapping, m.num_experts)
    if m.dynamic_k != "relu" or m.max_k is None or copies is None:
        return None
    return copies * m.max_k


def _copies_each(mapping: dict[int, list[int]], E: int) -> int | None:
    """m when every layer copied each of its E experts m times (in the order of ``which="all"``),
    else None."""
    even = all(len(src) % E == 0 and src == [j % E for j in range(len(src))] for src in mapping.values())
    if not even or len({len(src) for src in mapping.values()}) != 1:
        return None
    return len(next(iter(mapping.values()))) // E


def exact_top_k(model: MoETransformer, mapping: dict[int, list[int]]) -> int | None:
    """The top_k with which a grown softmax model computes ``model``'s function: m * top_k when
    every expert has m copies (all m copies of each chosen expert are taken, weights p/m summing
    to p) and the weights are renormalised at top_k > 1 or not at top_k = 1 (Switch); 1 for
    top-1 with weight one (already exact); None otherwise."""
    m = model.cfg.moe
    copies = _copies_each(mapping, m.num_experts)
    if m.router != "softmax" or m.dynamic or copies is None:
        return None
    if m.top_k == 1 and m.top1_weight == "one":
        return 1
    if m.normalize_topk != (m.top_k > 1):
        return None
    return copies * m.top_k
