"""Calibration for expert pruning and merging: run a few token batches through the model and
collect, per MoE layer, how many tokens each expert took, its mean router probability, and a
sample of the layer's inputs (for reconstruction errors and expert-output similarity).

    calib = calibrate(model, batches, max_tokens=4096)     # {MoE layer: LayerCalibration}
    usage = expert_usage(model, batches)                   # {MoE layer: tokens_E}

Shape legend: B batch, S sequence, T tokens, D model dim, E experts.

Everything runs in eval mode (no noise, jitter or dropout) under no_grad; the model's mode is
restored afterwards and the model is not changed. The token sample is drawn with a fixed seed,
the same positions in every layer.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.model.transformer import MoETransformer
from moekit.transform.extract import fewest_experts, with_experts

SEED = 0


@dataclass
class LayerCalibration:
    """One MoE layer on the calibration batches."""

    tokens_E: Tensor          # [E] token->expert assignments (int64)
    mean_prob_E: Tensor       # [E] the router's probability per expert, averaged over tokens (float32)
    x_TD: Tensor | None       # [T, D] a sample of the layer's inputs (None when max_tokens = 0)

    def order(self) -> list[int]:
        """The experts most used first: by tokens, then mean probability, then the lower index."""
        E = self.tokens_E.numel()
        return sorted(range(E), key=lambda e: (-int(self.tokens_E[e]), -float(self.mean_prob_E[e]), e))


def check_target(model, num_experts, verb: str) -> None:
    """Refuse what pruning or merging to ``num_experts`` experts per layer cannot do: one line."""
    moe = getattr(model.cfg, "moe", None)
    if moe is None:
        raise ValueError(f"{verb}: the model is dense; it has no experts to {verb.split('_')[0]}")
    if model.cfg.quant is not None:
        raise ValueError(f"{verb}: the model is quantized (model.quant={model.cfg.quant}); compress the "
                         "full-precision model first, then quantize the result")
    if moe.router == "expert_choice":
        raise ValueError(f"{verb}: model.moe.router='expert_choice' is not supported (each expert's "
                         "capacity depends on the expert count); use a token-choice model")
    if model.cfg.routes_by_tag:
        raise ValueError(f"{verb}: model.moe.router_input={moe.router_input!r} routes by tag, which is not "
                         "supported yet; use a token-routed model (or moekit extract for one tag)")
    E, (K, why) = moe.num_experts, fewest_experts(moe)
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts >= E:
        raise ValueError(f"{verb}: num_experts={num_experts!r} must be an integer fewer than the model's "
                         f"{E} experts; pick one in [{K}, {E - 1}]")
    if num_experts < K:
        raise ValueError(f"{verb}: num_experts={num_experts} is below {why}; pick one in [{K}, {E - 1}]")


def check_batches(batches, verb: str) -> None:
    if not isinstance(batches, (list, tuple)) or not batches:
        raise ValueError(f"{verb}: no calibration batches; pass a non-empty list of token tensors [B, S]")
    for x in batches:
        if not isinstance(x, Tensor) or x.dim() != 2 or x.dtype.is_floating_point or x.numel() == 0:
            raise ValueError(f"{verb}: a calibration batch is {getattr(x, 'dtype', type(x).__name__)} of "
                             f"shape {tuple(getattr(x, 'shape', ()))}; pass non-empty LongTensors [B, S]")


@torch.no_grad()
def calibrate(model, batches: list[Tensor], max_tokens: int = 0) -> dict[int, LayerCalibration]:
    """{MoE layer: :class:`LayerCalibration`} over ``batches`` (tokens [B, S]); ``x_TD`` holds at
    most ``max_tokens`` of each layer's inputs, an equal seeded share of every batch's tokens.

    Example:
        >>> calib = calibrate(model, [torch.randint(0, 97, (2, 16))], max_tokens=8)  # doctest: +SKIP
        >>> calib[0].tokens_E.sum() == 2 * 16 * model.cfg.moe.top_k, calib[0].x_TD.shape  # doctest: +SKIP
        (True, torch.Size([8, 32]))
    """
    check_batches(batches, "calibrate")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise ValueError(f"calibrate: max_tokens={max_tokens!r} must be an integer >= 0; use e.g. 4096")
    layers = model.moe_layers()
    device = model.embed.weight.device
    share = math.ceil(max_tokens / len(batches)) if max_tokens else 0
    gen = torch.Generator().manual_seed(SEED)
    xs: dict[int, list[Tensor]] = {i: [] for i in layers}
    probs: dict[int, Tensor] = {}
    tokens: dict[int, Tensor] = {}
    pick: list[Tensor | None] = [None]      # this batch's sampled token positions

    def take_input(i):
        def hook(_module, args):
            if share:
                xs[i].append(args[0].reshape(-1, args[0].shape[-1])[pick[0].to(args[0].device)].cpu())
        return hook

    def take_probs(i):
        def hook(_module, _args, routing):
            probs[i] = probs.get(i, 0) + routing.probs_TE.sum(0).cpu()
        return hook

    handles = [layer.register_forward_pre_hook(take_input(i)) for i, layer in layers.items()]
    handles += [layer.router.register_forward_hook(take_probs(i)) for i, layer in layers.items()]
    was = model.training
    model.eval()
    try:
        for x_BS in batches:
            T = x_BS.numel()
            pick[0] = torch.randperm(T, generator=gen)[:share].sort().values
            out = model(x_BS.to(device))
            for i, aux in out.moe.items():
                tokens[i] = tokens.get(i, 0) + aux.tokens_per_expert.cpu()
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    total = sum(x.numel() for x in batches)
    return {i: LayerCalibration(tokens_E=tokens[i].long(), mean_prob_E=(probs[i] / total).float(),
                                x_TD=torch.cat(xs[i])[:max_tokens] if share else None) for i in layers}


def expert_usage(model, batches: list[Tensor]) -> dict[int, Tensor]:
    """{MoE layer: tokens routed to each expert [E]} over ``batches`` (tokens [B, S])."""
    return {i: c.tokens_E for i, c in calibrate(model, batches).items()}


def layer_inputs(model, batches: list[Tensor], max_tokens: int) -> dict[int, Tensor]:
    """{MoE layer: a seeded sample of at most ``max_tokens`` of its inputs x_TD [T, D]}."""
    if max_tokens == 0:
        raise ValueError(f"layer_inputs: max_tokens={max_tokens!r} must be a positive integer; use e.g. 4096")
    return {i: c.x_TD for i, c in calibrate(model, batches, max_tokens).items()}


def build_like(model, num_experts: int, state: dict[str, Tensor]) -> MoETransformer:
    """A new model of ``model``'s config with ``num_experts`` experts per MoE layer (a dynamic
    number of experts per token keeps its bounds inside them: :func:`moekit.transform.extract.
    with_experts`), holding ``state``, in ``model``'s device and mode."""
    cfg = dataclasses.replace(model.cfg, moe=with_experts(model.cfg.moe, num_experts))
    new = MoETransformer.build(cfg, device=model.embed.weight.device)
    new.load_state_dict(state)
    return new.train(model.training)


__all__ = ["LayerCalibration", "build_like", "calibrate", "check_batches", "check_target",
           "expert_usage", "layer_inputs"]
