"""The one entry to the engine: every command that trains a model comes through here.

    summary = launch(cfg, Path("runs/e16"))                       # a new run; summary.json written
    summary = launch(RunConfig(), Path("runs/e16"), resume=True)  # continue it
    code = train_command(raw=recipe, out="runs/ft", init_from="runs/base")   # what `moekit train` does

``moekit train``, ``moekit finetune``, ``moekit compress --method distill`` (and
``--recover-steps``), every ``moekit search`` trial and every federated round call
:func:`launch` (the commands through :func:`train_command`): the same prechecks, the same
:func:`moekit.train.trainer.train` with the objective the recipe names
(:func:`moekit.train.objectives.objective_for`), the same ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

from moekit.config import RunConfig, apply_overrides, check_new_run
from moekit.data.catalog import load_documents
from moekit.parallel.parallelize import leave_process_group
from moekit.recipe import load_toml
from moekit.store import run_dir as rd
from moekit.store.checkpoint import Checkpoint
from moekit.store.source import load_source
from moekit.train import growth
from moekit.train.run import resolve_layout
from moekit.train.telemetry import routing_summary
from moekit.train.trainer import RESUME_SETTINGS, resumed_config, train


def recipe_config(config: str | None = None, sets: list[str] = (), init_from: str | None = None,
                  raw: dict | None = None) -> tuple[RunConfig, dict]:
    """(the recipe -- ``raw``, else the TOML ``config`` or the default -- with the ``--set``
    overrides and ``--from``, the model fields it set)."""
    if raw is None:
        raw = apply_overrides(load_toml(config) if config else {}, list(sets))
    cfg = RunConfig.from_dict(raw)
    if init_from:
        if cfg.train.init_from is not None and cfg.train.init_from != init_from:
            raise ValueError(f"--from {init_from} and train.init_from={cfg.train.init_from!r} disagree; "
                             "give one of them")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=init_from))
    return cfg, raw.get("model") or {}


def resume_overrides(sets: list[str]) -> tuple[dict, dict]:
    """On --resume: (parallel.* = the layout to resume with, train.* settings that may change)."""
    allowed = ("parallel.",) + tuple(f"train.{k}=" for k in RESUME_SETTINGS)
    other = [s for s in sets if not s.strip().startswith(allowed)]
    if other:
        raise ValueError(f"--resume continues a run with its saved config; only parallel.* (the layout) and "
                         f"{', '.join('train.' + k for k in RESUME_SETTINGS)} may be set, not {other[0]!r}")
    raw = apply_overrides({}, sets)
    return raw.get("parallel", {}), raw.get("train", {})


def precheck(cfg: RunConfig, out: Path | None = None, *, model_section: dict | None = None,
             nproc: int | None = None, corpus: bool = True, source: bool = True) -> RunConfig:
    """What can be wrong with a new run before any process trains, each one line: the source
    model (``--from``) and the recipe against it, the expert schedule's start and memory, the
    layout for ``nproc`` processes, ``out`` (fresh and writable; made and removed again), the
    corpus (``corpus=False``: not read here; ``source=False``: the source is not loaded here).
    Returns the config with the source's architecture (``train.init_from``)."""
    if source and cfg.train.init_from is not None:
        cfg, _ = load_source(cfg, model_section)    # readable, and the recipe does not contradict it
    check_new_run(cfg)                             # windows within the model (warnings: the ranks log)
    growth.check_start(cfg)                        # the schedule's first count is the model's
    growth.check_memory(cfg)
    if nproc is not None and cfg.parallel.world_size != 1:
        cfg.parallel.check_world(nproc, "processes asked for (--nproc)")
    if out is not None:
        rd.check_fresh(Path(out))
        rd.discard(Path(out), rd.create(Path(out)))   # writable: made, then gone again
    if corpus:
        load_documents(cfg.data.corpus, cfg.data.text_column)     # a missing, empty or binary corpus
    return cfg


def precheck_resume(run_dir: Path, sets: list[str], nproc: int | None = None) -> RunConfig:
    """The resume's checks before any process trains: a readable, resumable checkpoint, the
    settings that may change, the layout for ``nproc`` processes, the schedule's memory."""
    layout, changes = resume_overrides(sets)
    ckpt = Checkpoint(Path(run_dir))      # exists and is readable
    ckpt.require_resumable()
    cfg = resumed_config(RunConfig.from_dict(ckpt.meta["config"]), ckpt.meta["step"], changes)
    resolve_layout(cfg, nproc, True, layout)
    growth.check_memory(cfg)
    return cfg


def launch(cfg: RunConfig, out: Path, *, resume: bool = False, progress: bool = True,
           stop_at: int | None = None, layout: dict | None = None, changes: dict | None = None,
           model_section: dict | None = None, on_eval: Callable[[int, float], bool] | None = None,
           initial=None) -> dict:
    """Train (or resume) the run in ``out`` (:func:`moekit.train.trainer.train`, whose
    arguments these are) and, when a step ran, write its ``summary.json`` (rank 0); returns the
    summary. A run with nothing left to do touches nothing."""
    out = Path(out)
    summary = train(cfg, out, resume=resume, progress=progress, stop_at=stop_at, layout=layout,
                    changes=changes, model_section=model_section, on_eval=on_eval, initial=initial)
    if summary["steps_run"] > 0 and os.environ.get("RANK", "0") == "0":
        rd.write_json(out / "summary.json", summary)
    return summary


def train_command(*, config: str | None = None, sets: list[str] = (), out: str | Path | None = None,
                  resume: str | Path | None = None, init_from: str | None = None, raw: dict | None = None,
                  progress: bool = True, stop_at: int | None = None, default_out: Path | None = None) -> int:
    """What ``moekit train`` does in one process (or in each torchrun rank): a new run from the
    recipe (``raw``, else ``config`` + ``sets``; ``init_from`` = ``--from``) into ``out``, or
    ``resume`` a run (``sets``: the layout and the settings that may change); then the
    summary printed. Returns the exit code."""
    import logging
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if several and not resume and not out:
        raise ValueError("several processes need one run directory: pass --out DIR (on every node, "
                         "on a filesystem they all see)")
    if resume:
        if config or init_from or raw is not None:
            flag = "--config" if config else "--from" if init_from else "a recipe"
            raise ValueError(f"--resume continues a run with its saved config and weights; drop {flag}")
        layout, changes = resume_overrides(list(sets))
        run_dir = Path(resume)
        summary = launch(RunConfig(), run_dir, resume=True, progress=progress, stop_at=stop_at,
                         layout=layout, changes=changes)
    else:
        cfg, model_section = recipe_config(config, sets, init_from, raw)
        run_dir = Path(out) if out else default_out
        if run_dir is None:
            raise ValueError("no run directory: pass --out DIR")
        if os.environ.get("RANK", "0") == "0":
            print(f"run directory: {run_dir}")
        summary = launch(cfg, run_dir, progress=progress, stop_at=stop_at, model_section=model_section)
    import torch.distributed as dist
    if dist.is_initialized():
        rank = dist.get_rank()
        leave_process_group()
        if rank != 0:                   # rank 0 reports
            return 0
    print_summary(summary, run_dir, stop_at)
    return 0


def print_summary(summary: dict, run_dir: Path, stop_at: int | None = None) -> None:
    """The summary as the commands print it (or why nothing ran)."""
    if summary["steps_run"] == 0:
        why = (f"--stop-at {stop_at}" if stop_at is not None and stop_at < summary["max_steps"]
               else f"max_steps {summary['max_steps']}; raise it (--set train.max_steps=N) to train longer")
        print(f"nothing to do: {run_dir} is at step {summary['steps']} ({why})")
        return
    short = {k: v for k, v in summary.items() if k not in ("train_losses", "routing_last_interval")}
    print(json.dumps(short, indent=1))
    if summary["routing_last_interval"]:
        loads = {int(i): c for i, c in summary["routing_last_interval"].items()}
        print(routing_summary(loads))
