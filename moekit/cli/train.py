"""moekit train: train (or resume) a run."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from moekit.config import RunConfig, apply_overrides
from moekit.store.run_dir import write_json
from moekit.train.telemetry import routing_summary


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


def _resume_overrides(sets: list[str]) -> tuple[dict, dict]:
    """On --resume: (parallel.* = the layout to resume with, train.* settings that may change)."""
    from moekit.train.trainer import RESUME_SETTINGS
    allowed = ("parallel.",) + tuple(f"train.{k}=" for k in RESUME_SETTINGS)
    other = [s for s in sets if not s.strip().startswith(allowed)]
    if other:
        raise ValueError(f"--resume continues a run with its saved config; only parallel.* (the layout) and "
                         f"{', '.join('train.' + k for k in RESUME_SETTINGS)} may be set, not {other[0]!r}")
    raw = apply_overrides({}, sets)
    return raw.get("parallel", {}), raw.get("train", {})


def _config(args) -> tuple[RunConfig, dict]:
    """(the recipe (or the default) with the --set overrides and --from, the model fields it set)."""
    import dataclasses

    from moekit.recipe import load_toml
    raw = getattr(args, "raw", None)        # moekit finetune passes its recipe ready-made
    if raw is None:
        raw = apply_overrides(load_toml(args.config) if args.config else {}, args.set)
    cfg = RunConfig.from_dict(raw)
    if getattr(args, "init_from", None):
        if cfg.train.init_from is not None and cfg.train.init_from != args.init_from:
            raise ValueError(f"--from {args.init_from} and train.init_from={cfg.train.init_from!r} disagree; "
                             "give one of them")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=args.init_from))
    return cfg, raw.get("model") or {}


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
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if several and not args.resume and not args.out:
        raise ValueError("several processes need one run directory: pass --out DIR (on every node, "
                         "on a filesystem they all see)")
    import logging
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from moekit.train.trainer import train
    if args.resume:
        if args.config or args.init_from:
            flag = "--config" if args.config else "--from"
            raise ValueError(f"--resume continues a run with its saved config and weights; drop {flag}")
        layout, changes = _resume_overrides(args.set)
        summary = train(RunConfig(), Path(args.resume), resume=True, progress=not args.no_progress,
                        stop_at=args.stop_at, layout=layout, changes=changes)
        out = Path(args.resume)
    else:
        cfg, model_section = _config(args)
        out = Path(args.out) if args.out else _default_out(args)
        if os.environ.get("RANK", "0") == "0":
            print(f"run directory: {out}")
        summary = train(cfg, out, progress=not args.no_progress, stop_at=args.stop_at,
                        model_section=model_section)
    import torch.distributed as dist
    if dist.is_initialized():
        from moekit.parallel.parallelize import leave_process_group
        rank = dist.get_rank()
        leave_process_group()
        if rank != 0:                   # rank 0 reports
            return 0
    if summary["steps_run"] == 0:       # keep the summary of the steps that did run
        why = (f"--stop-at {args.stop_at}" if args.stop_at is not None and args.stop_at < summary["max_steps"]
               else f"max_steps {summary['max_steps']}; raise it (--set train.max_steps=N) to train longer")
        print(f"nothing to do: {out} is at step {summary['steps']} ({why})")
        return 0
    short = {k: v for k, v in summary.items() if k not in ("train_losses", "routing_last_interval")}
    write_json(out / "summary.json", summary)
    print(json.dumps(short, indent=1))
    if summary["routing_last_interval"]:
        loads = {int(i): c for i, c in summary["routing_last_interval"].items()}
        print(routing_summary(loads))
    return 0


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
    from moekit.data.catalog import load_documents
    from moekit.store import run_dir as rd
    from moekit.store.checkpoint import Checkpoint
    if args.resume:
        from moekit.config import RunConfig
        from moekit.train.run import resolve_layout
        from moekit.train.trainer import resumed_config
        layout, changes = _resume_overrides(args.set)
        ckpt = Checkpoint(Path(args.resume))      # exists and is readable
        ckpt.require_resumable()
        cfg = resumed_config(RunConfig.from_dict(ckpt.meta["config"]), ckpt.meta["step"], changes)
        resolve_layout(cfg, args.nproc, True, layout)
        from moekit.train.growth import check_memory
        check_memory(cfg)
        return
    from moekit.train.growth import check_memory, check_start
    cfg, model_section = _config(args)
    if cfg.train.init_from is not None:
        from moekit.store.source import load_source
        cfg, _ = load_source(cfg, model_section)    # readable, and the recipe does not contradict it
    check_start(cfg)                        # the schedule's first count is the model's
    check_memory(cfg)
    if cfg.parallel.world_size != 1:
        cfg.parallel.check_world(args.nproc, "processes asked for (--nproc)")
    if args.out:
        rd.check_fresh(Path(args.out))
        rd.discard(Path(args.out), rd.create(Path(args.out)))   # writable: made, then gone again
    load_documents(cfg.data.corpus)        # a missing, empty or binary corpus
