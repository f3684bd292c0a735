"""Setting a run up: the layout, then everything a step needs, in one :class:`Run`.

    cfg = resolve_layout(cfg, world, ...)          # dp x ep for the processes that run
    run = setup(cfg, run_dir)                      # data, model, parallel forward, optimizer, ...
    stats = train_step(run, micro_batches, objective)   # moekit.train.step

Every command that trains composes these two with its own objective (moekit.train.step).
One process or many: under torchrun the process group is joined here, the model is
parallelized from outside (moekit.parallel.parallelize), and every rank gets its own data.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from moekit.config import RunConfig, check_layout
from moekit.data.stream import BatchSampler, PackedSplit
from moekit.finetune import adapt
from moekit.model.transformer import MoETransformer
from moekit.moe.layer import MoELayer
from moekit.parallel.checkpointing import training_state
from moekit.parallel.parallelize import build_mesh, clip_grad_norm, parallelize
from moekit.runtime import tune_cpu_allocator
from moekit.store import run_dir as rd
from moekit.store.checkpoint import Checkpoint
from moekit.train import splits
from moekit.train.optim import build_optimizer, load_named_state
from moekit.train.telemetry import RoutingTelemetry

log = logging.getLogger("moekit")


def device_plan(name: str, cuda_count: int, local_rank: int) -> tuple[torch.device, str]:
    """(this process's device, process-group backend) for ``train.device`` = ``name`` with
    ``cuda_count`` visible CUDA devices; a pure function (tests pass fake counts).

    "auto" is cuda when one is visible. A cuda process takes GPU ``local_rank % cuda_count``
    (more ranks than GPUs share them) and joins NCCL for CUDA tensors, gloo for the CPU ones
    (losses, counts); a cpu process joins gloo only, whatever GPUs are visible."""
    if name == "auto":
        name = "cuda" if cuda_count > 0 else "cpu"
    if name == "cuda" and cuda_count == 0:
        raise ValueError("train.device='cuda' but no CUDA device is visible; "
                         "set train.device to 'cpu' or 'auto'")
    if name == "cuda":
        return torch.device("cuda", local_rank % cuda_count), "cpu:gloo,cuda:nccl"
    return torch.device(name), "gloo"


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def distributed_context(device: str = "auto") -> tuple[int, int]:
    """(rank, world size); under torchrun (WORLD_SIZE > 1) this joins the process group for
    ``train.device`` = ``device`` (:func:`device_plan`): gloo on CPU, NCCL on CUDA, where
    each rank first binds its GPU (``device_id`` lets NCCL set up its communicator eagerly)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        where, backend = device_plan(device, _cuda_count(), _local_rank())
        if where.type == "cuda":
            torch.cuda.set_device(where)
            dist.init_process_group(backend, device_id=where)
        else:
            dist.init_process_group(backend)
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def resolve_device(name: str) -> torch.device:
    return device_plan(name, _cuda_count(), _local_rank())[0]


def auto_precision(device_type: str, bf16_supported: bool) -> str:
    """What precision="auto" means: bf16 on a CUDA GPU with bf16 (Ampere and newer), fp32 on
    older GPUs (V100, T4: bf16 there is emulated and slow; moekit has no fp16 loss scaling) and on
    CPU (fp32 is faster at the recipes' size, docs/benchmarks.md)."""
    return "bf16" if device_type == "cuda" and bf16_supported else "fp32"


def precision_of(cfg: RunConfig, device: torch.device) -> str:
    """"bf16" or "fp32"; "auto" is :func:`auto_precision` of this device."""
    if cfg.train.precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        return auto_precision(device.type, bf16)
    return cfg.train.precision


def autocast(cfg: RunConfig, device: torch.device):
    if precision_of(cfg, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def resolve_layout(cfg: RunConfig, world: int, resume: bool = False, layout: dict | None = None) -> RunConfig:
    """The config with the layout the ``world`` processes use.

    A fresh run: plain torchrun (dp = ep = 1 in the recipe) is data parallel over all ranks;
    otherwise dp x ep must equal ``world``. A resume (``cfg`` holds the saved layout):
    ``layout`` (ParallelConfig fields from ``--set parallel.*``) replaces the saved one;
    without it a different world size keeps ep where it divides (gcd) and falls back from
    FSDP+EP to DDP when dp would not divide the experts' dims. Checkpoints reshard, so any
    layout resumes any other."""
    parallel = cfg.parallel
    if layout:
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
    parallel.check_world(world)
    return cfg if parallel == cfg.parallel else dataclasses.replace(cfg, parallel=parallel)


@dataclass
class Run:
    """Everything a training step needs, built once by :func:`setup`."""

    cfg: RunConfig
    run_dir: Path
    rank: int
    world: int
    device: torch.device
    model: MoETransformer                       # the module itself: state dicts, eval
    forward: Callable                           # what training calls (DDP / compiled / the model)
    optimizer: torch.optim.Optimizer
    sampler: BatchSampler
    train_split: PackedSplit
    val_split: PackedSplit
    tokenizer: object
    data_meta: dict
    moe_layers: dict[int, MoELayer]
    telemetry: RoutingTelemetry | None
    mesh: object = None
    ep_group: object = None
    step: int = 0                               # optimizer steps done
    accumulate: Callable = lambda last: nullcontext()   # one gradient reduction per step
    sync_expert_grads: Callable = lambda: None
    history: list[float] = field(default_factory=list)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return autocast(self.cfg, self.device)

    def clip_grad_norm(self) -> float:
        """Clip to train.grad_clip; returns the global norm before clipping (any layout)."""
        if self.world > 1:
            return clip_grad_norm(self.model, self.cfg.train.grad_clip, self.ep_group)
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip))

    def training_state(self) -> dict:
        return training_state(self.model, self.optimizer, self.mesh)


def _data(cfg: RunConfig, run_dir: Path, rank: int, world: int):
    """Rank 0 trains the tokenizer and builds the token cache; the others then read both."""
    if rank == 0:
        data = splits.prepare_data(cfg, run_dir)
    if world > 1:
        dist.barrier()
    if rank != 0:
        data = splits.prepare_data(cfg, run_dir)
    return data


def _parallel_model(run_cfg: RunConfig, model: MoETransformer, world: int, rank: int, device):
    """(forward, accumulate, sync_expert_grads, mesh, ep_group): parallelized from outside."""
    cfg = run_cfg.train
    if world == 1:
        model.activation_checkpointing = cfg.activation_checkpointing
        # compiled forward, plain module for state dicts (no "_orig_mod." prefixes in checkpoints)
        forward = torch.compile(model) if cfg.compile else model
        return forward, lambda last: nullcontext(), lambda: None, None, None
    mesh = build_mesh(run_cfg.parallel, device.type)
    par = parallelize(model, mesh, run_cfg.parallel, activation_checkpointing=cfg.activation_checkpointing,
                      compile=cfg.compile)
    # the same initial weights everywhere, then each rank its own stream (jitter, noise)
    torch.manual_seed(cfg.seed + 1_000_003 * rank)
    ep_group = mesh["ep"].get_group() if run_cfg.parallel.ep > 1 else None
    return par.forward, par.accumulate, par.sync_expert_grads, mesh, ep_group


def setup(cfg: RunConfig, run_dir: Path, ckpt: Checkpoint | None = None, initial=None) -> Run:
    """Data, model, parallel forward, optimizer, sampler and telemetry for ``cfg`` (its layout
    already resolved, see :func:`resolve_layout`) in ``run_dir``; with ``ckpt`` the state is
    loaded from it (a resume); with ``initial`` (:class:`moekit.store.source.Initial`, a new
    run) the weights and tokenizer are SRC's. Writes no config or metrics: :func:`moekit.train.trainer.train`
    does, around its loop.

    Example:
        >>> cfg = RunConfig.from_dict({"data": {"corpus": "shakespeare"}})    # doctest: +SKIP
        >>> run = setup(cfg, Path("runs/api"))                                # doctest: +SKIP
        >>> from moekit.train.objectives import Batch, Pretraining
        >>> from moekit.train.step import train_step
        >>> batch = Batch(*run.train_split.batch(run.sampler.next()))          # doctest: +SKIP
        >>> train_step(run, [batch], Pretraining()).losses["lm"]               # doctest: +SKIP
    """
    rank, world = distributed_context(cfg.train.device)
    made = None
    if rank == 0:
        if ckpt is None:                        # a new run: not over another run's tokenizer or cache
            rd.check_fresh(Path(run_dir))
        made = rd.create(Path(run_dir), "--out" if ckpt is None else "--resume")   # tokenizer, token cache
    try:
        if initial is not None and rank == 0:   # the data is tokenized with SRC's tokenizer
            rd.save_tokenizer(initial.tokenizer, Path(run_dir) / "tokenizer.json")
        return _build(cfg, Path(run_dir), ckpt, rank, world, initial)
    except BaseException:
        if ckpt is None and rank == 0:          # a new run that failed leaves nothing behind
            rd.discard(Path(run_dir), made)
        raise


def _build(cfg: RunConfig, run_dir: Path, ckpt: Checkpoint | None, rank: int, world: int, initial,
           data: tuple | None = None) -> Run:
    """``data``: (tokenizer, train split, val split, meta) already prepared (a rebuild)."""
    tune_cpu_allocator()
    torch.manual_seed(cfg.train.seed)           # the same initial weights on every rank
    device = resolve_device(cfg.train.device)
    tok, train_split, val_split, meta = data or _data(cfg, run_dir, rank, world)
    _fill_route_tags(cfg, meta)
    model = rd.build_model(rd.model_config_for(cfg, tok.get_vocab_size()), device=device)
    if ckpt is None and initial is not None:    # before parallelizing: SRC's weights, all ranks
        load_initial(model, initial)
    hooks = _finetune(model, cfg, train_split)
    forward, accumulate, sync, mesh, ep_group = _parallel_model(cfg, model, world, rank, device)
    opt = build_optimizer(model, cfg.train)
    if ckpt is None and initial is not None and initial.optim is not None:
        load_named_state(opt, model, initial.optim, mesh)    # train.init_optimizer: SRC's AdamW state
    adapt.register(opt, hooks)
    sampler = (train_split.sampler(cfg.train.batch_size, cfg.train.seed, rank, world)
               if hasattr(train_split, "sampler")       # a mixture draws by its sources' weights
               else BatchSampler(len(train_split), cfg.train.batch_size, cfg.train.seed, rank, world))
    moe_layers = model.moe_layers()
    telemetry = (RoutingTelemetry(moe_layers, all_reduce=dist.all_reduce if world > 1 else None, world=world)
                 if cfg.train.telemetry and moe_layers else None)   # totals over all ranks' tokens
    run = Run(cfg=cfg, run_dir=Path(run_dir), rank=rank, world=world, device=device, model=model,
              forward=forward, optimizer=opt, sampler=sampler, train_split=train_split, val_split=val_split,
              tokenizer=tok, data_meta=meta, moe_layers=moe_layers, telemetry=telemetry, mesh=mesh,
              ep_group=ep_group, accumulate=accumulate, sync_expert_grads=sync)
    if ckpt is not None:
        if not ckpt.load_into(run.training_state(), rank):
            log.info("rank %d: the checkpoint has no RNG state for this rank; random streams restart", rank)
        rd.check_finite(model, run_dir)       # a damaged checkpoint: one line, before anything is written
        sampler.load_state_dict(ckpt.meta["sampler"])
        run.step = ckpt.meta["step"]
        if initial is not None:     # a federated round: the server's weights over the checkpoint's
            load_initial(model, initial)
    model.train()
    return run


def load_initial(model: MoETransformer, initial) -> None:
    """``initial.state`` into ``model``: all of its tensors, or with ``initial.partial`` some of
    them (a federated round's averaged ones; the others keep their values)."""
    if initial.state is None:
        return
    if not initial.partial:
        model.load_state_dict(initial.state)
        return
    own = model.state_dict()
    for key, value in initial.state.items():
        if key not in own or own[key].shape != value.shape:
            raise ValueError(f"the weights given hold {key!r} {tuple(value.shape)}, which this model "
                             f"{'has as ' + str(tuple(own[key].shape)) if key in own else 'does not have'}; "
                             "they belong to another architecture")
        with torch.no_grad():
            own[key].copy_(value)


def _fill_route_tags(cfg: RunConfig, meta: dict) -> None:
    """Task-level routing (model.moe.router_input != "token"): the routers know the data's tags,
    in the data's order (a batch's tags index them). Set in ``cfg`` itself, so config.json (and
    a resume, an export) records them; tags given (or SRC's, with --from) must be the data's."""
    moe = cfg.model.moe
    if moe is None or moe.router_input == "token":
        return
    _no_task_for_tag_routing(cfg)
    tags = list(meta.get("tags") or [])
    if moe.route_tags is None:
        if not tags:
            raise ValueError(f"model.moe.router_input={moe.router_input!r} routes by tag, but the data has "
                             "no tags; use a data.mixture or a corpus with tags, or router_input='token'")
        moe.route_tags = tags
    elif list(moe.route_tags) != tags:
        raise ValueError(f"model.moe.route_tags={moe.route_tags} differs from the data's tags {tags} (in "
                         "order); drop model.moe.route_tags (the run fills it), or give data with those tags")


def _no_task_for_tag_routing(cfg: RunConfig) -> None:
    """A task's split tags its examples by label, not by task: a tag-routed model is fine-tuned
    on a mixture instead (the task's source is one tag of it)."""
    if cfg.data.task is not None and cfg.model.routes_by_tag:
        raise ValueError(f"data.task={cfg.data.task!r}: a model that routes by tag (model.moe.router_input="
                         f"{cfg.model.moe.router_input!r}) is not fine-tuned on a task alone (its examples "
                         "are tagged by label); train it on a mixture that holds the task instead: moekit "
                         "train --from SRC --set data.mixture=[{source=\"task:NAME\"}, ...] (LM loss, no "
                         "accuracy)")


def _finetune(model: MoETransformer, cfg: RunConfig, train_split) -> list:
    """Freezing and LoRA (moekit.finetune.adapt), before the model is parallelized; ESFT's
    experts are chosen here once, from the starting weights' routing of the training split,
    and recorded in ``cfg`` (so config.json, and a resume, has them)."""
    _no_task_for_tag_routing(cfg)
    ft = cfg.finetune
    if ft.freeze == "esft" and ft.esft_experts is None:
        ft.esft_experts = adapt.choose_esft_experts(model, train_split, ft.esft_share)
        log.info("ESFT: training experts %s (share %.2f of the task's routed tokens per layer)",
                 ft.esft_experts, ft.esft_share)
    return adapt.apply(model, ft)


def rebuild(run: Run, cfg: RunConfig, state) -> Run:
    """A new :class:`Run` of ``cfg`` (another model, e.g. grown) on ``run``'s data, loaded from
    ``state``: anything with a checkpoint's ``meta`` and ``load_into`` (moekit.train.growth)."""
    new = _build(cfg, run.run_dir, state, run.rank, run.world, None,
                 (run.tokenizer, run.train_split, run.val_split, run.data_meta))
    new.history = run.history
    return new
