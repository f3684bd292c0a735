"""Scale-Out: a dense model becomes an MoE (EfficientScale; sparse upcycling).

    moe = upcycle(dense, 8, 2)                                     # copy: every expert the FFN
    moe = upcycle(dense, 8, 2, method="drop", drop_ratio=0.5)      # Drop-Upcycling
    moe = upcycle(dense, 16, 4, method="virtual-group", granularity=4)   # fine-grained shards
    moe = upcycle(dense, 8, 1)                                     # top-1: weight 1 (top1_weight="one")

Everything but the upcycled FFNs is copied as it is; each upcycled layer's router is new,
N(0, router_std) by default or zeros. The methods:

- ``copy`` (Komatsuzaki et al. 2023): every expert is a copy of the dense SwiGLU FFN. The k
  renormalised combine weights sum to one over identical experts, so the MoE computes the
  dense function at step 0 whatever the router says. At top_k = 1 the weight is made
  1 in value (``top1_weight="one"``, the probability's gradient still trains the router).
- ``drop`` (Drop-Upcycling, Nakamura et al. 2025): as ``copy``, then each expert re-draws
  its own random share ``drop_ratio`` of the FFN's hidden units (gate and up columns, down
  rows) from N(mean, std) of the original matrix, so experts start diverse. It changes the
  function by design; attention, norms and embeddings are untouched.
- ``virtual-group`` (He et al. 2024): the FFN's hidden units are cut into ``granularity`` G
  shards of width d_ff / G; expert e holds shard e mod G. Experts j*G .. j*G+G-1 (a virtual
  group: one of each shard) get the same router row, so top_k = k' * G picks whole groups;
  each shard's weights then sum to 1/G, and the down projections are scaled by G: the dense
  function at step 0 (with the renormalised top-k of a token-choice router). top_k = G
  gives the dense model's active parameters.

Softmax-then-top-k (``normalize_topk=False``, Megatron's granular upcycling, He et al. 2024,
arXiv 2410.07524): the k chosen weights are the router's probabilities, about 1/E each at a
near-uniform start, so the layer would begin at k/E of the dense function. ``weight_scale``
("auto") multiplies the experts' down projections by E / k there (1 elsewhere); with
``router_init="zeros"`` the probabilities are exactly 1/E and the upcycle is exact again.

``shared_from_ffn`` adds one shared expert, a copy of the FFN; the shared and routed down
projections are halved so their sum is still the dense function (with ``shared_gate`` the
gate starts at weight zero, sigmoid(0) = 1/2, and the shared down projection is not halved).

Function preservation needs a token-choice router with renormalised top-k weights (or
top_k = 1 with ``top1_weight="one"``) and no capacity drops; with a dynamic number of experts
per token (``dynamic_k``) only top_p's renormalised weights with min_k >= 2, by ``copy``;
:func:`upcycle_is_exact` says whether an upcycle is exact. Other router options are allowed
(the result is then not the dense function at step 0).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from moekit.checks import is_int, require_float
from moekit.model.transformer import MoETransformer
from moekit.moe.config import MoEConfig

METHODS = ("copy", "drop", "virtual-group")
# MoEConfig fields an upcycle sets itself (from the dense model and its own arguments)
SET_BY_UPCYCLE = ("d_model", "d_ff", "num_experts", "top_k", "num_shared_experts", "shared_d_ff")
ROUTER_INITS = ("normal", "zeros")


def upcycle(model: MoETransformer, num_experts: int, top_k: int, *, method: str = "copy",
            drop_ratio: float | None = None, granularity: int = 1, layers="all", router_init: str = "normal",
            router_std: float = 0.02, shared_from_ffn: bool = False, seed: int = 0,
            weight_scale: float | str = "auto", _moments: bool = False, **moe_options) -> MoETransformer:
    """A new MoETransformer whose ``layers`` ("all", "alternate" or indices) are MoE layers of
    ``num_experts`` experts made from the dense FFN by ``method``; ``moe_options`` are further
    MoEConfig fields (router, aux_loss_free, jitter_eps, ...).

    Example:
        >>> from moekit.model.config import ModelConfig
        >>> cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32)
        >>> dense = MoETransformer.build(cfg)
        >>> moe = upcycle(dense, num_experts=4, top_k=2)
        >>> x = torch.randint(0, 64, (1, 8))
        >>> torch.allclose(moe.eval()(x).logits, dense.eval()(x).logits, atol=1e-5)
        True
    """
    require_float(model, "upcycle")
    if not is_int(seed):
        raise ValueError(f"upcycle: seed={seed!r} must be an integer")
    moe = upcycle_config(model, num_experts, top_k, method=method, drop_ratio=drop_ratio,
                         granularity=granularity, router_init=router_init, router_std=router_std,
                         shared_from_ffn=shared_from_ffn, **moe_options)
    expert_scale = 1.0 if _moments else _expert_scale(moe, weight_scale)
    new = MoETransformer.build(dataclasses.replace(model.cfg, moe=moe, moe_layers=layers))
    src = model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in new.state_dict().items():
            if name in src:
                t.copy_(src[name])
        for i, layer in new.moe_layers().items():
            ffn = model.blocks[i].ffn
            gate_DF, up_DF, down_FD = ffn.w_gate.weight.t(), ffn.w_up.weight.t(), ffn.w_down.weight.t()
            scale = 0.5 if shared_from_ffn and not _moments else 1.0
            ratio = 0.5 if drop_ratio is None else drop_ratio      # Drop-Upcycling's best
            _fill_experts(layer, gate_DF, up_DF, down_FD * (scale * expert_scale), method, ratio, granularity,
                          gen, _moments)
            groups = granularity if method == "virtual-group" else 1
            _init_router(layer.router, router_init, router_std, groups, gen)
            if _moments:                                 # a new router: no state to carry
                for p in layer.router.parameters():
                    p.zero_()
            if shared_from_ffn:
                layer.shared.w_gate.weight.copy_(ffn.w_gate.weight)
                layer.shared.w_up.weight.copy_(ffn.w_up.weight)
                gated = layer.shared_gate is not None    # a zero gate weight: sigmoid(0) = 1/2, so x 2
                layer.shared.w_down.weight.copy_(ffn.w_down.weight * (2 * scale if gated and not _moments
                                                                      else scale))
                if gated:
                    layer.shared_gate.weight.zero_()
    return new


def upcycled_optimizer_state(optim: dict, model: MoETransformer, num_experts: int, top_k: int,
                             **upcycle_args) -> dict:
    """The AdamW state of ``model`` (the dense model: {parameter name: {"step", "exp_avg",
    "exp_avg_sq"}}, a checkpoint's ``"optim"``) for ``upcycle(model, num_experts, top_k,
    **upcycle_args)``, the same arguments and seed: moments mapped the way the weights are
    (copied into every expert, sliced into virtual-group shards, the shared expert's copied;
    a Drop-Upcycling expert's re-drawn units start at zero), without the weights' scale
    factors; the routers and the shared gate are new parameters with no state (AdamW starts
    them fresh). Every other parameter keeps its state, step count included.

    At step 0 a function-preserving upcycle (:func:`upcycle_is_exact`; no balance or z-loss
    terms, whose gradients reach the attention through the router) gives every parameter
    outside the MoE layers the dense model's gradients, so with this state its next AdamW step
    is the dense model's step (tests/transform/test_optimizer_state.py)."""
    from moekit.transform.moments import carry_moments
    return carry_moments(optim, model,
                         lambda m: upcycle(m, num_experts, top_k, _moments=True, **upcycle_args))


def upcycle_config(model: MoETransformer, num_experts: int, top_k: int, *, method: str = "copy",
                   drop_ratio: float | None = None, granularity: int = 1, router_init: str = "normal",
                   router_std: float = 0.02, shared_from_ffn: bool = False, **moe_options) -> MoEConfig:
    """The MoEConfig :func:`upcycle` builds, after checking the arguments (one line each)."""
    cfg = model.cfg
    if not isinstance(model, MoETransformer):
        raise ValueError(f"upcycle: got a {type(model).__name__}, expected an MoETransformer; load one with "
                         "moekit.load_model")
    if cfg.moe is not None:
        raise ValueError("upcycle: the model is already an MoE (model.moe is set); upcycle a dense model, "
                         "or grow its experts instead")
    if moe_options.get("router_input", "token") != "token":
        raise ValueError(f"upcycle: router_input={moe_options['router_input']!r}: an upcycled router starts "
                         "from token routing; upcycle with router_input='token'")
    if method not in METHODS:
        raise ValueError(f"upcycle: method={method!r} is not one of {METHODS}")
    if not isinstance(shared_from_ffn, bool):
        raise ValueError(f"upcycle: shared_from_ffn={shared_from_ffn!r} must be true or false")
    if router_init not in ROUTER_INITS:
        raise ValueError(f"upcycle: router_init={router_init!r} is not one of {ROUTER_INITS}")
    if not isinstance(router_std, (int, float)) or not router_std >= 0:
        raise ValueError(f"upcycle: router_std={router_std!r} must be a number >= 0; use e.g. 0.02")
    if isinstance(num_experts, int) and isinstance(top_k, int) and 0 < num_experts < top_k:
        raise ValueError(f"upcycle: {num_experts} experts are fewer than top_k={top_k}; use at least "
                         f"{top_k} experts or a smaller top_k")
    if method != "drop" and drop_ratio is not None:
        raise ValueError(f"upcycle: drop_ratio={drop_ratio!r} applies to method='drop' only; drop it or use "
                         "that method")
    bad_ratio = (isinstance(drop_ratio, bool) or not isinstance(drop_ratio, (int, float))
                 or not 0 <= drop_ratio <= 1)
    if method == "drop" and drop_ratio is not None and bad_ratio:
        raise ValueError(f"upcycle: drop_ratio={drop_ratio!r} must be in [0, 1]; 0.5 is "
                         "Drop-Upcycling's best")
    G = granularity
    if method != "virtual-group" and G != 1:
        raise ValueError(f"upcycle: granularity={G!r} applies to method='virtual-group' only; drop it or "
                         "use that method")
    if method == "virtual-group":
        if isinstance(G, bool) or not isinstance(G, int) or G < 1 or cfg.d_ff % G:
            raise ValueError(f"upcycle: granularity={G!r} must be a positive integer dividing "
                             f"d_ff={cfg.d_ff}")
        if not isinstance(num_experts, int) or num_experts % G or not isinstance(top_k, int) or top_k % G:
            raise ValueError(f"upcycle: virtual-group needs num_experts={num_experts!r} and "
                             f"top_k={top_k!r} to be multiples of granularity={G}; top_k={G} keeps the dense "
                             "active width")
    if moe_options.get("activation", "swiglu") != "swiglu":
        raise ValueError(f"upcycle: activation={moe_options['activation']!r}: the dense FFN is SwiGLU, "
                         "so are its experts; drop the option")
    for name in ("num_shared_experts", "d_ff", "shared_d_ff"):
        if name in moe_options:
            raise ValueError(f"upcycle: {name} is set by the method (shared_from_ffn, granularity); drop it")
    dynamic = moe_options.get("dynamic_k", "none")
    if dynamic == "relu" and router_init == "zeros":
        raise ValueError("upcycle: router_init='zeros' with dynamic_k='relu' gates every expert relu(0) = 0: "
                         "no token reaches an expert and no gate gets a gradient; use router_init='normal'")
    if top_k == 1 and moe_options.get("router") != "expert_choice" and dynamic == "none":
        moe_options.setdefault("top1_weight", "one")
    shared = {"num_shared_experts": 1} if shared_from_ffn else {}
    if shared_from_ffn and G > 1:
        shared["shared_d_ff"] = cfg.d_ff
    return MoEConfig(d_model=cfg.d_model, d_ff=cfg.d_ff // G, num_experts=num_experts, top_k=top_k,
                     **shared, **moe_options)


def _expert_scale(moe: MoEConfig, weight_scale) -> float:
    """The factor on the experts' down projections: "auto" = E / k for softmax-then-top-k."""
    if weight_scale == "auto":
        softmax_then_topk = moe.router == "softmax" and not moe.normalize_topk and not moe.dynamic
        return moe.num_experts / moe.top_k if softmax_then_topk and moe.top_k > 1 else 1.0
    if isinstance(weight_scale, bool) or not isinstance(weight_scale, (int, float)) or not weight_scale > 0:
        raise ValueError(f"upcycle: weight_scale={weight_scale!r} must be 'auto' or a number > 0; 'auto' "
                         "scales softmax-then-top-k experts by num_experts / top_k")
    return float(weight_scale)


def upcycle_is_exact(moe: MoEConfig, method: str, router_init: str = "normal",
                     weight_scale="auto") -> bool:
    """True when an upcycle by ``method`` into ``moe`` computes the dense function at step 0
    in eval mode (training-time noise or jitter can split a virtual group; a ``copy``'s equal
    experts do not care)."""
    if method == "drop" or moe.router == "expert_choice" or moe.capacity_factor is not None:
        return False
    if (moe.router == "softmax" and not moe.normalize_topk and not moe.dynamic and moe.top_k > 1
            and router_init == "zeros" and weight_scale == "auto"):
        return True           # probabilities exactly 1/E, k of them, scaled by E / k
    if moe.dynamic:
        # top_p: renormalised weights over equal experts sum to one, so copies are exact when
        # every token takes at least 2 (a token with one expert keeps its probability as its
        # weight; a virtual group may be cut by the mass p); null: the chosen null experts take a
        # share of the weight; relu: the gates do not sum to one
        return (moe.dynamic_k == "top_p" and moe.normalize_topk and moe.k_range[0] >= 2
                and method == "copy")
    if moe.top_k == 1:
        return moe.top1_weight == "one"
    return moe.normalize_topk


def _fill_experts(layer, gate_DF: Tensor, up_DF: Tensor, down_FD: Tensor, method: str, drop_ratio: float,
                  G: int, gen: torch.Generator, moments: bool = False) -> None:
    """``moments``: the tensors are optimizer moments (no scale; re-drawn units start at zero)."""
    ex = layer.experts
    E, F = ex.w_up_EDF.shape[0], gate_DF.shape[1]
    if method == "virtual-group":
        w = F // G
        for e in range(E):
            g = (e % G) * w
            ex.w_gate_EDF[e].copy_(gate_DF[:, g:g + w])
            ex.w_up_EDF[e].copy_(up_DF[:, g:g + w])
            ex.w_down_EFD[e].copy_(down_FD[g:g + w] * (1 if moments else G))
        return
    ex.w_gate_EDF.copy_(gate_DF.expand_as(ex.w_gate_EDF))
    ex.w_up_EDF.copy_(up_DF.expand_as(ex.w_up_EDF))
    ex.w_down_EFD.copy_(down_FD.expand_as(ex.w_down_EFD))
    if method == "drop":
        n = round(drop_ratio * F)
        stats = [(w.mean(), w.std()) for w in (gate_DF, up_DF, down_FD)]
        for e in range(E):
            idx = torch.randperm(F, generator=gen)[:n]
            (mg, sg), (mu, su), (md, sd) = stats
            keep = 0.0 if moments else 1.0          # the same draws either way: the same units
            ex.w_gate_EDF[e][:, idx] = (torch.randn(gate_DF.shape[0], n, generator=gen) * sg + mg) * keep
            ex.w_up_EDF[e][:, idx] = (torch.randn(up_DF.shape[0], n, generator=gen) * su + mu) * keep
            ex.w_down_EFD[e][idx] = (torch.randn(n, down_FD.shape[1], generator=gen) * sd + md) * keep


def _init_router(router: nn.Module, init: str, std: float, G: int, gen: torch.Generator) -> None:
    w = router.weight_ED
    if init == "zeros":
        w.zero_()
    else:   # one row per virtual group (G = 1: per expert), shared by the group's experts
        rows = torch.randn(w.shape[0] // G, w.shape[1], generator=gen) * std
        w.copy_(rows.repeat_interleave(G, dim=0))
    if getattr(router, "noise_ED", None) is not None:
        nn.init.zeros_(router.noise_ED)
    if getattr(router, "null_ND", None) is not None:   # dynamic_k="null": the null experts' rows alike
        if init == "zeros":
            router.null_ND.zero_()
        else:
            router.null_ND.copy_(torch.randn(router.null_ND.shape, generator=gen) * std)
