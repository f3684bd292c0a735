"""The training loop: data -> model -> loss -> backward -> optimizer -> metrics, checkpoint.

    loss = lm + aux_loss_coef * sum_layers(load-balancing loss) + z_loss_coef * sum_layers(z-loss)

One process, one device; the aux-loss-free bias update (DeepSeek-V3) runs after the
optimizer step with the expert counts summed over the step's micro-batches. A resumed
run restores model, optimizer, data position and RNG states and follows the uninterrupted
run's losses exactly (on the same machine and thread count).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tokenizers import Tokenizer

from moekit.config import RunConfig, check_layout
from moekit.data.catalog import load_documents
from moekit.data.stream import BatchSampler, PackedSplit, build_token_cache, is_val_doc
from moekit.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from moekit.model.transformer import MoETransformer, model_flops
from moekit.moe.layer import MoELayer
from moekit.parallel.checkpointing import training_state
from moekit.parallel.parallelize import build_mesh, clip_grad_norm, parallelize
from moekit.runtime import tune_cpu_allocator
from moekit.train.checkpoint import Checkpoint, find_checkpoint, save_checkpoint, save_sharded_checkpoint
from moekit.train.metrics import MetricsWriter, mfu
from moekit.train.optim import build_optimizer, lr_at
from moekit.train.telemetry import RoutingTelemetry

log = logging.getLogger("moekit")


def distributed_context() -> tuple[int, int]:
    """(rank, world size); under torchrun (WORLD_SIZE > 1) this joins the process group:
    gloo on CPU, NCCL on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("cpu:gloo,cuda:nccl")   # CPU tensors (losses, counts) too
        else:
            dist.init_process_group("gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _reduce_step(losses: list[float], counts: dict, world: int) -> tuple[list[float], dict]:
    """One all-reduce per step: the losses averaged over ranks and the per-expert token counts
    (aux-loss-free layers: every rank must move its router bias the same way) summed."""
    parts = [torch.tensor(losses, dtype=torch.float64)] + [c.double().cpu() for c in counts.values()]
    flat = torch.cat(parts)
    dist.all_reduce(flat)
    pieces = flat.split([len(t) for t in parts])
    summed = {i: t.to(c.device, c.dtype) for (i, c), t in zip(counts.items(), pieces[1:])}
    return (pieces[0] / world).tolist(), summed


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("TrainConfig.device='cuda' but no CUDA device is visible; "
                         "use device='cpu' or 'auto'")
    return torch.device(name)


def prepare_data(cfg: RunConfig, run_dir: Path):
    """(tokenizer, train split, val split, token-cache meta); the tokenizer is trained once
    on the training documents and saved in the run directory."""
    docs = load_documents(cfg.data.corpus)
    if cfg.data.max_docs is not None:
        docs = docs[: cfg.data.max_docs]
    tok_path = run_dir / "tokenizer.json"
    if tok_path.exists():
        tok = load_tokenizer(tok_path)
    else:
        train_texts = (d.text for i, d in enumerate(docs) if not is_val_doc(i, cfg.data.val_fraction))
        tok = train_tokenizer(train_texts, cfg.data.vocab_size)
        save_tokenizer(tok, tok_path)
    meta = build_token_cache(docs, tok, run_dir / "data", cfg.data.val_fraction)
    train = PackedSplit.open(run_dir / "data", "train", cfg.data.seq_len)
    val = PackedSplit.open(run_dir / "data", "val", cfg.data.seq_len)
    if len(val) == 0:
        raise ValueError(f"the validation split of {cfg.data.corpus!r} has fewer than seq_len+1="
                         f"{cfg.data.seq_len + 1} tokens; use more documents or a larger val_fraction")
    return tok, train, val, meta


def model_config_for(cfg: RunConfig, vocab_size: int):
    return dataclasses.replace(cfg.model, vocab_size=vocab_size,
                               max_seq_len=max(cfg.model.max_seq_len, cfg.data.seq_len))


def precision_of(cfg: RunConfig, device: torch.device) -> str:
    """"bf16" or "fp32"; "auto" is bf16 on CUDA and fp32 on CPU (faster at the recipes' size)."""
    if cfg.train.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return cfg.train.precision


def autocast(cfg: RunConfig, device: torch.device):
    if precision_of(cfg, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())


@torch.no_grad()
def evaluate(model, val: PackedSplit, cfg: RunConfig, device: torch.device, batches: int | None,
             rank: int = 0, world: int = 1) -> float:
    """Mean LM loss over the first ``batches`` x batch_size windows of the validation split
    (all whole batches if None). The same windows for every layout: with several ranks, rank
    r takes windows r, r + world, ... and the sums are all-reduced. Every rank runs the same
    number of forward passes (a rank out of windows runs one with weight 0), since FSDP and
    expert parallelism communicate inside the forward."""
    was_training = model.training
    model.eval()
    B = cfg.train.batch_size
    n = len(val) // B if batches is None else min(batches, max(1, len(val) // B))
    windows = min(max(n, 1) * B, len(val))
    mine = list(range(rank, windows, world))
    calls = math.ceil(math.ceil(windows / world) / B)
    total, count = 0.0, 0
    for b in range(calls):
        idx = mine[b * B:(b + 1) * B]
        weight = len(idx)
        x, y, _ = val.batch(idx or [0])
        with autocast(cfg, device):
            out = model(x.to(device))
        total += float(lm_loss(out.logits, y.to(device))) * weight
        count += weight
    if world > 1:
        sums = torch.tensor([total, count], dtype=torch.float64)
        dist.all_reduce(sums)
        total, count = sums.tolist()
    model.train(was_training)
    return total / count


def train(cfg: RunConfig, run_dir: Path, resume: bool = False, progress: bool = True,
          stop_at: int | None = None, layout: dict | None = None) -> dict:
    """Train (or resume) the run in ``run_dir``; returns a summary dict.

    ``stop_at``: stop after that step with a checkpoint, as if preempted (the schedule still
    runs to ``max_steps``, so a resume continues the same trajectory).
    ``layout``: on resume, ParallelConfig fields to use instead of the saved ones (e.g.
    {"dp": 2, "ep": 1}); without it a different number of processes picks a layout itself."""
    run_dir = Path(run_dir)
    rank, world = distributed_context()
    main = rank == 0
    ckpt = None
    if resume:
        ckpt = Checkpoint(run_dir)
        cfg = RunConfig.from_dict(ckpt.meta["config"])
    elif (found := find_checkpoint(run_dir)) is not None:
        raise ValueError(f"{str(run_dir)!r} already holds a run ({found.name}); resume it with "
                         f"--resume {run_dir} or choose another --out")
    parallel = cfg.parallel
    if resume and layout:                           # checkpoints reshard: any layout resumes any other
        unknown = set(layout) - {f.name for f in dataclasses.fields(parallel)}
        if unknown:
            raise ValueError(f"--set parallel.{sorted(unknown)[0]}: not a parallel setting; use "
                             "parallel.dp, parallel.ep or parallel.sharding")
        parallel = dataclasses.replace(parallel, **layout)
    elif resume and parallel.world_size != world:
        ep = math.gcd(world, parallel.ep)
        parallel = dataclasses.replace(parallel, dp=world // ep, ep=ep)
        try:
            check_layout(parallel, cfg.model)
        except ValueError:      # FSDP+EP shards the experts' dims by dp: fall back to DDP
            parallel = dataclasses.replace(parallel, sharding="none")
    if world > 1 and parallel.world_size == 1:      # plain torchrun: data parallel over all ranks
        parallel = dataclasses.replace(parallel, dp=world)
    elif parallel.world_size != world:
        raise ValueError(f"parallel.dp x parallel.ep = {parallel.world_size} but {world} process(es) run; "
                         f"launch {parallel.world_size} (torchrun --nproc-per-node) or change parallel.dp/ep")
    saved = cfg.parallel
    if parallel != saved:
        cfg = dataclasses.replace(cfg, parallel=parallel)   # checks the layout; config.json and every
        # checkpoint record the layout in use
        if resume and main:
            log.info("resuming a %d-process run on %d process(es)%s; the global batch is "
                     "batch_size x %d = %d sequences (it was %d)", saved.world_size, world,
                     f": parallel = {parallel}" if world > 1 else "", world, cfg.train.batch_size * world,
                     cfg.train.batch_size * saved.world_size)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    tune_cpu_allocator()
    torch.manual_seed(cfg.train.seed)           # the same initial weights on every rank
    device = resolve_device(cfg.train.device)
    if main:                                   # rank 0 trains the tokenizer and builds the cache
        tok, train_split, val_split, meta = prepare_data(cfg, run_dir)
    if world > 1:
        dist.barrier()
    if not main:                               # the others find both and read them
        tok, train_split, val_split, meta = prepare_data(cfg, run_dir)
    mcfg = model_config_for(cfg, tok.get_vocab_size())
    model = MoETransformer.build(mcfg, device=device)
    ep_group = mesh = None
    if world > 1:
        mesh = build_mesh(parallel, device.type)
        par = parallelize(model, mesh, parallel, activation_checkpointing=cfg.train.activation_checkpointing,
                          compile=cfg.train.compile)
        forward, sync_expert_grads, accumulate = par.forward, par.sync_expert_grads, par.accumulate
        ep_group = mesh["ep"].get_group() if parallel.ep > 1 else None
    else:
        model.activation_checkpointing = cfg.train.activation_checkpointing
        # compiled forward, plain module for state dicts (no "_orig_mod." prefixes in checkpoints)
        forward = torch.compile(model) if cfg.train.compile else model
        sync_expert_grads = lambda: None  # noqa: E731
        accumulate = lambda last: nullcontext()  # noqa: E731
    if world > 1:       # the same initial weights everywhere, then each rank its own stream (jitter, noise)
        torch.manual_seed(cfg.train.seed + 1_000_003 * rank)
    opt = build_optimizer(model, cfg.train)
    sampler = BatchSampler(len(train_split), cfg.train.batch_size, cfg.train.seed, rank, world)
    step = 0
    if ckpt is not None:
        if not ckpt.load_into(training_state(model, opt, mesh), rank):
            log.info("rank %d: the checkpoint has no RNG state for this rank; random streams restart", rank)
        sampler.load_state_dict(ckpt.meta["sampler"])
        step = ckpt.meta["step"]
        ckpt = None                            # release a consolidated state's memory
    moe_layers = {i: b.ffn for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoELayer)}
    flops = model_flops(mcfg, cfg.data.seq_len)
    writer = MetricsWriter(run_dir) if main else None
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len * world   # all ranks
    bar = None
    if progress and main:
        from tqdm import tqdm
        bar = tqdm(total=cfg.train.max_steps, initial=step, unit="step", dynamic_ncols=True)
    model.train()
    history, val_loss = [], None
    train_time, interval_steps = 0.0, 0    # this log interval's step time (no eval/saving) and steps
    telemetry = (RoutingTelemetry(moe_layers, all_reduce=dist.all_reduce if world > 1 else None, world=world)
                 if cfg.train.telemetry and moe_layers else None)   # totals over all ranks' tokens
    last_loads: dict[int, list[float]] = {}
    try:
        end = cfg.train.max_steps if stop_at is None else min(stop_at, cfg.train.max_steps)
        while step < end:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg.train)
            t_step = time.perf_counter()
            counts = {i: 0 for i, layer in moe_layers.items() if layer.cfg.aux_loss_free}
            lm_sum = aux_sum = z_sum = 0.0
            for micro in range(cfg.train.grad_accum):
                x, y, _ = train_split.batch(sampler.next())
                with accumulate(micro == cfg.train.grad_accum - 1):   # one gradient reduction per step
                    with autocast(cfg, device):
                        out = forward(x.to(device))
                    lm = lm_loss(out.logits, y.to(device))
                    loss = lm + cfg.train.aux_loss_coef * out.aux_loss + cfg.train.z_loss_coef * out.z_loss
                    (loss / cfg.train.grad_accum).backward()
                lm_sum += float(lm.detach())
                aux_sum += float(out.aux_loss.detach())
                z_sum += float(out.z_loss.detach())
                for i in counts:            # aux-loss-free layers: tokens per expert for the bias
                    counts[i] = counts[i] + out.moe[i].tokens_per_expert
                if telemetry is not None:
                    telemetry.update(out.moe)
            sync_expert_grads()
            if world > 1:
                (lm_sum, aux_sum, z_sum), counts = _reduce_step([lm_sum, aux_sum, z_sum], counts, world)
                # sharded and expert-parallel gradients: a global norm
                grad_norm = clip_grad_norm(model, cfg.train.grad_clip, ep_group)
            else:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip))
            opt.step()
            opt.zero_grad(set_to_none=True)
            for i, c in counts.items():
                moe_layers[i].update_router_bias(c)
            step += 1
            train_time += time.perf_counter() - t_step
            interval_steps += 1
            k = cfg.train.grad_accum
            history.append(lm_sum / k)
            if bar is not None:
                bar.update(1)
                rate = bar.format_dict.get("rate") or 0.0
                bar.set_postfix(loss=f"{lm_sum / k:.3f}", aux=f"{aux_sum / k:.3f}",
                                tok_s=f"{rate * tokens_per_step:,.0f}")
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                tps = tokens_per_step * interval_steps / train_time   # evaluation and saving excluded
                train_time, interval_steps = 0.0, 0
                metrics = {"loss/lm": lm_sum / k, "loss/aux": aux_sum / k, "loss/z": z_sum / k,
                           "optim/lr": lr_at(step - 1, cfg.train), "optim/grad_norm": grad_norm,
                           "perf/tokens_per_s": tps, "perf/tokens_per_s_per_rank": tps / world,
                           "perf/mfu": mfu(flops["flops_per_token"], tps / world, device.type,
                                           precision_of(cfg, device))}
                if telemetry is not None:
                    routing, loads, warnings = telemetry.flush()
                    metrics.update(routing)
                    metrics.update({f"moe/layer{i}/load": c for i, c in loads.items()})
                    if writer is not None:
                        writer.histograms(step, {f"moe/layer{i}/tokens_per_expert": c
                                                 for i, c in loads.items()})
                    last_loads = loads or last_loads
                    for w in warnings if main else ():
                        log.warning("step %d: %s", step, w)
                if writer is not None:
                    writer.log(step, metrics)
            if step % cfg.train.eval_every == 0 or step == cfg.train.max_steps:
                val_loss = evaluate(model, val_split, cfg, device, cfg.train.eval_batches, rank, world)
                if writer is not None:
                    writer.log(step, {"loss/val": val_loss, "loss/val_ppl": math.exp(min(val_loss, 50))})
            if step % cfg.train.save_every == 0 or step in (cfg.train.max_steps, end):
                ckpt_meta = {"step": step, "sampler": sampler.state_dict(), "config": cfg.to_dict(),
                        "tokenizer": tok.to_str()}
                if world > 1:   # sharded: every rank writes its own pieces
                    save_sharded_checkpoint(run_dir, training_state(model, opt, mesh), ckpt_meta)
                else:
                    save_checkpoint(run_dir, training_state(model, opt), ckpt_meta)
    finally:
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()
    return {"steps": step, "final_train_loss": history[-1] if history else None, "final_val_loss": val_loss,
            "train_losses": history, "params": flops, "train_tokens": meta["train_tokens"],
            "routing_last_interval": {str(i): c for i, c in last_loads.items()}}


def load_run(run_dir: Path):
    """(model in eval mode, tokenizer, config) of a run directory (either checkpoint container)
    or of a ``moekit export`` directory, on one process."""
    run_dir = Path(run_dir)
    if (run_dir / EXPORT_WEIGHTS).exists():
        return _load_export(run_dir)
    ckpt = Checkpoint(run_dir)
    cfg = RunConfig.from_dict(ckpt.meta["config"])
    if (run_dir / "tokenizer.json").exists():
        tok = load_tokenizer(run_dir / "tokenizer.json")
    else:   # the checkpoint carries its tokenizer too
        tok = Tokenizer.from_str(ckpt.meta["tokenizer"])
    model = MoETransformer.build(model_config_for(cfg, tok.get_vocab_size()), device="cpu")
    model.load_state_dict(ckpt.model_state(model.state_dict()))
    return model.eval(), tok, cfg


EXPORT_WEIGHTS = "model.safetensors"


def export_run(run_dir: Path, out_dir: Path) -> Path:
    """A consolidated single-device copy of a run's model (from either checkpoint container):
    ``model.safetensors``, ``config.json`` and ``tokenizer.json`` in ``out_dir``, which
    ``load_run`` (so ``moekit generate`` / ``eval``) reads like a run directory."""
    from safetensors.torch import save_file
    model, tok, cfg = load_run(run_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # tied embeddings share storage: safetensors stores each tensor once, so save the
    # untied keys and let the model re-tie on load
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (cfg.model.tie_embeddings and k == "lm_head.weight")}
    save_file(state, str(out_dir / EXPORT_WEIGHTS), metadata={"format": "moekit"})
    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    save_tokenizer(tok, out_dir / "tokenizer.json")
    return out_dir


def _load_export(out_dir: Path):
    from safetensors.torch import load_file
    cfg = RunConfig.from_dict(json.loads((out_dir / "config.json").read_text()))
    tok = load_tokenizer(out_dir / "tokenizer.json")
    model = MoETransformer.build(model_config_for(cfg, tok.get_vocab_size()), device="cpu")
    state = load_file(str(out_dir / EXPORT_WEIGHTS))
    if cfg.model.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state)
    return model.eval(), tok, cfg
