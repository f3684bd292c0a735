"""A task's splits as token arrays a run trains and evaluates on (the interface of
:class:`moekit.data.stream.PackedSplit`: ``len``, ``batch``, ``tags``, ``tokens``).

Shape legend: B batch, S sequence (the batch's longest example, at most ``seq_len``).

An example is ``prompt + completion + EOS``, cut to ``seq_len + 1`` tokens by dropping the
prompt's first tokens (the completion is kept whole). A batch is right-padded with EOS:
attention is causal, so padding changes no real position. Targets are -100 on the prompt
and on padding, so the loss is on the completion and its EOS only.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moekit.data.tasks import SPLITS, Task
from moekit.data.tokenizer import eos_id

IGNORE = -100


@dataclass
class TaskSplit:
    tokens: np.ndarray          # every example's tokens, concatenated
    starts: np.ndarray          # [N + 1] offsets of the examples in tokens
    prompt_lens: np.ndarray     # [N]
    labels: np.ndarray          # [N] label index, -1 for a generation task
    tags: list[str]             # label names (or the task's name): what reports break routing down by
    label_ids: list[list[int]] | None   # each label's completion tokens (classification)
    seq_len: int
    pad_id: int

    @classmethod
    def open(cls, cache: Path, split: str, seq_len: int) -> TaskSplit:
        meta = json.loads((cache / "meta.json").read_text())
        arrays = np.load(cache / f"task-{split}.npz")
        return cls(arrays["tokens"], arrays["starts"], arrays["prompt_lens"], arrays["labels"], meta["tags"],
                   meta["label_ids"], seq_len, meta["pad_id"])

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def example(self, i: int) -> tuple[np.ndarray, int]:
        """(tokens of example i cut to seq_len + 1 from the left, its prompt's length after the cut)."""
        ids = self.tokens[self.starts[i]:self.starts[i + 1]]
        cut = max(0, len(ids) - (self.seq_len + 1))
        return ids[cut:], max(0, int(self.prompt_lens[i]) - cut)

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs [B, S], targets [B, S], tags [B]): targets only on the completions."""
        rows = [self.example(i) for i in indices]
        S = max(len(ids) for ids, _ in rows) - 1
        inputs = torch.full((len(rows), S), self.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), S), IGNORE, dtype=torch.long)
        for b, (ids, p) in enumerate(rows):
            t = torch.from_numpy(ids.astype(np.int64))
            inputs[b, :len(t) - 1] = t[:-1]
            targets[b, max(p - 1, 0):len(t) - 1] = t[max(p, 1):]
        tags = torch.tensor([max(int(self.labels[i]), 0) for i in indices])
        return inputs, targets, tags

    def token_tags(self, indices: list[int]) -> np.ndarray:
        """[B*S] tag of every input token of ``batch(indices)``, -1 on padding."""
        rows = [self.example(i) for i in indices]
        S = max(len(ids) for ids, _ in rows) - 1
        out = np.full((len(rows), S), -1, dtype=np.int64)
        for b, (ids, _) in enumerate(rows):
            out[b, :len(ids) - 1] = max(int(self.labels[indices[b]]), 0)
        return out.reshape(-1)


def build_task_cache(task: Task, tok, out_dir: Path) -> dict:
    """Tokenize the task's splits into ``out_dir/task-{split}.npz`` and write its meta.json."""
    for split in SPLITS:
        if not task.splits[split]:
            raise ValueError(f"task {task.name!r} has no {split} examples after the fixed 80/10/10 split; "
                             "give it at least 10 examples (about 30 for a useful test set)")
    out_dir.mkdir(parents=True, exist_ok=True)
    eos = eos_id(tok)
    meta = {"task": task.name, "pad_id": eos, "tags": [x.strip() for x in task.labels] if task.labels
            else [task.name], "labels": task.labels,
            "label_ids": [tok.encode(x).ids for x in task.labels] if task.labels else None}
    for split in SPLITS:
        examples = task.splits[split]
        prompts = tok.encode_batch([e.prompt for e in examples])
        completions = tok.encode_batch([e.completion for e in examples])
        ids = [np.asarray(p.ids + c.ids + [eos], dtype=np.int64) for p, c in zip(prompts, completions)]
        starts = np.concatenate([[0], np.cumsum([len(x) for x in ids])])
        tmp = out_dir / f"task-{split}.tmp.npz"
        np.savez(tmp, tokens=np.concatenate(ids), starts=starts,
                 prompt_lens=np.asarray([len(p.ids) for p in prompts], dtype=np.int64),
                 labels=np.asarray([-1 if e.label is None else e.label for e in examples], dtype=np.int64))
        os.replace(tmp, out_dir / f"task-{split}.npz")
        meta[f"{split}_examples"] = len(examples)
        meta[f"{split}_tokens"] = int(starts[-1])
    tmp = out_dir / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out_dir / "meta.json")
    return meta


@torch.no_grad()
def accuracy(model, split: TaskSplit, device, batch_size: int = 32, max_examples: int | None = None,
             autocast=None) -> float:
    """Share of examples whose most likely label is the true one: the highest log-probability
    of the label's tokens after the prompt, per token (length-normalised, so a longer label is
    not penalised for its length; lm-eval-harness's acc_norm idea). The prompt is cut from the
    left so that the model sees at most seq_len tokens, as in training."""
    if split.label_ids is None:
        raise ValueError("accuracy: the task has no label set (a prompt/completion task); "
                         "its quality is the validation loss")
    was_training = model.training
    model.eval()
    n = len(split) if max_examples is None else min(len(split), max_examples)
    right = 0
    try:
        for start in range(0, n, batch_size):
            idx = list(range(start, min(start + batch_size, n)))
            if all(len(ids) == 1 for ids in split.label_ids):     # one forward scores every label
                scores = _label_logprob(model, split, idx, [], device, autocast)[1][:, [
                    ids[0] for ids in split.label_ids]]
            else:
                scores = torch.stack([_label_logprob(model, split, idx, ids, device, autocast)[0]
                                      for ids in split.label_ids], dim=1)
            right += int((scores.argmax(1) == torch.from_numpy(split.labels[idx])).sum())
    finally:
        model.train(was_training)
    return right / n


def _label_logprob(model, split: TaskSplit, idx: list[int], label: list[int], device, autocast):
    """([B] mean log p(label tokens | prompt) per token, [B, V] log-probabilities of the token
    after the prompt) for examples ``idx``. The model reads prompt + label[:-1]: at most
    seq_len tokens."""
    rows, L = [], len(label)
    for i in idx:
        prompt = split.tokens[split.starts[i]:split.starts[i] + split.prompt_lens[i]]
        keep = max(1, split.seq_len - max(L - 1, 0))
        rows.append(np.concatenate([prompt[-keep:], np.asarray(label[:-1], dtype=np.int64)]))
    S = max(len(r) for r in rows)
    x = torch.full((len(rows), S), split.pad_id, dtype=torch.long)
    for b, r in enumerate(rows):
        x[b, :len(r)] = torch.from_numpy(r)
    with (autocast() if autocast is not None else nullcontext()):
        logits = model(x.to(device)).logits.float()
    logp = torch.log_softmax(logits, -1).cpu()
    total, after_prompt = torch.zeros(len(rows)), torch.empty(len(rows), logp.shape[-1])
    for b, r in enumerate(rows):
        P = len(r) - max(L - 1, 0)            # the prompt's length: the label's first token follows it
        after_prompt[b] = logp[b, P - 1]
        if label:
            total[b] = logp[b, torch.arange(P - 1, P - 1 + L), torch.tensor(label)].mean()
    return total, after_prompt
