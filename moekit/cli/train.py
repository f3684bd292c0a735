"""moekit train: train (or resume) a run."""

from __future__ import annotations

import json
import time
from pathlib import Path

from moekit.config import RunConfig, apply_overrides
from moekit.train.telemetry import routing_summary


def register(sub) -> None:
    p = sub.add_parser("train", help="train an MoE (or dense) language model",
                       description="Train a model. With no arguments: the default recipe (a tiny MoE on "
                                   "parlspeech, sized for a laptop CPU).")
    p.add_argument("--config", help="a TOML recipe (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set train.max_steps=200 --set model.moe.num_experts=16")
    p.add_argument("--out", help="the run directory (default: a new runs/<recipe>-<date>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args) -> int:
    import logging
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from moekit.train.trainer import train
    if args.resume:
        if args.config or args.set:
            raise ValueError("--resume continues a run with its saved config; drop --config/--set")
        summary = train(RunConfig(), Path(args.resume), resume=True, progress=not args.no_progress)
        out = Path(args.resume)
    else:
        cfg = (RunConfig.from_toml(args.config, args.set) if args.config
               else RunConfig.from_dict(apply_overrides({}, args.set)))
        recipe = Path(args.config).stem if args.config else "tiny-moe"
        out = Path(args.out) if args.out else Path("runs") / f"{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
        print(f"run directory: {out}")
        summary = train(cfg, out, progress=not args.no_progress)
    short = {k: v for k, v in summary.items() if k not in ("train_losses", "routing_last_interval")}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(short, indent=1))
    if summary["routing_last_interval"]:
        loads = {int(i): c for i, c in summary["routing_last_interval"].items()}
        print(routing_summary(loads))
    return 0
