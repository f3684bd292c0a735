"""``moekit train``: set a run up, then step it, with logging, evaluation and checkpoints.

    loss = lm + aux_loss_coef * sum_layers(load-balancing loss) + z_loss_coef * sum_layers(z-loss)

One process or many (torchrun): :func:`moekit.train.run.setup` builds the run in any
layout and :func:`moekit.train.step.train_step` takes each step with an objective
(pretraining here). A resumed run restores model, optimizer, data position and RNG
states and follows the uninterrupted run's losses exactly (on the same machine and thread
count); the steps logged after the checkpoint by the interrupted run are dropped, so every
step appears once in metrics.jsonl and TensorBoard.

Faults: a non-finite loss or gradient norm skips the step (no update; at most
``train.max_bad_steps`` of them), then the run stops with one line; weights that are not
finite are never saved. A full disk or another write error while saving stops the run with
one line that names the step and the checkpoint left intact (temporary files removed).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from moekit.checks import is_int
from moekit.config import RunConfig, check_new_run
from moekit.data.task_split import accuracy
from moekit.model.transformer import model_flops
from moekit.store import run_dir as rd
from moekit.store.checkpoint import Checkpoint, save_checkpoint, save_sharded_checkpoint
from moekit.store.source import load_source
from moekit.train import growth, splits
from moekit.train.evaluate import eval_windows, evaluate
from moekit.train.metrics import MetricsWriter, device_name, mfu
from moekit.train.objectives import Batch, objective_for, student_start
from moekit.train.run import Run, distributed_context, precision_of, resolve_layout, setup
from moekit.train.step import StepStats, train_step

log = logging.getLogger("moekit")

# train.* settings a resume may change: they move neither the trajectory nor its exactness
RESUME_SETTINGS = ("max_steps", "eval_every", "save_every", "log_every")


class RunStopped(ValueError):
    """The run cannot go on (diverged, disk full); the message is one line and says what is intact."""


def train(cfg: RunConfig, run_dir: Path, resume: bool = False, progress: bool = True,
          stop_at: int | None = None, layout: dict | None = None, changes: dict | None = None,
          model_section: dict | None = None, on_eval: Callable[[int, float], bool] | None = None,
          initial=None) -> dict:
    """Train (or resume) the run in ``run_dir``; returns a summary dict.

    ``stop_at``: stop after that step with a checkpoint, as if preempted (the schedule still
    runs to ``max_steps``, so a resume continues the same trajectory).
    ``layout``: on resume, ParallelConfig fields to use instead of the saved ones (e.g.
    {"dp": 2, "ep": 1}); without it a different number of processes picks a layout itself.
    ``changes``: on resume, train.* settings to change (:data:`RESUME_SETTINGS`), e.g.
    {"max_steps": 2000} to train a finished run longer.
    ``cfg.train.init_from`` (a new run): start from those weights, architecture and tokenizer
    (:mod:`moekit.store.source`); ``model_section`` is the model fields the recipe set, which
    may not contradict them.
    ``on_eval(step, val_loss)``: called after every evaluation, on every rank (in a parallel
    run it must answer the same on each); a true answer stops the run there with a checkpoint,
    as ``stop_at`` would (moekit.search prunes a trial this way).
    ``initial`` (:class:`moekit.store.source.Initial`): the weights a federated round starts from
    (moekit.federate): a new run starts from them and their tokenizer, a resume loads them over
    its checkpoint's model (optimizer, data position and RNG stay the checkpoint's)."""
    run_dir = Path(run_dir)
    rank, world = distributed_context(cfg.train.device if cfg is not None else "auto")
    if stop_at is not None and stop_at < 1:
        raise ValueError(f"--stop-at {stop_at}: must be a step >= 1")
    cfg, ckpt = _open(cfg, run_dir, resume, layout, changes or {}, world, rank)
    growth.check_memory(cfg)
    if ckpt is not None and ckpt.meta["step"] >= min(cfg.train.max_steps, stop_at or cfg.train.max_steps):
        # nothing to do: touch nothing (config, metrics, summary)
        return {"steps": ckpt.meta["step"], "steps_run": 0, "max_steps": cfg.train.max_steps}
    teacher = None
    fresh = ckpt is None and initial is None
    if fresh and cfg.train.init_from is not None:
        if rank == 0:                       # a bad --out is found before a long load
            rd.check_fresh(run_dir)
        cfg, initial = load_source(cfg, model_section)
    elif fresh and cfg.distill.teacher is not None:   # fresh student weights, the teacher's tokenizer
        if rank == 0:
            rd.check_fresh(run_dir)
        cfg, initial, teacher = student_start(cfg)
    if ckpt is None:
        warnings = check_new_run(cfg)
        for warning in warnings if rank == 0 else ():
            log.warning(warning)
        growth.check_start(cfg)
    run = setup(cfg, run_dir, ckpt, initial)   # a new run: checked, made, and removed again if setup fails
    if rank == 0:                           # config.json and every checkpoint record the layout in use
        try:
            rd.write_json(run_dir / "config.json", cfg.to_dict())
        except BaseException:
            if not resume:
                rd.discard(run_dir, None)
            raise
    del ckpt                                # release a consolidated state's memory
    return _loop(run, objective_for(run, teacher), resume, stop_at, progress, on_eval)


def _open(cfg, run_dir: Path, resume: bool, layout: dict | None, changes: dict, world: int, rank: int):
    """(config in use, checkpoint or None): the checks before anything is written (a new run's
    directory is checked by setup, which makes it)."""
    ckpt = None
    if resume:
        ckpt = Checkpoint(run_dir)
        ckpt.require_resumable()
        cfg = resumed_config(RunConfig.from_dict(ckpt.meta["config"]), ckpt.meta["step"], changes)
        if rank == 0 and (removed := rd.remove_leftovers(run_dir)):
            log.info("removed what an interrupted save left: %s", ", ".join(removed))
    saved = cfg.parallel
    cfg = resolve_layout(cfg, world, resume, layout)
    if resume and rank == 0 and cfg.parallel != saved:
        log.info("resuming a %d-process run on %d process(es)%s; the global batch is batch_size x %d = %d "
                 "sequences (it was %d)", saved.world_size, world, f": parallel = {cfg.parallel}"
                 if world > 1 else "", world, cfg.train.batch_size * world,
                 cfg.train.batch_size * saved.world_size)
    return cfg, ckpt


def resumed_config(cfg: RunConfig, step: int, changes: dict) -> RunConfig:
    unknown = sorted(set(changes) - set(RESUME_SETTINGS))
    if unknown:
        raise ValueError(f"--resume continues a run with its saved config; train.{unknown[0]} cannot change "
                         f"(it would break the exact trajectory); settable: parallel.*, "
                         + ", ".join(f"train.{k}" for k in RESUME_SETTINGS))
    if not changes:
        return cfg
    t = cfg.train
    new_max = changes.get("max_steps")
    if is_int(new_max) and new_max < step:
        raise ValueError(f"train.max_steps={new_max}: the run is already at step {step}; "
                         f"give max_steps >= {step}")
    if is_int(new_max) and new_max > 0:
        changes = {**changes, **growth.within(t, new_max)}
    new = dataclasses.replace(t, **changes)         # the fields check their own values
    if new.max_steps != t.max_steps and t.decay_steps is None:   # the schedule keeps its shape
        new = dataclasses.replace(new, decay_steps=t.max_steps)
        if new.max_steps > t.max_steps and t.warmup_steps >= t.max_steps:
            log.info("extending the run from max_steps=%d to %d: warmup goes on to step %d, then the LR "
                     "is at its floor (lr x min_lr_ratio = %.3g)", t.max_steps, new.max_steps, t.warmup_steps,
                     t.lr * t.min_lr_ratio)
        elif new.max_steps > t.max_steps:
            log.info("extending the run from max_steps=%d to %d: the cosine schedule still ends at step %d, "
                     "later steps run at its final LR (lr x min_lr_ratio = %.3g)", t.max_steps, new.max_steps,
                     t.max_steps, t.lr * t.min_lr_ratio)
        else:
            log.info("stopping the run at step %d instead of %d: the LR follows the schedule of %d steps "
                     "(it will not reach its floor)", new.max_steps, t.max_steps, t.max_steps)
    return dataclasses.replace(cfg, train=new)


def _loop(run: Run, objective, resumed: bool, stop_at: int | None, progress: bool, on_eval=None) -> dict:
    t = run.cfg.train
    writer = MetricsWriter(run.run_dir, purge_after=run.step if resumed else None) if run.main else None
    bar = None
    if progress and run.main:
        from tqdm import tqdm
        bar = tqdm(total=t.max_steps, initial=run.step, unit="step", dynamic_ncols=True)
    state = _LoopState(saved_step=run.step if resumed else None, first_step=run.step,
                       flops=model_flops(run.model.cfg, run.cfg.data.seq_len),
                       growths=growth.logged_growths(run.run_dir) if resumed and run.main else [])
    end = t.max_steps if stop_at is None else min(stop_at, t.max_steps)
    if t.eval_at_start and run.step == 0:      # every rank: the evaluation is collective
        start = evaluate(run.model, run.val_split, t.batch_size, run.device, t.eval_batches, run.rank,
                         run.world, run.autocast)
        if writer is not None:
            writer.log(0, {"loss/val": start, "loss/val_ppl": math.exp(min(start, 50))})
    try:
        while run.step < end:
            if (target := growth.due(run)) is not None:
                run = _grow(run, target, writer, state)
            t0 = time.perf_counter()
            micro = [Batch(*run.train_split.batch(run.sampler.next())) for _ in range(t.grad_accum)]
            stats = train_step(run, micro, objective)
            state.train_time += time.perf_counter() - t0
            state.interval_steps += 1
            _watch(run, stats, state)
            if bar is not None:
                bar.update(1)
                rate = bar.format_dict.get("rate") or 0.0
                bar.set_postfix(loss=f"{stats.losses['lm']:.3f}", aux=f"{stats.losses['aux']:.3f}",
                                tok_s=f"{rate * stats.tokens:,.0f}")
            grows = growth.due(run) is not None     # before the next step: its interval ends here
            if run.step % t.log_every == 0 or run.step == t.max_steps or grows:
                _log(run, writer, stats, state)
            if run.step % t.eval_every == 0 or run.step == t.max_steps:
                sources: dict = {}          # a data mixture's per-source losses
                state.val_loss = evaluate(run.model, run.val_split, t.batch_size, run.device, t.eval_batches,
                                          run.rank, run.world, run.autocast, by_source=sources)
                scores = {**_task_scores(run, "val"), **{f"loss/val/{k}": v for k, v in sources.items()}}
                if run.step == t.max_steps:
                    scores.update(_task_scores(run, "test"))
                state.scores.update(scores)
                if writer is not None:
                    writer.log(run.step, {"loss/val": state.val_loss,
                                          "loss/val_ppl": math.exp(min(state.val_loss, 50)), **scores})
                if on_eval is not None and on_eval(run.step, state.val_loss):
                    end = run.step          # stopped from outside: saved below, like stop_at
            saving = run.step % t.save_every == 0 or run.step in (t.max_steps, end)
            if saving and not (grows and run.step < end):      # a growth saves the grown run
                _save(run, state)
    except OSError as err:      # a full disk, a permission change: one line, what is intact
        raise RunStopped(f"{_reason(err)} at step {run.step}; {state.intact()}") from None
    finally:
        for closing in (writer, bar):
            if closing is not None:
                try:
                    closing.close()
                except OSError:
                    pass
    return _summary(run, state)


def _grow(run: Run, target: int, writer: MetricsWriter | None, state: _LoopState) -> Run:
    """The run with ``target`` experts per MoE layer (moekit.train.growth), logged, recorded in
    config.json and saved."""
    run, record = growth.grow_now(run, target)
    state.growths.append(record)
    state.flops = model_flops(run.model.cfg, run.cfg.data.seq_len)
    if writer is not None:
        writer.log(run.step, growth.growth_metrics(record))
    _save(run, state)               # the checkpoint first: config.json never runs ahead of it
    if run.main:
        rd.write_json(run.run_dir / "config.json", run.cfg.to_dict())
    return run


@dataclasses.dataclass
class _LoopState:
    saved_step: int | None                  # the newest checkpoint's step (None: none yet)
    first_step: int = 0                     # where this invocation started
    flops: dict = dataclasses.field(default_factory=dict)   # model_flops: parameters, FLOPs per token
    train_time: float = 0.0                 # this log interval's step time (no eval/saving)
    interval_steps: int = 0
    val_loss: float | None = None
    bad_steps: list[int] = dataclasses.field(default_factory=list)
    loss_ema: float | None = None
    last_loads: dict = dataclasses.field(default_factory=dict)
    growths: list[dict] = dataclasses.field(default_factory=list)   # expert_schedule growths done
    scores: dict = dataclasses.field(default_factory=dict)   # a task's newest acc/val, acc/test

    def intact(self) -> str:
        if self.saved_step is None:
            return "no checkpoint was saved yet (remove the run directory to start again)"
        return f"the checkpoint of step {self.saved_step} is intact"


# a loss this many times its recent mean (an EMA) is reported as a spike
SPIKE_RATIO, SPIKE_EMA = 1.5, 0.9
SPIKE_MIN_NATS = 0.5     # ... and this far above it: a fine-tuning loss near 0 doubles on one hard batch


def _watch(run: Run, stats: StepStats, state: _LoopState) -> None:
    """Non-finite steps (skipped, bounded) and loss spikes (warned)."""
    t = run.cfg.train
    if stats.skipped:
        state.bad_steps.append(run.step)
        if run.main:
            log.warning("step %d: non-finite loss (%.4g) or gradient norm (%.4g): step skipped, no update "
                        "(%d of train.max_bad_steps=%d)", run.step, stats.losses["total"], stats.grad_norm,
                        len(state.bad_steps), t.max_bad_steps)
        if len(state.bad_steps) > t.max_bad_steps:
            raise RunStopped(f"training diverged: the loss or gradient norm was not finite at steps "
                             f"{state.bad_steps[:5]} (lr={t.lr:g}, aux_loss_coef={t.aux_loss_coef:g}); lower "
                             f"train.lr, raise train.warmup_steps or check the data; {state.intact()}")
        return
    run.history.append(stats.losses["lm"])
    lm, ema = stats.losses["lm"], state.loss_ema
    spike = ema is not None and lm > SPIKE_RATIO * ema and lm - ema > SPIKE_MIN_NATS
    if spike and run.step > t.warmup_steps and run.main:
        log.warning("step %d: loss spike: %.3f against a recent mean of %.3f; if this repeats lower train.lr "
                    "or train.grad_clip", run.step, lm, ema)
    state.loss_ema = lm if ema is None else SPIKE_EMA * ema + (1 - SPIKE_EMA) * lm


def _log(run: Run, writer: MetricsWriter | None, stats: StepStats, state: _LoopState) -> None:
    """Losses, LR, gradient norm, throughput and routing telemetry of the log interval."""
    tps = stats.tokens * state.interval_steps / state.train_time      # evaluation and saving excluded
    state.train_time, state.interval_steps = 0.0, 0
    flops = state.flops["flops_per_token"]
    metrics = {f"loss/{k}": v for k, v in stats.losses.items() if k != "total"}
    metrics.update({"optim/lr": stats.lr, "optim/grad_norm": stats.grad_norm, "perf/tokens_per_s": tps,
                    "perf/tokens_per_s_per_rank": tps / run.world})
    util = mfu(flops, tps / run.world, device_name(run.device), precision_of(run.cfg, run.device))
    if util is not None:                    # a GPU without a known peak: no MFU rather than a wrong one
        metrics["perf/mfu"] = util
    if state.bad_steps:
        metrics["optim/skipped_steps"] = float(len(state.bad_steps))
    if run.telemetry is not None:
        routing, loads, warnings = run.telemetry.flush()
        metrics.update(routing)
        metrics.update({f"moe/layer{i}/load": c for i, c in loads.items()})
        if writer is not None:
            writer.histograms(run.step, {f"moe/layer{i}/tokens_per_expert": c for i, c in loads.items()})
            writer.histograms(run.step, {k.replace("/k_hist", "/experts_per_token_hist"): v
                                         for k, v in routing.items() if k.endswith("/k_hist")})
        state.last_loads = loads or state.last_loads
        for w in warnings if run.main else ():
            log.warning("step %d: %s", run.step, w)
    if writer is not None:
        writer.log(run.step, metrics)


def _weights_finite(run: Run) -> bool:
    """Every rank's parameters finite (all ranks agree: one all-reduce in a parallel run)."""
    from torch.distributed.tensor import DTensor
    ok = all(bool(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all())
             for p in run.model.parameters())
    if run.world > 1:
        flag = torch.tensor([0.0 if ok else 1.0])
        dist.all_reduce(flag)
        ok = float(flag) == 0.0
    return ok


def _save(run: Run, state: _LoopState) -> None:
    if not _weights_finite(run):
        raise RunStopped(f"the weights are not finite at step {run.step}; not saving them; lower train.lr "
                         f"or check the data; {state.intact()}")
    meta = {"step": run.step, "sampler": run.sampler.state_dict(), "config": run.cfg.to_dict(),
            "tokenizer": run.tokenizer.to_str()}
    try:
        if run.world > 1:   # sharded: every rank writes its own pieces
            save_sharded_checkpoint(run.run_dir, run.training_state(), meta)
        else:
            save_checkpoint(run.run_dir, run.training_state(), meta)
    except OSError as err:
        then = (f"free space and resume with --resume {run.run_dir}" if state.saved_step is not None
                else "free space and start again")
        raise RunStopped(f"{_reason(err)} while saving step {run.step} to {str(run.run_dir)!r} (temporary "
                         f"files removed); {state.intact()}; {then}") from None
    state.saved_step = run.step


def _reason(err: OSError) -> str:
    return (err.strerror or str(err) or type(err).__name__).lower()


def _task_scores(run: Run, split: str) -> dict:
    """{"acc/<split>": accuracy} for a classification task (val: its first
    finetune.eval_examples; test: all), else {}. Every rank runs the same forwards."""
    if getattr(run.val_split, "label_ids", None) is None:
        return {}
    data = run.val_split if split == "val" else splits.open_split(run.cfg, run.run_dir, split)
    n = run.cfg.finetune.eval_examples if split == "val" else run.cfg.finetune.test_examples
    return {f"acc/{split}": accuracy(run.model, data, run.device, run.cfg.train.batch_size, n, run.autocast)}


def _summary(run: Run, state: _LoopState) -> dict:
    B = run.cfg.train.batch_size
    return {"steps": run.step, "steps_run": run.step - state.first_step,
            "final_train_loss": run.history[-1] if run.history else None,
            "final_val_loss": state.val_loss,
            # the mean over the split's first eval_batches batches (moekit eval RUN: all of them)
            "final_val_windows": eval_windows(run.val_split, B, run.cfg.train.eval_batches),
            "of_val_windows": eval_windows(run.val_split, B, None),
            "train_losses": run.history, "skipped_steps": state.bad_steps,
            "params": state.flops,
            "train_tokens": run.data_meta["train_tokens"],
            "routing_last_interval": {str(i): c for i, c in state.last_loads.items()},
            **({"expert_growths": state.growths} if state.growths else {}),
            **({"scores": state.scores} if state.scores else {})}
