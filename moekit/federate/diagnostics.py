"""Do experts with the same index mean the same on every client?

Each client runs the same seeded random probe (``PROBE_TOKENS`` vectors of width d_model,
no data in it) through every MoE layer's router and through each of its experts, and sends
the results with its round's weights (the ``probe/`` tensors, counted apart in the bytes).
The server compares clients pairwise, per layer:

    routing/layerL/top1_agreement   share of probe vectors both routers send to the same expert
    routing/layerL/load_cosine      cosine of the two clients' tokens-per-expert on their own data
    experts/layerL/same_index_cos   cosine of expert e's outputs on the probe, client a vs client b
    experts/layerL/other_index_cos  the same for expert e vs expert f != e (the baseline)
    experts/layerL/same_index_match share of experts whose closest expert on the other client
                                    has the same index

averaged over client pairs. With FedAvg every client starts a round from the same experts,
so these measure how far a round's local training moves them apart; with local experts they
show whether expert e of one client still does what expert e of another does.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

PROBE_TOKENS = 128
PROBE_PREFIX = "probe/"


def probe_inputs(d_model: int, seed: int, tokens: int = PROBE_TOKENS) -> Tensor:
    """The probe [tokens, d_model]: unit-variance Gaussian vectors, like a normalized hidden state."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, d_model, generator=g)


@torch.no_grad()
def probe(model, seed: int) -> dict[str, Tensor]:
    """{"probe/top1.L": each probe vector's first expert [P] (expert choice: the top logit),
    "probe/experts.L": each expert's outputs [E, P, D]} for every MoE layer."""
    out = {}
    x_PD = None
    for i, layer in sorted(model.moe_layers().items()):
        w = layer.router.weight_ED
        if x_PD is None:
            x_PD = probe_inputs(w.shape[1], seed).to(w.dtype)
        E, P = w.shape[0], x_PD.shape[0]
        routing = layer.router(x_PD)        # the expert it picks first (selection bias included)
        first = routing.experts_TK[:, 0] if routing.experts_TK is not None else routing.logits_TE.argmax(1)
        out[f"{PROBE_PREFIX}top1.{i}"] = first.to(torch.int64).contiguous()
        counts_E = torch.full((E,), P, dtype=torch.long)
        y = layer.experts(x_PD.repeat(E, 1), counts_E)
        out[f"{PROBE_PREFIX}experts.{i}"] = y.float().reshape(E, P, -1).contiguous()
    return out


def _cos_matrix(a_EX: Tensor, b_EX: Tensor) -> Tensor:
    a = torch.nn.functional.normalize(a_EX.double(), dim=1)
    b = torch.nn.functional.normalize(b_EX.double(), dim=1)
    return a @ b.t()


def pair_similarity(a: dict[str, Tensor], b: dict[str, Tensor], load_a: dict,
                    load_b: dict) -> dict[str, float]:
    """The per-layer similarities of two clients' probes and loads (see the module docstring)."""
    out = {}
    for key in a:
        if not key.startswith(f"{PROBE_PREFIX}top1."):
            continue
        i = key.rsplit(".", 1)[1]
        agree = a[key] == b[key]
        out[f"routing/layer{i}/top1_agreement"] = float(agree.double().mean())
        la, lb = (torch.tensor([float(c) for c in load[i]], dtype=torch.float64) for load in (load_a, load_b))
        if la.norm() > 0 and lb.norm() > 0:
            out[f"routing/layer{i}/load_cosine"] = float(la @ lb / (la.norm() * lb.norm()))
        ea, eb = a[f"{PROBE_PREFIX}experts.{i}"], b[f"{PROBE_PREFIX}experts.{i}"]
        C = _cos_matrix(ea.flatten(1), eb.flatten(1))                      # [E, E]
        E = C.shape[0]
        same = C.diagonal()
        out[f"experts/layer{i}/same_index_cos"] = float(same.mean())
        if E > 1:
            out[f"experts/layer{i}/other_index_cos"] = float((C.sum() - same.sum()) / (E * E - E))
        out[f"experts/layer{i}/same_index_match"] = float((C.argmax(1) == torch.arange(E)).double().mean())
    return out


def federation_similarity(probes: list[dict[str, Tensor]], loads: list[dict]) -> dict[str, float]:
    """:func:`pair_similarity` averaged over every pair of clients ({} with fewer than two)."""
    pairs = [pair_similarity(probes[x], probes[y], loads[x], loads[y])
             for x, y in itertools.combinations(range(len(probes)), 2)]
    if not pairs:
        return {}
    keys = sorted(set().union(*pairs))
    return {k: sum(p[k] for p in pairs if k in p) / sum(k in p for p in pairs) for k in keys}
