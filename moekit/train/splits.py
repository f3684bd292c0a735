"""A run's data: the splits it trains and validates on, prepared once into RUN/data (a corpus's
token cache, a task's examples or a mixture's sources) and opened again by eval, report and
extract."""

from __future__ import annotations

import json
from pathlib import Path

from moekit.checks import shorten
from moekit.config import RunConfig
from moekit.data.catalog import load_documents
from moekit.data.mixture import MixtureSplit, build_mixture, source_documents, training_texts
from moekit.data.stream import PackedSplit, build_token_cache, is_val_doc
from moekit.data.task_split import TaskSplit, build_task_cache
from moekit.data.tasks import load_task
from moekit.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer


def prepare_data(cfg: RunConfig, run_dir: Path):
    """(tokenizer, train split, val split, token-cache meta); the tokenizer is trained once
    on the training documents and saved in the run directory. With ``data.task`` the splits
    are the task's (moekit.data.task_split.TaskSplit), with ``data.mixture`` the sources'
    (moekit.data.mixture.MixtureSplit): prepared once, then read from RUN/data on resume.
    ``data.max_docs`` cuts a corpus, each mixture source, or a task's training examples."""
    if cfg.data.task is not None:
        return _prepare_task(cfg, run_dir)
    if cfg.data.mixture is not None:
        return _prepare_mixture(cfg, run_dir)
    docs = load_documents(cfg.data.corpus, cfg.data.text_column)
    if cfg.data.max_docs is not None:
        docs = docs[: cfg.data.max_docs]
    tok = _tokenizer(run_dir, cfg, lambda: (d.text for i, d in enumerate(docs)
                                            if not is_val_doc(i, cfg.data.val_fraction)))
    meta = build_token_cache(docs, tok, run_dir / "data", cfg.data.val_fraction)
    train = PackedSplit.open(run_dir / "data", "train", cfg.data.seq_len)
    val = PackedSplit.open(run_dir / "data", "val", cfg.data.seq_len)
    if len(val) == 0:
        raise ValueError(f"the validation split of {cfg.data.corpus!r} has fewer than seq_len+1="
                         f"{cfg.data.seq_len + 1} tokens; use more documents or a larger val_fraction")
    return tok, train, val, meta


def _tokenizer(run_dir: Path, cfg: RunConfig, texts):
    """The run's tokenizer: RUN/tokenizer.json (a resume, or SRC's for --from), else one trained
    on ``texts()`` (the training text) and saved there."""
    path = run_dir / "tokenizer.json"
    if path.exists():
        return load_tokenizer(path)
    tok = train_tokenizer(texts(), cfg.data.vocab_size)
    save_tokenizer(tok, path)
    return tok


def _reopen(cfg: RunConfig, run_dir: Path, meta_file: str):
    """A resumed task or mixture run: its own prepared RUN/data, not the source again (which
    may have moved or changed); None when this run has not prepared it yet (a new run's
    directory is fresh)."""
    meta_path = run_dir / "data" / meta_file
    marker = run_dir / "data" / ("task-test.npz" if cfg.data.task is not None else meta_file)
    if not (marker.exists() and (run_dir / "tokenizer.json").exists()):
        return None
    return (load_tokenizer(run_dir / "tokenizer.json"), open_split(cfg, run_dir, "train"),
            open_split(cfg, run_dir, "val"), json.loads(meta_path.read_text()))


def _prepare_task(cfg: RunConfig, run_dir: Path):
    if (prepared := _reopen(cfg, run_dir, "meta.json")) is not None:
        return prepared
    task = load_task(cfg.data.task, cfg.data.task_labels, cfg.data.max_docs)
    # a task trained from scratch gets a tokenizer of its training text
    tok = _tokenizer(run_dir, cfg, lambda: (e.prompt + e.completion for e in task.splits["train"]))
    for label in task.labels or []:     # scored as one window: the label and a token of prompt
        if (n := len(tok.encode(label).ids)) >= cfg.data.seq_len:
            raise ValueError(f"data.task={cfg.data.task!r}: the label {shorten(label.strip())!r} is {n} "
                             f"tokens, and data.seq_len={cfg.data.seq_len} leaves no room for its prompt; "
                             "shorten the label or raise data.seq_len")
    meta = build_task_cache(task, tok, run_dir / "data")
    return tok, open_split(cfg, run_dir, "train"), open_split(cfg, run_dir, "val"), meta


def _prepare_mixture(cfg: RunConfig, run_dir: Path):
    if (prepared := _reopen(cfg, run_dir, "mixture.json")) is not None:
        return prepared
    entries = cfg.data.mixture
    column = cfg.data.text_column
    docs = [source_documents(e["source"], e["tag"], column)[:cfg.data.max_docs] for e in entries]
    tok = _tokenizer(run_dir, cfg, lambda: training_texts(docs, cfg.data.val_fraction))
    train, val, meta = build_mixture(entries, docs, tok, run_dir / "data", cfg.data.val_fraction,
                                     cfg.data.seq_len)
    return tok, train, val, meta


def has_cache(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a prepared token cache (a run directory, not an export)."""
    return any((Path(run_dir) / "data" / f).exists() for f in ("meta.json", "mixture.json"))


def open_split(cfg: RunConfig, run_dir: Path, split: str):
    """A run's prepared split ("train", "val"; "test" for a task) from its data cache."""
    if cfg.data.mixture is not None:
        return MixtureSplit.open(Path(run_dir) / "data", split, cfg.data.seq_len)
    if cfg.data.task is not None:
        return TaskSplit.open(Path(run_dir) / "data", split, cfg.data.seq_len)
    return PackedSplit.open(Path(run_dir) / "data", split, cfg.data.seq_len)
