"""A data mixture: several sources, each with a sampling weight and a tag (``data.mixture``).

    [[data.mixture]]
    source = "parlspeech:de"      # a catalog corpus, one tag of it ("corpus:tag"), a path to your
    weight = 2.0                  # text / directory / JSONL, or "task:NAME" (a fine-tuning task's
    tag = "de"                    # training examples as text); the tag defaults to the source

Every source is tokenized into its own cache (``RUN/data/mix-<i>``), split into train and
validation by document as a corpus is. Training batches draw each sequence's source with
probability proportional to its weight (seeded by the step, so a resume draws the same),
and take that source's windows in a seeded order, epoch after epoch. Validation: the
windows of every source's validation split (``loss/val``), and each source's own
(``loss/val/<tag>``, in metrics and the report). A window's tag is its source's: reports
break routing down by source. Sources are split independently, each by its own document
order: two sources that hold the same documents (``parlspeech`` and ``parlspeech:en``) can
put one document on both sides; give sources that do not overlap.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moekit.data.catalog import Document, load_documents
from moekit.data.stream import PackedSplit, build_token_cache, is_val_doc
from moekit.data.tasks import load_task


def check_mixture(mixture) -> list[dict]:
    """The mixture's entries with their defaults (weight 1, tag = source), or one error line."""
    fix = 'give a list of tables, e.g. [{source = "parlspeech:de", weight = 1}, {source = "news-en"}]'
    if not isinstance(mixture, list) or len(mixture) < 2:
        raise ValueError(f"data.mixture={mixture!r}: must list at least 2 sources; {fix}")
    out = []
    for i, entry in enumerate(mixture):
        source = entry.get("source") if isinstance(entry, dict) else None
        if not isinstance(source, str) or not source.strip():
            raise ValueError(f"data.mixture[{i}]={entry!r}: needs a source; {fix}")
        unknown = sorted(set(entry) - {"source", "weight", "tag"})
        if unknown:
            raise ValueError(f"data.mixture[{i}]: unknown key {unknown[0]!r}; the keys are source, weight, "
                             "tag")
        weight = entry.get("weight", 1.0)
        if (isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < 1e12):
            raise ValueError(f"data.mixture[{i}].weight={weight!r}: must be a finite number > 0 (and "
                             "< 1e12); use e.g. 1.0")
        tag = entry.get("tag", _default_tag(source))
        if not isinstance(tag, str) or not tag.strip():
            raise ValueError(f"data.mixture[{i}].tag={tag!r}: must be a non-empty name; use e.g. \"de\", or "
                             "leave it out for the source's name")
        out.append({"source": source, "weight": float(weight), "tag": tag})
    tags = [e["tag"] for e in out]
    if len(set(tags)) != len(tags):
        dup = next(t for t in tags if tags.count(t) > 1)
        raise ValueError(f"data.mixture: the tag {dup!r} is given twice; give every source its own tag")
    return out


def _default_tag(source: str) -> str:
    """A source's tag when none is given: a file's stem ("speeches" for data/speeches.jsonl), a
    corpus tag's name ("de" for parlspeech:de), else the source itself."""
    if source.startswith("task:"):
        return Path(source[5:]).stem
    name, _, only = source.partition(":")
    if only and not Path(source).exists():
        return only
    return Path(source).stem if (os.sep in source or Path(source).suffix) else source


def source_documents(source: str, tag: str, text_column: str = "text") -> list[Document]:
    """One mixture source's documents, all tagged ``tag`` (``text_column``: a Parquet or JSONL
    source's text column, data.text_column)."""
    if source.startswith("task:"):
        task = load_task(source[len("task:"):])
        return [Document(e.prompt + e.completion, tag) for e in task.splits["train"]]
    return [Document(d.text, tag) for d in load_documents(source, text_column)]


@dataclass
class MixtureSplit:
    """The sources' splits side by side: window index = (source, window) in concatenation order."""

    parts: list[PackedSplit]
    names: list[str]            # the sources' tags
    weights: list[float]

    def __post_init__(self) -> None:
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])])
        self.tags = list(self.names)
        self.seq_len = self.parts[0].seq_len

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, i: int) -> tuple[int, int]:
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return s, i - int(self.offsets[s])

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = [self.locate(i) for i in indices]
        xs, ys = zip(*((self.parts[s].batch([w])[:2]) for s, w in rows))
        return torch.cat(xs), torch.cat(ys), torch.tensor([s for s, _ in rows])

    def spread(self, n: int) -> list[int]:
        """n window indices taken from the sources in turn (a report's sample of every source)."""
        out, k = [], 0
        while len(out) < min(n, len(self)):
            s, w = k % len(self.parts), k // len(self.parts)
            if w < len(self.parts[s]):
                out.append(int(self.offsets[s]) + w)
            k += 1
        return out

    def token_tags(self, indices: list[int]) -> np.ndarray:
        return np.repeat([self.locate(i)[0] for i in indices], self.seq_len)

    @property
    def tokens(self) -> np.ndarray:
        return np.concatenate([np.asarray(p.tokens) for p in self.parts])

    @classmethod
    def open(cls, data_dir: Path, split: str, seq_len: int) -> MixtureSplit:
        """The split of a mixture prepared by :func:`build_mixture`."""
        meta = json.loads((Path(data_dir) / "mixture.json").read_text())
        parts = [PackedSplit.open(Path(data_dir) / f"mix-{i}", split, seq_len)
                 for i in range(len(meta["sources"]))]
        return cls(parts, [s["tag"] for s in meta["sources"]], [s["weight"] for s in meta["sources"]])

    def sampler(self, batch_size: int, seed: int, rank: int, world: int) -> WeightedSampler:
        return WeightedSampler(self, batch_size, seed, rank, world)


class WeightedSampler:
    """Global batch g: each of its B x W sequences picks a source with probability ∝ weight
    (a generator seeded by (seed, g)), then that source's next window in its seeded epoch
    order; rank r takes its B of them. State: the step and every source's position."""

    def __init__(self, split: MixtureSplit, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        for name, part in zip(split.names, split.parts):
            if len(part) == 0:
                raise ValueError(f"data.mixture source {name!r} has no whole training window; give it more "
                                 "text or a shorter seq_len")
        self.split, self.batch_size, self.seed, self.rank, self.world = split, batch_size, seed, rank, world
        w = torch.tensor(split.weights, dtype=torch.float64)
        self.probs = w / w.sum()
        self.step, self.positions = 0, [0] * len(split.parts)
        self._orders: dict[tuple[int, int], list[int]] = {}

    def _window(self, s: int, k: int) -> int:
        """Source s's k-th window: position k % n of its epoch k // n's seeded permutation."""
        n = len(self.split.parts[s])
        key = (s, k // n)
        if key not in self._orders:
            if len(self._orders) > 4 * len(self.split.parts):
                self._orders.clear()
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * s + k // n)
            self._orders[key] = torch.randperm(n, generator=g).tolist()
        return self._orders[key][k % n] + int(self.split.offsets[s])

    def next(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        sources = torch.multinomial(self.probs, self.batch_size * self.world, replacement=True, generator=g)
        picks = []
        for s in sources.tolist():
            picks.append(self._window(s, self.positions[s]))
            self.positions[s] += 1
        self.step += 1
        return picks[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict:
        return {"step": self.step, "positions": list(self.positions)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.positions = int(state["step"]), [int(p) for p in state["positions"]]


def build_mixture(entries: list[dict], docs: list[list[Document]], tok, data_dir: Path, val_fraction: float,
                  seq_len: int):
    """(train MixtureSplit, val MixtureSplit, meta) with one token cache per source."""
    trains, vals, meta = [], [], {"sources": [], "train_tokens": 0}
    for i, (entry, d) in enumerate(zip(entries, docs)):
        cache = data_dir / f"mix-{i}"
        m = build_token_cache(d, tok, cache, val_fraction)
        trains.append(PackedSplit.open(cache, "train", seq_len))
        vals.append(PackedSplit.open(cache, "val", seq_len))
        if len(vals[-1]) == 0:
            raise ValueError(f"data.mixture source {entry['source']!r}: its validation split has no whole "
                             f"window of seq_len+1={seq_len + 1} tokens; give it more text")
        meta["sources"].append({**entry, "train_tokens": m["train_tokens"], "val_tokens": m["val_tokens"]})
        meta["train_tokens"] += m["train_tokens"]
    names, weights = [e["tag"] for e in entries], [e["weight"] for e in entries]
    meta["tags"] = names
    tmp = data_dir / "mixture.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(data_dir / "mixture.json")
    return MixtureSplit(trains, names, weights), MixtureSplit(vals, names, weights), meta


def training_texts(entries_docs: list[list[Document]], val_fraction: float):
    """The texts a mixture's tokenizer is trained on: every source's training documents."""
    for docs in entries_docs:
        for i, d in enumerate(docs):
            if not is_val_doc(i, val_fraction):
                yield d.text
