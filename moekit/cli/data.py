"""moekit data: the catalog of real corpora that work offline."""

from __future__ import annotations

import time


def register(sub) -> None:
    p = sub.add_parser("data", help="list or fetch the catalog's corpora")
    verbs = p.add_subparsers(dest="verb", required=True)
    listing = verbs.add_parser("list", help="the corpora, with sizes and where they come from")
    listing.set_defaults(run=run_list)
    get = verbs.add_parser("get", help="fetch a corpus and report what it holds")
    get.add_argument("name")
    get.add_argument("--text-column", default="text", help="a Parquet or JSONL corpus's text column "
                                                           "(data.text_column; default text)")
    get.set_defaults(run=run_get)


def run_list(args) -> int:
    from moekit.data.catalog import CATALOG, MODELS, cache_dir
    for c in CATALOG.values():
        cached = (cache_dir() / "corpora" / f"{c.name}.jsonl").exists()
        print(f"{c.name:<12} {c.description}\n{'':<12} from {c.requirement} ({c.license})"
              f"{'  [cached]' if cached else ''}")
    for m in MODELS.values():     # models: moekit import NAME, generate NAME, load_model(NAME)
        cached = (cache_dir() / "models" / m.name / "model.safetensors").exists()
        print(f"{m.name:<12} model: {m.description}\n{'':<12} from {m.requirement} ({m.license})"
              f"{'  [cached]' if cached else ''}")
    return 0


def run_get(args) -> int:
    from collections import Counter

    from moekit.data.catalog import load_documents
    t0 = time.perf_counter()
    docs = load_documents(args.name, args.text_column)
    tags = Counter(d.tag for d in docs)
    chars = sum(len(d.text) for d in docs)
    print(f"{args.name}: {len(docs)} documents, {chars:,} characters, tags {dict(tags)} "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0
