"""Token streams: tokenize once, cache as memory-mapped arrays, pack into sequences.

Shape legend: B batch, S sequence length.

The split is by document and deterministic: document i goes to validation when
``(i * 2654435761) % 1000 < 1000 * val_fraction`` (a fixed hash of its index, so the split
does not move when the seed does). Each split is one stream of tokens with an end-of-text
token after every document, cut into non-overlapping windows of S+1 tokens (inputs and
next-token targets). Each window keeps the tag (language, source) of the document its
first token comes from.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from moekit.data.document import Document
from moekit.data.tokenizer import eos_id


def is_val_doc(i: int, val_fraction: float) -> bool:
    """Whether document i belongs to the validation split (a fixed hash of its index)."""
    return (i * 2654435761) % 1000 < 1000 * val_fraction


ENCODE_CHARS = 1 << 20   # text tokenized per call (in characters): bounds the encodings held at once


def _batches(docs: Iterable[Document], max_chars: int) -> Iterator[list[Document]]:
    """``docs`` in order, cut into lists of about ``max_chars`` characters (a longer document alone)."""
    batch, size = [], 0
    for d in docs:
        batch.append(d)
        size += len(d.text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _cache_key(docs: Iterable[Document], tok: Tokenizer, val_fraction: float) -> tuple[str, list[str]]:
    """(the key of the cache of ``docs``: their tags and text and the tokenizer, their sorted tags)."""
    key, tags = hashlib.sha256(tok.to_str().encode()), set()
    for d in docs:
        key.update(d.tag.encode())
        key.update(d.text.encode())
        tags.add(d.tag)
    return f"{key.hexdigest()[:16]}-{val_fraction}", sorted(tags)


def build_token_cache(docs: Sequence[Document], tok: Tokenizer, out_dir: Path,
                      val_fraction: float = 0.05) -> dict:
    """Tokenize ``docs`` once into ``out_dir/{train,val}.bin`` (+ tags) and return the meta.

    The cache is keyed by the documents and the tokenizer: a second call with the same
    inputs reads the meta and returns without tokenizing. ``docs`` is read twice (the key,
    then the tokens), tokenized ``ENCODE_CHARS`` characters at a time, and the tokens are
    appended to the files as they come: a corpus read from disk on each pass (Parquet,
    moekit.data.parquet) is never held in memory, as text, encodings or tokens.
    """
    if not docs:
        raise ValueError("no documents to tokenize: the corpus is empty; point data at text")
    key, tags = _cache_key(docs, tok, val_fraction)
    meta_path = out_dir / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            return meta
    out_dir.mkdir(parents=True, exist_ok=True)
    eos = eos_id(tok)
    dtype = np.uint16 if tok.get_vocab_size() <= 65535 else np.uint32
    meta = {"key": key, "dtype": np.dtype(dtype).name, "vocab_size": tok.get_vocab_size(), "tags": tags,
            "val_fraction": val_fraction}
    tag_index = {t: j for j, t in enumerate(tags)}
    splits = ("train", "val")
    tmp = {split: out_dir / f"{split}.bin.tmp" for split in splits}
    n = dict.fromkeys(splits, 0)
    doc_starts = {split: [] for split in splits}
    doc_tags = {split: [] for split in splits}
    try:
        with open(tmp["train"], "wb") as f_train, open(tmp["val"], "wb") as f_val:
            files, i = {"train": f_train, "val": f_val}, 0
            for chunk in _batches(docs, ENCODE_CHARS):
                ids = {split: [] for split in splits}
                for doc, enc in zip(chunk, tok.encode_batch([d.text for d in chunk])):
                    split = "val" if is_val_doc(i, val_fraction) else "train"
                    i += 1
                    doc_starts[split].append(n[split])
                    doc_tags[split].append(tag_index[doc.tag])
                    ids[split].append(np.asarray(enc.ids + [eos], dtype=dtype))
                    n[split] += len(enc.ids) + 1
                for split in splits:
                    if ids[split]:
                        files[split].write(np.concatenate(ids[split]).tobytes())
    except BaseException as err:
        for path in tmp.values():
            path.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:    # a full disk: Python names no file
            raise OSError(err.errno, err.strerror or f"could not write the token cache ({err}); is the "
                          "disk full?", str(out_dir)) from None
        raise
    for split in splits:
        os.replace(tmp[split], out_dir / f"{split}.bin")
        np.save(out_dir / f"{split}_docs.npy", np.stack([np.asarray(doc_starts[split], dtype=np.int64),
                                                          np.asarray(doc_tags[split], dtype=np.int64)]))
        meta[f"{split}_tokens"] = int(n[split])
        meta[f"{split}_docs"] = len(doc_starts[split])
    tmp_meta = out_dir / "meta.json.tmp"
    tmp_meta.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_meta, meta_path)
    return meta


@dataclass
class PackedSplit:
    """Windows of S+1 tokens from one split's stream, read from a memory map."""

    tokens: np.ndarray           # memory-mapped [N]
    doc_starts: np.ndarray       # [num_docs]
    doc_tags: np.ndarray         # [num_docs] index into tags
    tags: list[str]
    seq_len: int

    @classmethod
    def open(cls, cache: Path, split: str, seq_len: int) -> PackedSplit:
        meta = json.loads((cache / "meta.json").read_text())
        path = cache / f"{split}.bin"
        # an empty split cannot be memory-mapped; callers check len() and explain
        tokens = (np.memmap(path, dtype=meta["dtype"], mode="r") if path.stat().st_size
                  else np.zeros(0, dtype=meta["dtype"]))
        starts, tags = np.load(cache / f"{split}_docs.npy")
        return cls(tokens, starts, tags, meta["tags"], seq_len)

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def window(self, i: int) -> tuple[np.ndarray, int]:
        """Tokens [S+1] of window i and the tag index of its first token's document."""
        start = i * self.seq_len
        doc = int(np.searchsorted(self.doc_starts, start, side="right")) - 1
        window = np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)
        return window, int(self.doc_tags[doc])

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs [B, S], targets [B, S], tags [B]) for window indices."""
        rows, tags = zip(*(self.window(i) for i in indices))
        data = torch.from_numpy(np.stack(rows))
        return data[:, :-1], data[:, 1:], torch.tensor(tags)


class BatchSampler:
    """Deterministic batches of window indices. Each epoch is one seeded permutation of the
    windows; global batch g is its slice [g*B*W, (g+1)*B*W), and rank r takes its B-window
    share of that. The position is saved as (epoch, windows consumed in the epoch), so a
    run resumed on a different number of ranks W continues where the epoch stood (the
    global batch B*W changes with W: B is per rank)."""

    def __init__(self, num_windows: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if num_windows < batch_size * world_size:
            raise ValueError(f"the training split has {num_windows} windows, fewer than batch_size="
                             f"{batch_size} x world_size={world_size}; use more text, a smaller "
                             "batch_size or a shorter seq_len")
        self.num_windows, self.batch_size, self.seed = num_windows, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = num_windows // self.global_batch
        self.epoch, self.step_in_epoch = 0, 0
        self._cached: tuple[int, list[int]] | None = None

    def _order(self, epoch: int) -> list[int]:
        if self._cached is None or self._cached[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cached = (epoch, torch.randperm(self.num_windows, generator=g).tolist())
        return self._cached[1]

    def next(self) -> list[int]:
        if self.step_in_epoch >= self.batches_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        start = self.step_in_epoch * self.global_batch + self.rank * self.batch_size
        self.step_in_epoch += 1
        return self._order(self.epoch)[start:start + self.batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "windows_done": self.step_in_epoch * self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.step_in_epoch = -(-int(state["windows_done"]) // self.global_batch)   # ceil: no repeats


# A tag's share of a run's splits (moekit extract: the sub-model's own data)

def _tag_part(split, tag: str):
    """(the PackedSplit holding ``tag``'s documents, the tag's index in its tags)."""
    if hasattr(split, "parts"):                 # a mixture: the tag's source
        part = split.parts[split.names.index(tag)]
        return part, part.tags.index(tag)
    return split, split.tags.index(tag)


def tag_split(split, tag: str):
    """(the PackedSplit holding ``tag``'s windows, their indices in it, the tag's index there):
    a mixture's source split, or a corpus split's windows whose first document has the tag
    (a window's tag, as training batches see it)."""
    part, t = _tag_part(split, tag)
    starts = np.arange(len(part), dtype=np.int64) * part.seq_len
    first_doc = np.searchsorted(np.asarray(part.doc_starts), starts, side="right") - 1
    windows = np.nonzero(np.asarray(part.doc_tags, dtype=np.int64)[first_doc] == t)[0]
    return part, [int(i) for i in windows], t


def split_tags(split) -> list[str]:
    """The tags of a run's split (a mixture's sources, a corpus's document tags)."""
    return list(split.names if hasattr(split, "parts") else split.tags)


def write_tag_data(train, val, tag: str, out_dir) -> None:
    """``out_dir``: a token cache (train and val) of ``tag``'s documents only, cut from the run's
    own splits (so its validation documents are the run's), which ``moekit eval`` reads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"key": f"extract-{tag}", "dtype": np.dtype(val.tokens.dtype).name, "tags": [tag]}
    for name, split in (("train", train), ("val", val)):
        part, t = _tag_part(split, tag)
        ends = np.append(np.asarray(part.doc_starts[1:], dtype=np.int64), len(part.tokens))
        docs = [(int(s), int(e)) for s, e, g in zip(part.doc_starts, ends, part.doc_tags) if g == t]
        tokens = (np.concatenate([np.asarray(part.tokens[s:e]) for s, e in docs]) if docs
                  else np.zeros(0, dtype=meta["dtype"]))
        starts = np.cumsum([0] + [e - s for s, e in docs[:-1]]) if docs else np.zeros(0, dtype=np.int64)
        tokens.astype(meta["dtype"]).tofile(out_dir / f"{name}.bin")
        np.save(out_dir / f"{name}_docs.npy", np.stack([np.asarray(starts, dtype=np.int64),
                                                        np.zeros(len(docs), dtype=np.int64)]))
        meta[f"{name}_tokens"], meta[f"{name}_docs"] = int(len(tokens)), len(docs)
    tmp = out_dir / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out_dir / "meta.json")
