"""moekit import: a Hugging Face model directory as a moekit model directory."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("import", help="import a Hugging Face model (Llama, Qwen2, Mixtral, Qwen2-MoE, ...)",
                       allow_abbrev=False,
                       description="Read a Hugging Face model directory (config.json, model.safetensors or "
                                   "sharded safetensors, tokenizer.json) and write OUT as a moekit export "
                                   "directory that generate, eval and export read.")
    p.add_argument("src", help="a Hugging Face model directory, or a catalog model (smollm2-135m)")
    p.add_argument("--out", required=True, help="the directory to write")
    p.set_defaults(run=run)


def run(args) -> int:
    from moekit.store.run_dir import import_hf
    out = import_hf(Path(args.src), Path(args.out))
    print(f"imported {args.src} to {out}")
    return 0
