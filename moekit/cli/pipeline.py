"""moekit pipeline: a staged recipe (EfficientScale: train, grow, train, upcycle, train) as one run."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("pipeline", help="run a staged recipe (train, grow, upcycle, ...) as one run",
                       allow_abbrev=False,
                       description="Run the [[stage]] tables of a recipe one after another in OUT: each "
                                   "stage trains the previous stage's model, transformed by its grow, "
                                   "upcycle or experts table, with the AdamW state carried and one "
                                   "learning-rate schedule over all stages. Run it again to continue "
                                   "after a stop. See configs/efficientscale.toml.")
    p.add_argument("--config", required=True, help="a TOML recipe with [[stage]] tables")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the recipe (not of a stage), e.g. --set data.corpus=news-en")
    p.add_argument("--out", required=True, help="the pipeline's directory (the same one continues it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args) -> int:
    import logging

    from moekit.recipe import apply_overrides, load_toml
    from moekit.train.pipeline import run_pipeline
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = run_pipeline(apply_overrides(load_toml(args.config), args.set), Path(args.out),
                          progress=not args.no_progress)
    for s in result["stages"]:
        start = "-" if s["val_start"] is None else f"{s['val_start']:.4f}"
        print(f"stage {s['index']} {s['name']:>10}: {s['transform'] or 'train':>8}, {s['steps']} steps, "
              f"{s['flops']:.3e} FLOPs, val {start} -> {s['val_final']:.4f}")
    print(f"final model: {result['final_model']} (val {result['final_val']:.4f}, {result['steps']} steps, "
          f"{result['flops']:.3e} training FLOPs)")
    return 0
