"""What a fine-tuning run trains: freezing (whole groups, or ESFT's task experts) and LoRA.

Applied to the model once its starting weights are in (moekit.train.run), before the
optimizer is built, the same way on a new run and on a resume (a resume reads ESFT's choice
from config.json, so it trains the same experts).

ESFT freezes expert *rows* of the stacked [E, ...] expert tensors: a gradient hook zeroes
the other experts' rows (so they add nothing to the clipped gradient norm or to AdamW's
moments) and an optimizer hook puts their values back after each step (AdamW's weight decay
moves every row of a tensor), so a frozen expert stays bit-equal to its start.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from moekit.config import FinetuneConfig
from moekit.model.routing import frequency_class, routing_breakdown
from moekit.transform.lora import add_lora

log = logging.getLogger("moekit")


def choose_esft_experts(model, split, share: float, batch_size: int = 16, max_examples: int = 2048) -> dict:
    """{MoE layer: [experts]}: per layer the fewest experts, most used first, whose shares of
    the task's routed tokens (training examples, padding excluded) add up to >= ``share``."""
    freq = frequency_class(split, model.cfg.vocab_size)
    by_tag, _ = routing_breakdown(model, split, freq, batch_size=batch_size, max_windows=max_examples)
    chosen = {}
    for layer, counts in by_tag.counts.items():
        load = counts.sum(0).astype(np.float64)
        order = np.argsort(-load, kind="stable")
        cum = np.cumsum(load[order]) / max(load.sum(), 1.0)
        n = int(np.searchsorted(cum, share - 1e-12)) + 1
        chosen[int(layer)] = sorted(int(e) for e in order[:n])
    if not chosen:
        raise ValueError("finetune.freeze='esft' needs a model with token-choice MoE layers; this one has "
                         "none (dense, or expert choice); use freeze='none', or LoRA (finetune.lora_rank)")
    return chosen


def apply(model, cfg: FinetuneConfig) -> list:
    """Freeze / add LoRA as ``cfg`` says; returns the optimizer hooks to register
    ((pre, post) pairs, see :func:`register`)."""
    if cfg.lora_rank is not None:
        info = add_lora(model, cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets))
        for name, p in model.named_parameters():
            if _group(name) in cfg.lora_also:
                p.requires_grad_(True)
        params = list(model.parameters())        # a tied weight once
        trainable = sum(p.numel() for p in params if p.requires_grad)
        also = trainable - info["lora_params"]
        where = ", ".join(f"{t} ({n})" for t, n in info["targets"].items() if n)
        beside = f" + {also:,} of {', '.join(cfg.lora_also)} in full" if cfg.lora_also else ""
        log.info("LoRA rank %d on %s: %d adapted tensors; trainable: %s adapter parameters%s = %s of %s",
                 cfg.lora_rank, where, info["adapted"], f"{info['lora_params']:,}", beside, f"{trainable:,}",
                 f"{sum(p.numel() for p in params):,}")
        return []
    if cfg.freeze == "none":
        return []
    layers = model.moe_layers()
    if not layers:
        raise ValueError(f"finetune.freeze={cfg.freeze!r} needs MoE layers; the model is dense: use "
                         "freeze='none', or LoRA (finetune.lora_rank)")
    moe_params = {id(p) for layer in layers.values() for p in layer.parameters()}
    hooks = []
    for name, p in model.named_parameters():
        in_moe = id(p) in moe_params
        if cfg.freeze == "router":
            frozen = ".router." in name
        elif cfg.freeze == "moe":
            frozen = in_moe
        elif cfg.freeze == "non_expert":
            frozen = not in_moe
        else:                   # esft: only the chosen experts' rows train
            frozen = True
        p.requires_grad_(not frozen)
    if cfg.freeze == "esft":
        hooks = _esft(layers, cfg.esft_experts)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"finetune.freeze={cfg.freeze!r} leaves nothing to train; choose another freeze")
    return hooks


def _group(name: str) -> str | None:
    """The finetune.lora_also group a parameter belongs to, if any."""
    if name.startswith(("embed.", "lm_head.")):
        return "embeddings"
    if name.endswith("norm.weight") and "parametrizations" not in name:
        return "norms"
    if ".router." in name:
        return "routers"
    return None


def _esft(layers: dict, chosen: dict | None) -> list:
    if chosen is None:
        raise ValueError("finetune.freeze='esft': no experts chosen (finetune.esft_experts); moekit finetune "
                         "chooses them from the task's routing when the run starts")
    unknown = sorted(set(chosen) - set(layers))
    if unknown:
        raise ValueError(f"finetune.esft_experts names layer {unknown[0]}, which is not an MoE layer; the "
                         f"MoE layers are {sorted(layers)}")
    hooks = []
    for i, layer in layers.items():
        experts = chosen.get(int(i), [])
        bad = [e for e in experts if not 0 <= e < layer.cfg.num_experts]
        if bad:
            raise ValueError(f"finetune.esft_experts[{i}] has expert {bad[0]}; layer {i} has experts 0.."
                             f"{layer.cfg.num_experts - 1}")
        if not experts:
            continue
        E = layer.cfg.num_experts
        keep = torch.zeros(E, dtype=torch.bool)
        keep[experts] = True
        for p in layer.experts.parameters():
            p.requires_grad_(True)
            mask = keep.to(p.device).view(E, *([1] * (p.ndim - 1))).to(p.dtype)
            p.register_hook(lambda g, m=mask: g * m)
            hooks.append((p, ~keep.to(p.device)))
    return hooks


def register(optimizer, hooks: list) -> None:
    """Keep the frozen expert rows bit-equal across each optimizer step."""
    if not hooks:
        return
    saved: list = []

    def pre(opt, args, kwargs):
        saved[:] = [p.detach()[frozen].clone() for p, frozen in hooks]

    def post(opt, args, kwargs):
        with torch.no_grad():
            for (p, frozen), rows in zip(hooks, saved):
                p[frozen] = rows
    optimizer.register_step_pre_hook(pre)
    optimizer.register_step_post_hook(post)
