"""parallelize(model, mesh, cfg): the one place the parallel layout is applied, in the
order torchtitan uses: expert parallelism, activation checkpointing, compile, then data
parallelism (DDP or FSDP2). The model code itself imports nothing distributed.

The mesh is 2-D, ("dp", "ep"): ranks in one "ep" row split the experts between them and
exchange tokens; ranks in one "dp" column hold the same experts. Every rank reads its own
data. Gradients:
- non-expert parameters (attention, norms, embeddings, routers): averaged over all ranks
  (DDP, or FSDP2 sharded over all ranks);
- expert parameters: summed over the "dp" column and divided by the world size. Each
  expert's local gradient already sums the contributions of every token the "ep" row sent
  it, so this equals the gradient of the mean loss over the global batch. With DDP this is
  sync_expert_grads(); with FSDP2 the experts are sharded along "dp" (on their second
  dimension, so a checkpoint can name every shard's place in the global [E, ...] tensor)
  and FSDP's reduce-scatter sums and divides by the world size itself.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moekit.config import ParallelConfig, check_layout
from moekit.model.config import ModelConfig
from moekit.moe.balance import StatsReducer
from moekit.moe.layer import moe_layers
from moekit.parallel.expert_parallel import shard_experts


def build_mesh(cfg: ParallelConfig, device_type: str = "cpu") -> DeviceMesh:
    cfg.check_world(dist.get_world_size(), "processes were launched")
    return init_device_mesh(device_type, (cfg.dp, cfg.ep), mesh_dim_names=("dp", "ep"))


def leave_process_group() -> None:
    """Every rank's last collective: a barrier (no rank tears its connections down while another
    still talks; a 4-rank gloo teardown hung without it), destroy the process group, then free
    now whatever still references gloo objects: one freed during interpreter finalization can
    abort the process after a run that succeeded."""
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in moe_layers(model).values() for p in m.experts.parameters()]


@dataclass
class Parallelized:
    forward: nn.Module                      # call this in training (DDP / compiled / the model)
    module: nn.Module                       # the model itself: state dicts, eval
    sync_expert_grads: Callable[[], None]   # call once per optimizer step, after the backward(s)
    ddp: nn.parallel.DistributedDataParallel | None = None

    def accumulate(self, last: bool):
        """Context for one micro-batch's forward and backward under gradient accumulation:
        gradients are reduced across ranks in the last micro-batch only (DDP ``no_sync``,
        FSDP2 ``set_requires_gradient_sync``); the sum is the same, the traffic 1/k."""
        if self.ddp is not None:
            return nullcontext() if last else self.ddp.no_sync()
        if hasattr(self.module, "set_requires_gradient_sync"):       # FSDP2
            self.module.set_requires_gradient_sync(last)
        return nullcontext()


def parallelize(model: nn.Module, mesh: DeviceMesh, cfg: ParallelConfig, *,
                activation_checkpointing: bool = False, compile: bool = False) -> Parallelized:
    """Apply EP, activation checkpointing, compile and DDP/FSDP2, in that order."""
    if isinstance(getattr(model, "cfg", None), ModelConfig):
        check_layout(cfg, model.cfg)        # one clear line instead of an error deep in FSDP or EP
    world = mesh.size()
    layers = moe_layers(model)
    global_stats = [m for m in layers.values() if m.cfg.aux_loss_scope == "global"]
    if global_stats and world > 1:
        # global load-balancing statistics: a sum over all ranks, on a group of their own so
        # they never interleave with DDP/FSDP traffic (activation checkpointing recomputes them)
        reducer = StatsReducer(partial(dist.all_reduce, group=dist.new_group()), world)
        for m in global_stats:
            m.stats_reducer = reducer
    # 1. expert parallelism
    if cfg.ep > 1:
        for m in layers.values():
            shard_experts(m, group=mesh["ep"].get_group())
    # 2. activation checkpointing
    if hasattr(model, "activation_checkpointing"):
        model.activation_checkpointing = activation_checkpointing
    # 3. compile, 4. data parallelism. torch.compile wraps without changing the module, so FSDP2
    # shards the model in place under its compiled wrapper; DDP is compiled whole (PyTorch's advice)
    if cfg.sharding == "fsdp":
        _fully_shard(model, mesh, cfg)
        return Parallelized(torch.compile(model) if compile else model, model, lambda: None)
    experts = expert_parameters(model) if cfg.ep > 1 else []
    if experts:
        # DDP must not average expert gradients over all ranks: they differ per "ep" rank
        names = [n for n, p in model.named_parameters() if any(p is e for e in experts)]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    dp_group = mesh["dp"].get_group()

    def sync_expert_grads() -> None:
        for p in experts:
            if p.grad is None:
                continue
            if cfg.dp > 1:
                dist.all_reduce(p.grad, group=dp_group)
            p.grad.div_(world)
    ddp = nn.parallel.DistributedDataParallel(model)
    return Parallelized(torch.compile(ddp) if compile else ddp, model, sync_expert_grads, ddp)


def _fully_shard(model: nn.Module, mesh: DeviceMesh, cfg: ParallelConfig) -> None:
    """FSDP2: experts along "dp" (ep > 1), then every block and the root over all ranks."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
    world_mesh = mesh["dp"] if cfg.ep == 1 else init_device_mesh(
        mesh.device_type, (mesh.size(),), mesh_dim_names=("world",))
    if cfg.ep > 1:
        for m in moe_layers(model).values():
            fully_shard(m.experts, mesh=mesh["dp"], shard_placement_fn=lambda p: Shard(1))
            # reduced expert grad = sum over "dp" / world size. With dp > 1: sum, then divide
            # (gloo has no PREMUL_SUM); with dp = 1 FSDP divides once by itself (forcing the
            # sum there divides twice in torch 2.13).
            m.experts.set_force_sum_reduction_for_comms(cfg.dp > 1)
            m.experts.set_gradient_divide_factor(float(mesh.size()))
    for block in getattr(model, "blocks", []):
        fully_shard(block, mesh=world_mesh)
    fully_shard(model, mesh=world_mesh)


def clip_grad_norm(model: nn.Module, max_norm: float, ep_group=None) -> float:
    """Global gradient-norm clipping for any layout, with every rank scaling by the same
    coefficient. Squared norms: sharded (FSDP2 DTensor) gradients add their local shards over
    all ranks; expert gradients under DDP + EP add over the "ep" group (each rank holds other
    experts); replicated gradients count once."""
    from torch.distributed.tensor import DTensor
    experts = {id(p) for p in expert_parameters(model)} if ep_group is not None else set()
    grads = [p for p in model.parameters() if p.grad is not None]
    device = (grads[0].grad.to_local() if isinstance(grads[0].grad, DTensor) else grads[0].grad).device \
        if grads else torch.device("cpu")
    sq = {kind: torch.zeros((), device=device) for kind in ("replicated", "experts", "sharded")}
    for p in grads:
        g = p.grad
        kind = "sharded" if isinstance(g, DTensor) else "experts" if id(p) in experts else "replicated"
        sq[kind] += (g.to_local() if kind == "sharded" else g).float().square().sum()
    if experts:
        dist.all_reduce(sq["experts"], group=ep_group)
    if dist.is_initialized() and any(isinstance(p.grad, DTensor) for p in grads):
        dist.all_reduce(sq["sharded"])
    norm = float(sum(sq.values()).sqrt())
    coef = min(1.0, max_norm / (norm + 1e-6))
    if coef < 1.0:
        for p in grads:
            p.grad.mul_(coef)
    return norm
