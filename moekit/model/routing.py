"""Routing of a trained run broken down by document tag (language, source) and by token
frequency class, with the mutual information between expert choice and the breakdown and,
for a dynamic number of experts per token (``MoEConfig.dynamic_k``), the mean number of
experts each class's tokens get.

Shape legend: B batch, S sequence, E experts, K top-k (max_k slots with a dynamic router, a
slot the token does not use holding the id E), C classes (tags or frequency classes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from moekit.data.stream import PackedSplit
from moekit.model.transformer import tag_kwargs
from moekit.moe.layer import MoELayer

FREQ_CLASSES = ("top-100 tokens", "rank 101-1000", "rank > 1000")


@dataclass
class RoutingBreakdown:
    labels: list[str]                  # class names (tags or frequency classes)
    counts: dict[int, np.ndarray]      # layer -> [C, E] token->expert assignment counts
    # layer -> [C] real (non-padding) tokens routed, however many experts each got (0 included)
    tokens: dict[int, np.ndarray] = field(default_factory=dict)

    def experts_per_token(self) -> dict[int, dict[str, float]]:
        """{layer: {class label: mean number of experts per token of that class}}: the class's
        assignments over its tokens (top_k for every class of a fixed top-k router). A class
        with no tokens is left out; so is a layer without token counts."""
        return {i: {label: float(self.counts[i][c].sum() / n) for c, (label, n) in
                    enumerate(zip(self.labels, self.tokens[i].tolist())) if n > 0}
                for i in sorted(self.counts) if i in self.tokens}

    def overall_experts_per_token(self, layer: int) -> float:
        """The layer's mean number of experts per token over every class."""
        return float(self.counts[layer].sum() / max(self.tokens[layer].sum(), 1))

    def mutual_information(self, layer: int) -> float:
        """I(expert; class) in bits over the layer's assignments (0 = routing ignores the class)."""
        joint = self.counts[layer] / max(self.counts[layer].sum(), 1)
        pc, pe = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
        nz = joint > 0
        return max(0.0, float((joint[nz] * np.log2(joint[nz] / (pc @ pe)[nz])).sum()))   # >= 0 (rounding)

    def class_entropy(self, layer: int) -> float:
        """H(class) in bits: the upper bound of the mutual information."""
        p = self.counts[layer].sum(1) / max(self.counts[layer].sum(), 1)
        return float(-sum(x * math.log2(x) for x in p if x > 0)) + 0.0   # + 0.0: no "-0.000" for one class


def frequency_class(train: PackedSplit, vocab_size: int) -> np.ndarray:
    """[V] class index of every token id by its frequency rank in the training stream."""
    freq = np.bincount(np.asarray(train.tokens, dtype=np.int64), minlength=vocab_size)
    rank = np.empty(vocab_size, dtype=np.int64)
    rank[np.argsort(-freq, kind="stable")] = np.arange(vocab_size)
    return np.where(rank < 100, 0, np.where(rank < 1000, 1, 2))


def token_tags(split: PackedSplit, indices: list[int]) -> np.ndarray:
    """[B*S] tag index of every input token of windows ``indices`` (as ``split.batch`` gives
    them), each from its own document: a window can span documents of different tags. A task's
    split (moekit.data.task_split.TaskSplit) gives its own, -1 on padding."""
    if hasattr(split, "token_tags"):
        return split.token_tags(indices)
    S = split.seq_len
    pos_BS = np.asarray(indices, dtype=np.int64)[:, None] * S + np.arange(S)
    doc_BS = np.searchsorted(split.doc_starts, pos_BS, side="right") - 1
    return np.asarray(split.doc_tags, dtype=np.int64)[doc_BS].reshape(-1)


@torch.no_grad()
def routing_breakdown(model, split: PackedSplit, freq_class_V: np.ndarray, batch_size: int = 16,
                      max_windows: int | None = 512) -> tuple[RoutingBreakdown, RoutingBreakdown]:
    """(by tag, by frequency class) over the split's windows, from the token-choice routers'
    choices (before capacity drops); a dynamic router's unused slots (id E) are no expert. The
    windows go to the model's device (its first parameter's)."""
    layers = {i: b.ffn for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoELayer)
              and b.ffn.cfg.router != "expert_choice"}
    sizes = {"tag": len(split.tags), "freq": len(FREQ_CLASSES)}
    counts = {(name, i): np.zeros((C, m.cfg.num_experts), dtype=np.int64)
              for name, C in sizes.items() for i, m in layers.items()}
    tokens = {(name, i): np.zeros(C, dtype=np.int64) for name, C in sizes.items() for i in layers}
    captured: dict[int, torch.Tensor] = {}
    seen: set[int] = set()                      # the layers that routed a batch
    hooks = [layer.router.register_forward_hook(
        lambda mod, inp, out, i=i: captured.__setitem__(i, out.experts_TK)) for i, layer in layers.items()]
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        n = len(split) if max_windows is None else min(len(split), max_windows)
        order = split.spread(n) if hasattr(split, "spread") else list(range(n))   # a mixture: every source
        for start in range(0, n, batch_size):
            indices = order[start:start + batch_size]
            x_BS, _, tags_B = split.batch(indices)
            captured.clear()
            # the split's windows are CPU tensors; the model may be on a GPU
            model(x_BS.to(device), **tag_kwargs(model.cfg, split.tags, tags_B, device))   # tag routing
            tag_T = token_tags(split, indices)
            real = tag_T >= 0                   # not padding
            cls = {"tag": tag_T[real], "freq": freq_class_V[x_BS.reshape(-1).numpy()][real]}
            seen |= set(captured)
            for i, experts_TK in captured.items():
                E = layers[i].cfg.num_experts
                e_TK = experts_TK.cpu().numpy()[real]
                t, k = np.nonzero(e_TK < E)     # the slots holding an expert (not the id E)
                for name, cls_T in cls.items():
                    C = sizes[name]
                    counts[name, i] += np.bincount(cls_T[t] * E + e_TK[t, k], minlength=C * E).reshape(C, E)
                    tokens[name, i] += np.bincount(cls_T, minlength=C)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)

    def breakdown(name: str, labels: list[str]) -> RoutingBreakdown:
        return RoutingBreakdown(labels, {i: counts[name, i] for i in sorted(seen)},
                                {i: tokens[name, i] for i in sorted(seen)})
    return breakdown("tag", list(split.tags)), breakdown("freq", list(FREQ_CLASSES))
