"""Scale-Out: a dense model becomes an MoE (sparse upcycling, Komatsuzaki et al. 2023).

    moe = upcycle(dense, num_experts=8, top_k=2)               # every expert a copy of the FFN
    moe = upcycle(dense, 8, 2, layers="alternate", router_init="zeros")

Everything but the upcycled FFNs is copied as it is; each upcycled layer's experts are copies
of its dense SwiGLU FFN, and its router is new (N(0, 0.02) by default, or zeros). With
top_k >= 2 and renormalised top-k weights (the default) the combine weights sum to one over
identical experts, so the MoE computes exactly the dense function at step 0 whatever the
router says. With top_k = 1 the Switch weight is the router probability, which scales the
FFN's output: not function-preserving, so it is refused here for now.

Still to come (the pretrained-models work): Drop-Upcycling (``drop``), virtual-group
fine-grained experts, shared experts seeded from the FFN.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moekit.model.transformer import MoETransformer
from moekit.moe.config import MoEConfig

ROUTER_INITS = ("normal", "zeros")


def upcycle(model: MoETransformer, num_experts: int, top_k: int, *, layers="all", router_init: str = "normal",
            router_std: float = 0.02, seed: int = 0, **moe_options) -> MoETransformer:
    """A new MoETransformer whose ``layers`` ("all", "alternate" or indices) are MoE layers of
    ``num_experts`` copies of the dense FFN; ``moe_options`` are further MoEConfig fields.

    Example:
        >>> from moekit.model.config import ModelConfig
        >>> cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32)
        >>> dense = MoETransformer.build(cfg)
        >>> moe = upcycle(dense, num_experts=4, top_k=2)
        >>> x = torch.randint(0, 64, (1, 8))
        >>> torch.allclose(moe.eval()(x).logits, dense.eval()(x).logits, atol=1e-5)
        True
    """
    cfg = model.cfg
    if cfg.moe is not None:
        raise ValueError("upcycle: the model is already an MoE (model.moe is set); upcycle a dense model")
    if router_init not in ROUTER_INITS:
        raise ValueError(f"upcycle: router_init={router_init!r} is not one of {ROUTER_INITS}")
    if isinstance(top_k, int) and top_k == 1:
        raise ValueError("upcycle: top_k=1 scales each expert by its router probability, so the copy is not "
                         "the dense function; use top_k >= 2")
    moe = MoEConfig(d_model=cfg.d_model, d_ff=cfg.d_ff, num_experts=num_experts, top_k=top_k, **moe_options)
    if moe.router == "expert_choice" or moe.capacity_factor is not None or not moe.normalize_topk \
            or moe.num_shared_experts or moe.activation != "swiglu":
        raise ValueError("upcycle: copies preserve the dense function with a token-choice router, "
                         "renormalised top-k, no capacity, no shared experts and SwiGLU experts")
    new = MoETransformer.build(dataclasses.replace(cfg, moe=moe, moe_layers=layers))
    src = model.state_dict()
    with torch.no_grad():
        for name, t in new.state_dict().items():
            if name in src:
                t.copy_(src[name])
        gen = torch.Generator().manual_seed(seed)
        for i, layer in new.moe_layers().items():
            ffn = model.blocks[i].ffn
            ex = layer.experts
            ex.w_gate_EDF.copy_(ffn.w_gate.weight.t().expand_as(ex.w_gate_EDF))   # [F, D] -> [E, D, F]
            ex.w_up_EDF.copy_(ffn.w_up.weight.t().expand_as(ex.w_up_EDF))
            ex.w_down_EFD.copy_(ffn.w_down.weight.t().expand_as(ex.w_down_EFD))   # [D, F] -> [E, F, D]
            w = layer.router.weight_ED
            w.copy_(torch.zeros_like(w) if router_init == "zeros"
                    else torch.randn(w.shape, generator=gen) * router_std)
            if getattr(layer.router, "noise_ED", None) is not None:
                nn.init.zeros_(layer.router.noise_ED)
    return new
