"""Routing telemetry: what every MoE layer's router did over a logging interval.

Per layer and interval: tokens per expert, load CV, max/mean load, mean per-token router
entropy, entropy of the load distribution, dead experts, dropped fraction, router logit
mean/std/max, z-loss, aux loss, the aux-loss-free bias, and the experts each token got: their
mean (``experts_per_token``), the share of tokens with 0, 1, ..., max_k of them (``k_hist``)
and, with a dynamic number of experts, the budget controller's knob (``k_control``: p, the
null logit bias or the L1 coefficient) and the relu L1 penalty. Accumulated as tensors on the
device (no host sync per step); one sync per interval in :meth:`RoutingTelemetry.flush`.

Collapse warning: one expert above ``collapse_share`` of a layer's assignments for
``patience`` intervals in a row, or at least ``dead_fraction`` of its experts dead.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import Tensor

from moekit.moe.layer import MoEAux, MoELayer
from moekit.moe.stats import load_cv

REMEDIES = ("raise train.aux_loss_coef (e.g. 1.7e-3 -> 0.01), keep the z-loss on (train.z_loss_coef 1e-3), "
            "add router jitter (model.moe.jitter_eps=0.01), or cap load with model.moe.capacity_factor=1.25")


class RoutingTelemetry:
    def __init__(self, layers: dict[int, MoELayer], collapse_share: float = 0.5, patience: int = 3,
                 dead_fraction: float = 0.25, all_reduce: Callable[..., None] | None = None, world: int = 1):
        """``all_reduce(tensor, op=...)`` and ``world``: in a parallel run, every rank's
        statistics are combined in ``flush`` (collective: all ranks call it) into totals over
        all ranks' tokens (counts summed, averages averaged, maxima maxed)."""
        self.layers = layers
        self.all_reduce, self.world = all_reduce, world
        self.collapse_share, self.patience, self.dead_fraction = collapse_share, patience, dead_fraction
        self.streak: dict[int, int] = defaultdict(int)
        self._reset()

    def _reset(self) -> None:
        self.acc: dict[int, dict[str, Tensor]] = {}
        self.n = 0

    @torch.no_grad()
    def update(self, moe: dict[int, MoEAux]) -> None:
        """Add one micro-batch's statistics (tensors only: no host sync)."""
        for i, a in moe.items():
            stats = {"counts": a.tokens_per_expert.float(), "entropy": a.router_entropy.float(),
                     "dropped": a.dropped_fraction.float().to(a.router_entropy.device),
                     "logit_mean": a.logit_mean, "logit_var": a.logit_std.square() + a.logit_mean.square(),
                     "aux": a.load_balancing_loss.detach(), "z": a.z_loss.detach(),
                     "k_hist": a.experts_per_token.float(), "sparsity": a.sparsity_loss.detach()}
            acc = self.acc.get(i)
            if acc is None:
                self.acc[i] = {**stats, "logit_max": a.logit_max.clone()}
            else:
                for k, v in stats.items():
                    acc[k] = acc[k] + v
                acc["logit_max"] = torch.maximum(acc["logit_max"], a.logit_max)
        self.n += 1

    def flush(self) -> tuple[dict[str, float], dict[int, list[float]], list[str]]:
        """(scalar metrics, tokens per expert per layer, collapse warnings) for the interval."""
        metrics, loads, warnings = {}, {}, []
        if self.n == 0:
            return metrics, loads, warnings
        if self.all_reduce is not None and self.world > 1:
            self._reduce_over_ranks()
        for i, acc in sorted(self.acc.items()):
            host = {k: v.tolist() for k, v in acc.items()}          # the interval's one sync
            counts = host["counts"]
            total = sum(counts) or 1.0
            mean = total / len(counts)
            share = [c / total for c in counts]
            n = self.n
            logit_mean = host["logit_mean"] / n
            p = f"moe/layer{i}/"
            metrics.update({
                p + "load_cv": _cv(counts),
                p + "max_load": max(counts) / mean if mean else 0.0,
                p + "token_entropy": host["entropy"] / n,
                p + "load_entropy": -sum(s * math.log(s) for s in share if s > 0),
                p + "dead_experts": float(sum(c == 0 for c in counts)),
                p + "dropped_fraction": host["dropped"] / n,
                p + "logit_mean": logit_mean,
                p + "logit_std": math.sqrt(max(0.0, host["logit_var"] / n - logit_mean ** 2)),
                p + "logit_max": host["logit_max"],
                p + "aux_loss": host["aux"] / n,
                p + "z_loss": host["z"] / n,
            })
            metrics.update(_k_metrics(p, host["k_hist"], self.layers[i]))
            if host["sparsity"]:
                metrics[p + "sparsity_loss"] = host["sparsity"] / n
            router = self.layers[i].router
            if getattr(router, "aux_loss_free", False):
                bias = router.expert_bias_E.tolist()
                metrics[p + "bias_abs_max"] = max(abs(b) for b in bias)
                metrics[p + "bias_mean"] = sum(bias) / len(bias)
            loads[i] = counts
            warnings += self._check_collapse(i, share, counts)
        self._reset()
        return metrics, loads, warnings

    @torch.no_grad()
    def _reduce_over_ranks(self) -> None:
        """Two all-reduces for all layers: sums (counts summed, per-micro-batch averages averaged
        over ranks) and maxima."""
        import torch.distributed as dist
        keys = sorted(self.acc)
        sums = [self.acc[i][k].reshape(-1).float() for i in keys for k in self._SUMMED]
        flat = torch.cat(sums)
        maxes = torch.stack([self.acc[i]["logit_max"].float() for i in keys])
        self.all_reduce(flat, op=dist.ReduceOp.SUM)
        self.all_reduce(maxes, op=dist.ReduceOp.MAX)
        offset = 0
        for i in keys:
            for k in self._SUMMED:
                n = self.acc[i][k].numel()
                part = flat[offset:offset + n].view_as(self.acc[i][k])
                self.acc[i][k] = part if k in ("counts", "k_hist") else part / self.world
                offset += n
        for j, i in enumerate(keys):
            self.acc[i]["logit_max"] = maxes[j]

    _SUMMED = ("counts", "entropy", "dropped", "logit_mean", "logit_var", "aux", "z", "k_hist", "sparsity")

    def _check_collapse(self, layer: int, share: list[float], counts: list[float]) -> list[str]:
        top = max(range(len(share)), key=share.__getitem__)
        self.streak[layer] = self.streak[layer] + 1 if share[top] > self.collapse_share else 0
        out = []
        if self.streak[layer] >= self.patience:
            out.append(f"routing collapse in layer {layer}: expert {top} took {share[top]:.0%} of "
                       f"assignments for {self.streak[layer]} intervals; remedies: {REMEDIES}")
        dead = [e for e, c in enumerate(counts) if c == 0]
        if len(dead) >= max(1, math.ceil(self.dead_fraction * len(counts))):
            out.append(f"{len(dead)} dead experts in layer {layer} (no tokens this interval): {dead}; "
                       f"remedies: {REMEDIES}")
        return out


def _k_metrics(p: str, hist: list[float], layer: MoELayer) -> dict:
    """Mean experts per token, the share of tokens per number of experts, the controller's knob."""
    tokens = sum(hist) or 1.0
    out = {p + "experts_per_token": sum(j * h for j, h in enumerate(hist)) / tokens,
           p + "k_hist": [h / tokens for h in hist]}
    if layer.cfg.dynamic:
        out[p + "k_control"] = float(layer.router.k_control)
    return out


def _cv(counts: list[float]) -> float:
    return float(load_cv(torch.tensor(counts)))


def routing_summary(loads: dict[int, list[float]]) -> str:
    """The end-of-training table: most/least loaded experts, CV, dead experts per layer."""
    lines = ["routing summary (last interval):", f"{'layer':>5} {'most loaded':>16} {'least loaded':>16} "
             f"{'CV':>6} {'dead':>5}"]
    for i, counts in sorted(loads.items()):
        total = sum(counts) or 1.0
        cv = _cv(counts)
        hi = max(range(len(counts)), key=counts.__getitem__)
        lo = min(range(len(counts)), key=counts.__getitem__)
        most, least = f"e{hi} {counts[hi] / total:.1%}", f"e{lo} {counts[lo] / total:.1%}"
        lines.append(f"{i:>5} {most:>16} {least:>16} {cv:6.2f} {sum(c == 0 for c in counts):>5}")
    return "\n".join(lines)
