"""A run's data: the splits it trains and validates on, prepared once into RUN/data (a corpus's
token cache, a task's examples or a mixture's sources) and opened again by eval, report and
extract."""

from __future__ import annotations

from pathlib import Path

from moekit.config import RunConfig
from moekit.data.catalog import load_documents
from moekit.data.stream import PackedSplit, build_token_cache, is_val_doc
from moekit.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer


def prepare_data(cfg: RunConfig, run_dir: Path):
    """(tokenizer, train split, val split, token-cache meta); the tokenizer is trained once
    on the training documents and saved in the run directory. With ``data.task`` the splits
    are the task's (moekit.finetune.data.TaskSplit), with ``data.mixture`` the sources'
    (moekit.data.mixture.MixtureSplit): prepared once, then read from RUN/data on resume.
    ``data.max_docs`` cuts a corpus, each mixture source, or a task's training examples."""
    if cfg.data.task is not None:
        return _prepare_task(cfg, run_dir)
    if cfg.data.mixture is not None:
        return _prepare_mixture(cfg, run_dir)
    docs = load_documents(cfg.data.corpus)
    if cfg.data.max_docs is not None:
        docs = docs[: cfg.data.max_docs]
    tok_path = run_dir / "tokenizer.json"
    if tok_path.exists():
        tok = load_tokenizer(tok_path)
    else:
        train_texts = (d.text for i, d in enumerate(docs) if not is_val_doc(i, cfg.data.val_fraction))
        tok = train_tokenizer(train_texts, cfg.data.vocab_size)
        save_tokenizer(tok, tok_path)
    meta = build_token_cache(docs, tok, run_dir / "data", cfg.data.val_fraction)
    train = PackedSplit.open(run_dir / "data", "train", cfg.data.seq_len)
    val = PackedSplit.open(run_dir / "data", "val", cfg.data.seq_len)
    if len(val) == 0:
        raise ValueError(f"the validation split of {cfg.data.corpus!r} has fewer than seq_len+1="
                         f"{cfg.data.seq_len + 1} tokens; use more documents or a larger val_fraction")
    return tok, train, val, meta


def _cached(run_dir: Path, marker: str) -> bool:
    """Whether this run already prepared its task or mixture cache (a new run's directory is
    fresh): then a resume reads it, not the source again (which may have moved or changed)."""
    return (run_dir / "data" / marker).exists() and (run_dir / "tokenizer.json").exists()


def _prepare_task(cfg: RunConfig, run_dir: Path):
    from moekit.finetune.data import TaskSplit, build_task_cache
    from moekit.finetune.tasks import load_task
    if _cached(run_dir, "task-test.npz"):
        import json
        meta = json.loads((run_dir / "data" / "meta.json").read_text())
        return (load_tokenizer(run_dir / "tokenizer.json"), open_split(cfg, run_dir, "train"),
                open_split(cfg, run_dir, "val"), meta)
    task = load_task(cfg.data.task, cfg.data.task_labels, cfg.data.max_docs)
    tok_path = run_dir / "tokenizer.json"
    if tok_path.exists():
        tok = load_tokenizer(tok_path)
    else:                       # a task trained from scratch: a tokenizer of its training text
        tok = train_tokenizer((e.prompt + e.completion for e in task.splits["train"]), cfg.data.vocab_size)
        save_tokenizer(tok, tok_path)
    meta = build_task_cache(task, tok, run_dir / "data")
    return (tok, TaskSplit.open(run_dir / "data", "train", cfg.data.seq_len),
            TaskSplit.open(run_dir / "data", "val", cfg.data.seq_len), meta)


def _prepare_mixture(cfg: RunConfig, run_dir: Path):
    from moekit.data.mixture import build_mixture, source_documents, training_texts
    if _cached(run_dir, "mixture.json"):
        import json
        meta = json.loads((run_dir / "data" / "mixture.json").read_text())
        return (load_tokenizer(run_dir / "tokenizer.json"), open_split(cfg, run_dir, "train"),
                open_split(cfg, run_dir, "val"), meta)
    entries = cfg.data.mixture
    docs = [source_documents(e["source"], e["tag"])[:cfg.data.max_docs] for e in entries]
    tok_path = run_dir / "tokenizer.json"
    if tok_path.exists():
        tok = load_tokenizer(tok_path)
    else:
        tok = train_tokenizer(training_texts(docs, cfg.data.val_fraction), cfg.data.vocab_size)
        save_tokenizer(tok, tok_path)
    train, val, meta = build_mixture(entries, docs, tok, run_dir / "data", cfg.data.val_fraction,
                                     cfg.data.seq_len)
    return tok, train, val, meta


def open_split(cfg: RunConfig, run_dir: Path, split: str):
    """A run's prepared split ("train", "val"; "test" for a task) from its data cache."""
    if cfg.data.mixture is not None:
        from moekit.data.mixture import MixtureSplit
        return MixtureSplit.open(Path(run_dir) / "data", split, cfg.data.seq_len)
    if cfg.data.task is not None:
        from moekit.finetune.data import TaskSplit
        return TaskSplit.open(Path(run_dir) / "data", split, cfg.data.seq_len)
    return PackedSplit.open(Path(run_dir) / "data", split, cfg.data.seq_len)
