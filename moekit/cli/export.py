"""moekit export: a consolidated single-device copy of a run's model."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("export", help="write a run's model as one safetensors file (+ config, tokenizer)",
                       allow_abbrev=False,
                       description="Consolidate a run's checkpoint (a single file or the sharded "
                                   "directory a parallel run writes) into OUT/model.safetensors, "
                                   "OUT/config.json and OUT/tokenizer.json. `moekit generate` and "
                                   "`moekit eval` read OUT like a run directory.")
    p.add_argument("run_dir", help="the run directory")
    p.add_argument("--out", help="the export directory (default: RUN_DIR/export, or RUN_DIR/hf)")
    p.add_argument("--format", choices=("moekit", "hf"), default="moekit",
                   help="hf: a Hugging Face directory (Llama/Qwen2/Qwen3 dense, Mixtral/Qwen2-MoE/OLMoE/"
                        "Qwen3-MoE) that transformers.AutoModelForCausalLM.from_pretrained loads")
    p.set_defaults(run=run)


def run(args) -> int:
    from moekit.store.run_dir import export_hf, export_run
    default = Path(args.run_dir) / ("hf" if args.format == "hf" else "export")
    write = export_hf if args.format == "hf" else export_run
    out = write(Path(args.run_dir), Path(args.out) if args.out else default)
    print(f"exported {args.run_dir} to {out}")
    return 0
