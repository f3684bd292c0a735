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
    p.add_argument("--out", help="the export directory (default: RUN_DIR/export)")
    p.set_defaults(run=run)


def run(args) -> int:
    from moekit.train.run_dir import export_run
    out = export_run(Path(args.run_dir), Path(args.out) if args.out else Path(args.run_dir) / "export")
    print(f"exported {args.run_dir} to {out}")
    return 0
