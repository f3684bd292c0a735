"""Growing the number of experts during training: ``train.expert_schedule``.

    [train]
    expert_schedule = "4@0, 8@300, 16@600"   # experts per MoE layer from that step on
    expert_growth = "all"                    # or "most_loaded" (by the routing on validation)
    expert_growth_noise = 0.01               # N(0, s) on the copies' router rows (0: they never diverge)

When a run reaches a step of the schedule (300 steps done), before the next step:

1. the validation loss is measured (``growth/val_before``), with the tokens each expert got
   on those windows (what ``most_loaded`` ranks by: the same windows whenever it runs, so a
   resumed run makes the same choice);
2. the model is grown by :func:`moekit.transform.grow_experts.grow_experts` (copies keep each
   expert's probability mass, aux-loss-free biases and noisy-gating rows are copied) and the
   AdamW moments of every copy are its source's
   (:func:`moekit.train.optim.grow_optimizer_state`; step counts kept);
3. the run is rebuilt on the grown state in its own layout (DDP, FSDP2, expert parallelism,
   compile: :func:`moekit.train.run.rebuild`), with the data position and random streams
   carried over;
4. the validation loss is measured again (``growth/val_after``, ``growth/jump``), and
   ``moe/num_experts`` is logged; config.json and a checkpoint then hold the grown run, so a
   resume from any checkpoint follows the uninterrupted run (a checkpoint from before the
   growth grows again, the same way).

In a parallel run every rank gathers the full state (collectives), grows the same model
(seeded by ``train.seed`` and the step) and takes its own piece of it. A softmax router's
logged ``logit_mean``/``logit_max`` include the -log(c) offsets, so they step down at a
growth without any change of routing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from moekit.config import parse_expert_schedule
from moekit.model.transformer import model_flops
from moekit.parallel.checkpointing import load_full_state
from moekit.store.checkpoint import restore_rng, rng_state
from moekit.store.run_dir import build_model
from moekit.train.evaluate import evaluate
from moekit.train.optim import grow_optimizer_state
from moekit.train.run import Run, rebuild
from moekit.transform.grow_experts import grow_experts

log = logging.getLogger("moekit")


def due(run: Run) -> int | None:
    """The experts per MoE layer the schedule wants now, if more than the run has; else None."""
    target = run.cfg.train.experts_at(run.step)
    return target if target is not None and target > run.cfg.model.moe.num_experts else None


def within(train, max_steps: int) -> dict:
    """{"expert_schedule": the schedule without the growths at or after ``max_steps``} when a
    resumed run is cut short of some (logged); {} when none is."""
    if train.expert_schedule is None:
        return {}
    schedule = parse_expert_schedule(train.expert_schedule)
    kept = [(s, n) for s, n in schedule if s < max_steps]
    if len(kept) == len(schedule):
        return {}
    log.info("train.max_steps=%d comes before the growths at steps %s: the run stops without them "
             "(train.expert_schedule is now %r)", max_steps, [s for s, _ in schedule[len(kept):]],
             ", ".join(f"{n}@{s}" for s, n in kept))
    return {"expert_schedule": ", ".join(f"{n}@{s}" for s, n in kept)}


# bytes per parameter a float32 run holds: the weight, its gradient and AdamW's two moments,
# and a growth's full copies of the state (moekit.train.growth.grow_run) on top
_BYTES_PER_PARAM = 16 + 16


def check_memory(cfg) -> None:
    """A schedule whose largest count cannot fit this machine's memory is one line before any
    step, not an out-of-memory kill at the growth."""
    if cfg.train.expert_schedule is None:
        return
    top = parse_expert_schedule(cfg.train.expert_schedule)[-1][1]
    m = cfg.model
    big = dataclasses.replace(m, vocab_size=max(m.vocab_size, cfg.data.vocab_size),
                              moe=dataclasses.replace(m.moe, num_experts=top))
    need = model_flops(big)["params_total"] * _BYTES_PER_PARAM
    if cfg.train.device != "cpu" and torch.cuda.is_available():
        have, where = torch.cuda.get_device_properties(0).total_memory, "the GPU's"
    else:
        have, where = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "this machine's"
    if need > have:
        raise ValueError(f"train.expert_schedule={cfg.train.expert_schedule!r} grows to {top} experts per "
                         f"MoE layer: about {need / 2**30:.0f} GiB for the weights, gradients, AdamW state "
                         f"and the growth's copies, more than {where} {have / 2**30:.0f} GiB; grow to fewer "
                         "experts")


def check_start(cfg) -> None:
    """A new run starts with the schedule's count at step 0 (a source model's too)."""
    start = cfg.train.experts_at(0)
    if start is None or cfg.model.moe.num_experts == start:
        return
    have, where = cfg.model.moe.num_experts, f"train.expert_schedule={cfg.train.expert_schedule!r}"
    if cfg.train.init_from:
        raise ValueError(f"{where} starts with {start} experts but train.init_from={cfg.train.init_from!r} "
                         f"has {have}; start the schedule at {have}@0")
    raise ValueError(f"{where} starts with {start} experts but model.moe.num_experts={have}; start the "
                     f"schedule at {have}@0 or set num_experts={start}")


class _Grown:
    """The grown training state, read by setup as a checkpoint would be."""

    def __init__(self, state: dict, meta: dict, rng: bytes):
        self.state, self.meta, self.rng = state, meta, rng

    def load_into(self, view: dict, rank: int = 0) -> bool:
        load_full_state(view, self.state)
        restore_rng(self.rng)
        return True


@torch.no_grad()
def full_state(run: Run) -> dict:
    """{"model", "optim"} as full tensors on the CPU, whatever the layout (collective in a
    parallel run: every rank calls it)."""
    def full(t):
        if isinstance(t, DTensor):
            t = t.full_tensor()
        return t.detach().cpu().clone() if isinstance(t, torch.Tensor) else t

    view = run.training_state()
    return {"model": {k: full(v) for k, v in view["model"].items()},
            "optim": {name: {k: full(v) for k, v in entry.items()} for name, entry in view["optim"].items()}}


def grow_run(run: Run, num_experts: int, loads: dict | None = None) -> Run:
    """``run`` with ``num_experts`` experts per MoE layer, its optimizer state grown alike."""
    t = run.cfg.train
    rng = rng_state()               # the random streams go on as they were
    state = full_state(run)
    before = build_model(run.model.cfg)
    before.load_state_dict(state["model"])
    after, mapping = grow_experts(before, num_experts, which=t.expert_growth,
                                  loads=loads if t.expert_growth == "most_loaded" else None,
                                  noise_std=t.expert_growth_noise, seed=t.seed + run.step)
    optim = grow_optimizer_state(state["optim"], before, after, mapping)
    m = run.cfg.model
    cfg = dataclasses.replace(run.cfg, model=dataclasses.replace(
        m, moe=dataclasses.replace(m.moe, num_experts=num_experts)))
    grown = _Grown({"model": after.state_dict(), "optim": optim},
                   {"step": run.step, "sampler": run.sampler.state_dict()}, rng)
    del state, before
    return rebuild(run, cfg, grown)


def grow_now(run: Run, num_experts: int) -> tuple[Run, dict]:
    """(the grown run, the growth's record: step, experts before/after, validation loss before
    and after). Logs one line on the main rank."""
    t = run.cfg.train

    def val(r: Run, loads=None) -> float:
        return evaluate(r.model, r.val_split, t.batch_size, r.device, t.eval_batches, r.rank, r.world,
                        r.autocast, loads=loads)

    loads: dict = {}
    before, old = val(run, loads), run.cfg.model.moe.num_experts
    run = grow_run(run, num_experts, loads)
    after = val(run)
    record = {"step": run.step, "from": old, "to": num_experts, "val_before": before, "val_after": after}
    if run.main:
        log.info("step %d: grew the experts %d -> %d per MoE layer (%s); validation loss %.4f -> %.4f "
                 "(%+.4f)", run.step, old, num_experts, t.expert_growth, before, after, after - before)
    return run, record


def logged_growths(run_dir) -> list[dict]:
    """The growth records a run's metrics.jsonl holds (a resumed run's earlier growths)."""
    path, out = Path(run_dir) / "metrics.jsonl", []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else ():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:        # a torn last line from a kill
            continue
        if isinstance(r, dict) and "growth/jump" in r:
            out.append({"step": r["step"], "from": int(r["growth/experts_before"]),
                        "to": int(r["moe/num_experts"]), "val_before": r["growth/val_before"],
                        "val_after": r["growth/val_after"]})
    return out


def growth_metrics(record: dict) -> dict[str, float]:
    before, after = record["val_before"], record["val_after"]
    return {"moe/num_experts": float(record["to"]), "growth/experts_before": float(record["from"]),
            "growth/val_before": before, "growth/val_after": after, "growth/jump": after - before}
