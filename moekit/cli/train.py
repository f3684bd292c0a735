"""moekit train: train (or resume) a run."""

from __future__ import annotations

import os
import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("train", help="train an MoE (or dense) language model", allow_abbrev=False,
                       description="Train a model. With no arguments: the default recipe (a tiny MoE on "
                                   "parlspeech, sized for a laptop CPU).")
    p.add_argument("--config", help="a TOML recipe (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set train.max_steps=200 --set model.moe.num_experts=16; "
                        "with --resume only parallel.* (the layout to resume with) and train.max_steps "
                        "(train longer), train.eval_every, save_every, log_every")
    p.add_argument("--out", help="the run directory (default: a new runs/<recipe>-<date>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    p.add_argument("--from", dest="init_from", metavar="SRC",
                   help="start a new run (step 0, fresh optimizer) from the weights, architecture and "
                        "tokenizer of SRC: a run, export or Hugging Face directory, or a catalog model "
                        "(smollm2-135m); the recipe's train and data sections apply (train.init_from)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--stop-at", type=int, metavar="STEP",
                   help="stop with a checkpoint after STEP (resume later, with any parallel layout)")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="run N processes on this machine through torchrun (multi-node: call torchrun "
                        "yourself, e.g. torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HOST:PORT "
                        "-m moekit train --out SHARED_DIR ...)")
    p.set_defaults(run=run)


def _default_out(args) -> Path:
    recipe = Path(args.config).stem if args.config else "tiny-moe"
    return Path("runs") / f"{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"


def run(args) -> int:
    if args.nproc is not None and args.nproc < 1:
        raise ValueError(f"--nproc {args.nproc}: the number of processes must be >= 1")
    if args.stop_at is not None and args.stop_at < 1:
        raise ValueError(f"--stop-at {args.stop_at}: must be a step >= 1")
    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:   # not yet under torchrun
        return _torchrun(args)
    from moekit.train.launch import train_command
    return train_command(config=args.config, sets=args.set, out=args.out, resume=args.resume,
                         init_from=args.init_from, progress=not args.no_progress, stop_at=args.stop_at,
                         default_out=_default_out(args))


def _torchrun(args) -> int:
    """``moekit train --nproc N ...`` = ``torchrun --standalone --nproc-per-node N -m moekit
    train ...``: a convenience, not a launcher of our own."""
    import subprocess
    import sys
    argv = args.raw_argv[args.raw_argv.index("train") + 1:]
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        rest.append(a)
    _precheck(args)
    if not args.resume and not args.out:   # one run directory for all ranks
        rest += ["--out", str(_default_out(args))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "moekit", "train", *rest]
    return subprocess.call(cmd)


def _precheck(args) -> None:
    """What can be wrong before the ranks start, checked here: one line, not one error per rank
    plus torchrun's traceback (the layout, the run directory, the corpus, the checkpoint)."""
    from moekit.train.launch import precheck, precheck_resume, recipe_config
    if args.resume:
        precheck_resume(Path(args.resume), args.set, args.nproc)
        return
    cfg, model_section = recipe_config(args.config, args.set, args.init_from)
    precheck(cfg, Path(args.out) if args.out else None, model_section=model_section, nproc=args.nproc)
