"""Routing of a trained run broken down by document tag (language, source) and by token
frequency class, with the mutual information between expert choice and the breakdown.

Shape legend: B batch, S sequence, E experts, K top-k, C classes (tags or frequency classes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    split (moekit.finetune.data.TaskSplit) gives its own, -1 on padding."""
    if hasattr(split, "token_tags"):
        return split.token_tags(indices)
    S = split.seq_len
    pos_BS = np.asarray(indices, dtype=np.int64)[:, None] * S + np.arange(S)
    doc_BS = np.searchsorted(split.doc_starts, pos_BS, side="right") - 1
    return np.asarray(split.doc_tags, dtype=np.int64)[doc_BS].reshape(-1)


@torch.no_grad()
def routing_breakdown(model, split: PackedSplit, freq_class_V: np.ndarray, batch_size: int = 16,
                      max_windows: int | None = 512) -> tuple[RoutingBreakdown, RoutingBreakdown]:
    """(by tag, by frequency class) over the split's windows, from the routers' choices."""
    layers = {i: b.ffn for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoELayer)}
    n_tags = len(split.tags)
    by_tag = {i: np.zeros((n_tags, m.cfg.num_experts), dtype=np.int64) for i, m in layers.items()}
    by_freq = {i: np.zeros((len(FREQ_CLASSES), m.cfg.num_experts), dtype=np.int64) for i, m in layers.items()}
    captured: dict[int, torch.Tensor] = {}
    hooks = [layer.router.register_forward_hook(
        lambda mod, inp, out, i=i: captured.__setitem__(i, out.experts_TK)) for i, layer in layers.items()
        if layer.cfg.router != "expert_choice"]
    was_training = model.training
    model.eval()
    try:
        n = len(split) if max_windows is None else min(len(split), max_windows)
        order = split.spread(n) if hasattr(split, "spread") else list(range(n))   # a mixture: every source
        for start in range(0, n, batch_size):
            indices = order[start:start + batch_size]
            x_BS, _, tags_B = split.batch(indices)
            model(x_BS, **tag_kwargs(model.cfg, split.tags, tags_B))   # task-level routing: the tag
            tag_T = token_tags(split, indices)
            cls_T = freq_class_V[x_BS.reshape(-1).numpy()]
            real = tag_T >= 0                   # not padding
            for i, experts_TK in captured.items():
                e = experts_TK.cpu().numpy()[real]
                K = e.shape[1]
                np.add.at(by_tag[i], (np.repeat(tag_T[real], K), e.reshape(-1)), 1)
                np.add.at(by_freq[i], (np.repeat(cls_T[real], K), e.reshape(-1)), 1)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    keep = set(captured)
    return (RoutingBreakdown(list(split.tags), {i: c for i, c in by_tag.items() if i in keep}),
            RoutingBreakdown(list(FREQ_CLASSES), {i: c for i, c in by_freq.items() if i in keep}))
