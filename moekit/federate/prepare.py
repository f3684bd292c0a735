"""Before any process starts: the clients' shards, the shared tokenizer and round 0's model.

The default shards split the recipe's corpus by tag (parlspeech: de, en, es, nl, one
language per client: non-IID); ``--shard`` gives one corpus, "corpus:tag" or path per
client. Each shard is read and checked here, so a missing, empty or too-small one is one
line before anything runs.

The vocabulary must be the same on every client (the server averages embeddings row by
row). On this machine ``moekit federate`` trains it on the union of the clients' training
text, which a real deployment could not see: there, give ``--tokenizer`` a public one
(a tokenizer.json), and no client's text is read outside its own process.
"""

from __future__ import annotations

from pathlib import Path

from moekit.config import RunConfig
from moekit.data.catalog import load_documents
from moekit.data.stream import is_val_doc
from moekit.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from moekit.store.run_dir import build_model, model_config_for, save_export


def default_shards(cfg: RunConfig, clients: int | None) -> list[str]:
    """One "corpus:tag" shard per client, in tag order (the first ``clients`` tags)."""
    corpus = cfg.data.corpus
    tags = sorted({d.tag for d in load_documents(corpus, cfg.data.text_column)})
    if len(tags) < 2:
        raise ValueError(f"data.corpus={corpus!r} has {len(tags)} tag ({', '.join(tags)}), so it cannot be "
                         "split into clients by tag; give one --shard per client (a corpus, corpus:tag or "
                         "a path)")
    if clients is None:
        clients = len(tags)
    if clients > len(tags):
        raise ValueError(f"--clients {clients}: {corpus!r} splits into {len(tags)} shards by tag "
                         f"({', '.join(tags)}), one per client; use --clients {len(tags)} or fewer, or give "
                         f"one --shard per client")
    return [f"{corpus}:{t}" for t in tags[:clients]]


def shard_texts(cfg: RunConfig, shards: list[str]) -> list[tuple[list[str], list[str]]]:
    """(training texts, validation texts) of every shard, split as the client's run will split it."""
    out = []
    for i, shard in enumerate(shards):
        try:
            docs = load_documents(shard, cfg.data.text_column)
        except (ValueError, FileNotFoundError) as err:
            raise type(err)(f"client {i}'s shard {shard!r}: {err}") from None
        docs = docs[: cfg.data.max_docs] if cfg.data.max_docs is not None else docs
        if not docs:
            raise ValueError(f"client {i}'s shard {shard!r} is empty (no documents); give that client text "
                             "or leave it out")
        f = cfg.data.val_fraction
        out.append(([d.text for j, d in enumerate(docs) if not is_val_doc(j, f)],
                    [d.text for j, d in enumerate(docs) if is_val_doc(j, f)]))
    return out


def shared_tokenizer(cfg: RunConfig, texts: list[tuple[list[str], list[str]]], given: str | None):
    """``given`` (a tokenizer.json), else one trained on every shard's training text."""
    if given is not None:
        if not Path(given).is_file():
            raise FileNotFoundError(f"--tokenizer {given!r}: no such file; give a tokenizer.json")
        return load_tokenizer(Path(given))
    return train_tokenizer((t for train, _ in texts for t in train), cfg.data.vocab_size)


def check_sizes(cfg: RunConfig, shards: list[str], texts, tok) -> None:
    """Every shard has a training and a validation window of seq_len+1 tokens."""
    need = cfg.data.seq_len + 1
    for i, (shard, (train, val)) in enumerate(zip(shards, texts)):
        for split, docs in (("training", train), ("validation", val)):
            n = 0
            for start in range(0, len(docs), 64):      # until there is enough
                n += sum(len(e.ids) + 1 for e in tok.encode_batch(docs[start:start + 64]))
                if n >= need:
                    break
            if n < need:
                raise ValueError(f"client {i}'s shard {shard!r} has {n} tokens of {split} text, fewer than "
                                 f"data.seq_len+1={need}; give it more text, or a larger data.val_fraction "
                                 f"(now {cfg.data.val_fraction}) or a shorter data.seq_len")


def initial_model(cfg: RunConfig, tok, out_dir: Path) -> None:
    """Round 0: the recipe's model from its seed, as an export directory."""
    import torch

    torch.manual_seed(cfg.train.seed)
    model = build_model(model_config_for(cfg, tok.get_vocab_size()))
    save_export(model, tok, cfg, out_dir)


def save_shared_tokenizer(tok, out: Path) -> None:
    save_tokenizer(tok, Path(out) / "tokenizer.json")
