"""LoRA adapters (Hu et al. 2021) on a frozen moekit model, the experts' stacked weights included.

Shape legend: E experts, I a weight's input dim, O its output dim, r the adapter rank.

Each adapted weight becomes W + (alpha / r) * delta, with a rank-r delta:

- an expert weight, stacked input dim first (``w_up_EDF`` [E, D, F], ``w_down_EFD`` [E, F, D]):
  :class:`LoRA3d`, one pair per expert, A [E, I, r] and B [E, r, O], delta[e] = A[e] @ B[e];
- an ``nn.Linear`` weight [O, I] (attention, dense and shared FFNs): :class:`LoRA2d`,
  A [r, I] and B [O, r], delta = B @ A (the paper's layout).

A is uniform in +-1/sqrt(I) (peft's kaiming-uniform bound) and B is zero, so the adapted model
is the base model exactly until the first step (the paper, section 4.1).

The adapters are ``torch.nn.utils.parametrize`` parametrizations: reading ``experts.w_up_EDF``
returns the adapted weight, so every backend (grouped_mm, segment_mm, reference), capacity
routing and the slow :func:`moekit.moe.reference.reference_moe` use it with no change of their
own. Adapters that wrap only ``nn.Linear`` modules leave fused 3-D expert tensors untouched
(peft issue #3009): here the experts are a target like any other.

Costs: each forward builds the full adapted weight (an [E, I, O] temporary per expert weight,
kept for backward by the expert GEMMs); wrap generation in ``parametrize.cached()`` to build it
once. State dict keys become ``...experts.parametrizations.w_up_EDF.original`` and
``...parametrizations.w_up_EDF.0.A`` / ``.0.B`` until :func:`merge_lora` folds the adapters in.
A parametrized module pickles only through its state_dict (``torch.save(model)`` raises).

Example:
    >>> from moekit import MoEConfig, MoELayer
    >>> layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4))
    >>> add_lora(layer, rank=2, alpha=4.0, targets=("experts",))
    {'adapted': 3, 'lora_params': 384, 'base_params': 800, 'targets': {'experts': 3}}
    >>> tuple(layer.experts.w_up_EDF.shape), has_lora(layer), has_lora(merge_lora(layer))
    ((4, 8, 8), True, False)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from moekit.checks import bad, check_int, check_real
from moekit.model.transformer import Attention
from moekit.moe.experts import DenseFFN, GroupedExperts
from moekit.moe.layer import moe_layers

TARGETS = ("experts", "attention", "dense_ffn", "shared")
_OWN = "finetune"


class LoRA3d(nn.Module):
    """W_EIO + (alpha / r) * A_EIr @ B_ErO: a rank-r update of each expert's [I, O] weight."""

    def __init__(self, w_EIO: Tensor, rank: int, alpha: float):
        super().__init__()
        E, I, O = w_EIO.shape
        self.scale = alpha / rank
        like = {"dtype": w_EIO.dtype, "device": w_EIO.device}
        self.A = nn.Parameter(torch.empty(E, I, rank, **like))
        self.B = nn.Parameter(torch.zeros(E, rank, O, **like))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = self.A.shape[1] ** -0.5      # fan-in I per expert (torch's fan-in of a 3-D tensor is I * r)
        nn.init.uniform_(self.A, -bound, bound)
        nn.init.zeros_(self.B)

    def forward(self, w_EIO: Tensor) -> Tensor:
        return w_EIO + self.scale * torch.bmm(self.A, self.B)


class LoRA2d(nn.Module):
    """W_OI + (alpha / r) * B_Or @ A_rI: the paper's update of an ``nn.Linear`` weight."""

    def __init__(self, w_OI: Tensor, rank: int, alpha: float):
        super().__init__()
        O, I = w_OI.shape
        self.scale = alpha / rank
        like = {"dtype": w_OI.dtype, "device": w_OI.device}
        self.A = nn.Parameter(torch.empty(rank, I, **like))
        self.B = nn.Parameter(torch.zeros(O, rank, **like))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = self.A.shape[1] ** -0.5
        nn.init.uniform_(self.A, -bound, bound)
        nn.init.zeros_(self.B)

    def forward(self, w_OI: Tensor) -> Tensor:
        return w_OI + self.scale * (self.B @ self.A)


def _linear_weights(ffn: DenseFFN) -> list[tuple[nn.Module, str]]:
    return [(lin, "weight") for lin in (ffn.w_gate, ffn.w_up, ffn.w_down) if lin is not None]


def lora_sites(model: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """{target: [(module, tensor name)]} for every target the model has (no empty lists)."""
    shared = {id(m.shared) for m in moe_layers(model).values() if m.shared is not None}
    sites: dict[str, list[tuple[nn.Module, str]]] = {t: [] for t in TARGETS}
    for m in model.modules():
        if isinstance(m, GroupedExperts):
            sites["experts"] += [(m, n) for n in ("w_gate_EDF", "w_up_EDF", "w_down_EFD")
                                 if getattr(m, n) is not None]
        elif isinstance(m, Attention):
            sites["attention"] += [(lin, "weight") for lin in (m.wq, m.wk, m.wv, m.wo)]
        elif isinstance(m, DenseFFN):
            sites["shared" if id(m) in shared else "dense_ffn"] += _linear_weights(m)
    return {t: s for t, s in sites.items() if s}


def _check_args(rank, alpha, targets) -> tuple[str, ...]:
    check_int(_OWN, "lora_rank", rank, 1, fix="set finetune.lora_rank to a positive integer such as 8")
    check_real(_OWN, "lora_alpha", alpha, 0, low_open=True,
               fix="set finetune.lora_alpha to a positive number such as 16 (often 2 * rank)")
    if isinstance(targets, str) or not isinstance(targets, (tuple, list)) or not targets:
        raise bad(_OWN, "lora_targets", targets, "must be a non-empty list of target names",
                  f"pass a tuple drawn from {TARGETS}, e.g. ('experts', 'attention')")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise bad(_OWN, "lora_targets", tuple(targets), f"{unknown} not among {TARGETS}",
                  "use only those names")
    return tuple(dict.fromkeys(targets))


def add_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...]) -> dict:
    """Adapt every weight of ``targets`` in place and freeze every other parameter.

    ``targets`` from :data:`TARGETS`: "experts" (every MoE layer's stacked expert weights),
    "attention" (wq, wk, wv, wo), "dense_ffn" (the FFNs of dense layers), "shared" (the MoE
    layers' shared experts). Routers, norms, embeddings, biases and the shared-expert gate stay
    frozen and unadapted. Targets the model lacks are counted 0 in the summary; a model with
    none of them is an error.

    Returns {"adapted": weights adapted, "lora_params": trainable elements, "base_params":
    frozen elements, "targets": {target: weights adapted}}.
    """
    targets = _check_args(rank, alpha, targets)
    if has_lora(model):
        raise ValueError("add_lora: the model already has LoRA adapters; merge_lora(model) first, "
                         "or adapt a fresh copy of the base model")
    sites = lora_sites(model)
    chosen = {t: sites.get(t, []) for t in targets}
    if not any(chosen.values()):
        raise bad(_OWN, "lora_targets", targets, f"the model has none of these (it has {tuple(sites)})",
                  "pick targets the model has")
    for found in chosen.values():
        for module, name in found:
            w = getattr(module, name)
            lora = (LoRA3d if w.dim() == 3 else LoRA2d)(w.detach(), rank, alpha)
            lora.param_order = list(module._parameters)   # restored by merge_lora
            parametrize.register_parametrization(module, name, lora)
    lora_ids = {id(p) for p in lora_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in lora_ids)
    params = list(model.parameters())   # tied weights once
    n_lora = sum(p.numel() for p in params if id(p) in lora_ids)
    return {"adapted": sum(len(f) for f in chosen.values()), "lora_params": n_lora,
            "base_params": sum(p.numel() for p in params) - n_lora,
            "targets": {t: len(f) for t, f in chosen.items()}}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' factors (A and B of every adapted weight): what the optimizer trains."""
    return [p for m in model.modules() if isinstance(m, (LoRA2d, LoRA3d)) for p in m.parameters()]


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, (LoRA2d, LoRA3d)) for m in model.modules())


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W + (alpha / r) * delta), in place; returns ``model``.

    The state dict then has exactly the base model's keys, in its order, and the function is
    unchanged. The merged weights are the base parameters themselves (same objects), still
    frozen: ``model.requires_grad_(True)`` to train them all.
    """
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for name, chain in list(module.parametrizations.items()):
            loras = [p for p in chain if isinstance(p, (LoRA2d, LoRA3d))]
            if not loras:
                continue
            if len(loras) != len(chain):
                raise ValueError(f"merge_lora: {type(module).__name__}.{name} has parametrizations besides "
                                 "LoRA; remove those first (torch.nn.utils.parametrize)")
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
            params = module._parameters    # removal re-registers the weight last: restore the order
            for key in loras[0].param_order:
                if key in params:
                    params[key] = params.pop(key)
    return model
