"""parallelize(model, mesh, cfg): the one place the parallel layout is applied, in the
order torchtitan uses: expert parallelism, activation checkpointing, compile, then data
parallelism (DDP or FSDP2). The model code itself imports nothing distributed.

The mesh is 2-D, ("dp", "ep"): ranks in one "ep" row split the experts between them and
exchange tokens; ranks in one "dp" column hold the same experts. Every rank reads its own
data. Gradients:
- replicated parameters (attention, norms, embeddings, routers): averaged over all ranks
  (DDP or FSDP2);
- expert parameters: summed over the "dp" column and divided by the world size. Each
  expert's local gradient already sums the contributions of every token the "ep" row sent
  it, so this equals the gradient of the mean loss over the global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moekit.config import ParallelConfig
from moekit.moe.layer import MoELayer
from moekit.parallel.expert_parallel import shard_experts


def build_mesh(cfg: ParallelConfig, device_type: str = "cpu") -> DeviceMesh:
    world = dist.get_world_size()
    if cfg.world_size != world:
        raise ValueError(f"parallel.dp x parallel.ep = {cfg.dp} x {cfg.ep} = {cfg.world_size} but "
                         f"{world} processes were launched; set dp*ep to the number of processes")
    return init_device_mesh(device_type, (cfg.dp, cfg.ep), mesh_dim_names=("dp", "ep"))


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, MoELayer) for p in m.experts.parameters()]


@dataclass
class Parallelized:
    forward: nn.Module                      # call this in training (DDP / compiled / the model)
    module: nn.Module                       # the model itself: state dicts, eval
    sync_expert_grads: Callable[[], None]   # call once per optimizer step, after the backward(s)


def parallelize(model: nn.Module, mesh: DeviceMesh, cfg: ParallelConfig, *,
                activation_checkpointing: bool = False, compile: bool = False) -> Parallelized:
    """Apply EP, activation checkpointing, compile and DDP/FSDP2, in that order."""
    world = mesh.size()
    # 1. expert parallelism
    if cfg.ep > 1:
        for m in model.modules():
            if isinstance(m, MoELayer):
                shard_experts(m, group=mesh["ep"].get_group())
    # 2. activation checkpointing
    if hasattr(model, "activation_checkpointing"):
        model.activation_checkpointing = activation_checkpointing
    # 3. compile
    forward = torch.compile(model) if compile else model
    # 4. data parallelism
    if cfg.sharding == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in getattr(model, "blocks", []):
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        return Parallelized(forward, model, lambda: None)
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
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(model)
        return Parallelized(torch.compile(ddp) if compile else ddp, model, sync_expert_grads)
    return Parallelized(forward, model, sync_expert_grads)


def clip_grad_norm(model: nn.Module, max_norm: float, ep_group=None) -> float:
    """Global gradient-norm clipping when experts are sharded: the expert part of the squared
    norm is summed over the "ep" group, so every rank scales by the same coefficient."""
    experts = {id(p) for p in expert_parameters(model)} if ep_group is not None else set()
    grads = [(p.grad, id(p) in experts) for p in model.parameters() if p.grad is not None]
    zero = torch.zeros((), device=grads[0][0].device) if grads else torch.zeros(())
    sq_rep = sum((g.float().square().sum() for g, is_exp in grads if not is_exp), zero)
    sq_exp = sum((g.float().square().sum() for g, is_exp in grads if is_exp), zero.clone())
    if experts:
        dist.all_reduce(sq_exp, group=ep_group)
    norm = float((sq_rep + sq_exp).sqrt())
    coef = min(1.0, max_norm / (norm + 1e-6))
    if coef < 1.0:
        for g, _ in grads:
            g.mul_(coef)
    return norm
