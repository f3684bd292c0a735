"""The training state in its global layout, whatever the parallel layout: what checkpoints
save and load, so that a run saved with one layout resumes with any other.

``training_state(model, opt, mesh)`` returns

    {"model": {state-dict key: tensor}, "optim": {parameter name: {"step", "exp_avg", "exp_avg_sq"}}}

where every tensor has its single-device (global) shape and shares storage with the live
model or optimizer, so loading into it loads the run:
- one process, or a replicated parameter under DDP: the plain tensor;
- FSDP2: the DTensor FSDP already holds (sharded over its mesh);
- an expert-parallel expert weight or moment (this rank's [E/ep, ...] slice): a DTensor on
  the ("dp", "ep") mesh with the slice's place in [E, ...]: placements (Replicate, Shard(0))
  under DDP, (Shard(1), Shard(0)) under FSDP2 (parallelize shards experts on dim 1 along "dp").

``torch.distributed.checkpoint`` saves this from every rank (each piece once) and loads it
into another layout's view, resharding as needed; ``load_full_state`` loads a consolidated
(single-device) state into any view.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from moekit.moe.layer import moe_layers

MOMENTS = ("exp_avg", "exp_avg_sq")


def expert_parallel_names(model: nn.Module) -> dict[str, int]:
    """{parameter name: global number of experts} for the expert weights of EP-sharded layers."""
    out = {}
    for prefix, layer in moe_layers(model).items():
        if layer.experts_sharded:
            for name, _ in layer.experts.named_parameters():
                out[f"{prefix}.experts.{name}" if prefix else f"experts.{name}"] = layer.cfg.num_experts
    return out


def ensure_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Create AdamW's state (step 0, zero moments) for parameters that have none yet: the same
    state AdamW creates lazily, but present before a checkpoint is loaded into it."""
    for group in opt.param_groups:
        for p in group["params"]:
            if not opt.state[p]:
                opt.state[p] = {"step": torch.tensor(0.0, dtype=torch.float32),
                                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def _global_expert(t: torch.Tensor, num_experts: int, mesh: DeviceMesh) -> DTensor:
    local = (t.to_local() if isinstance(t, DTensor) else t).detach()
    shape = torch.Size((num_experts, *t.shape[1:]))            # a DTensor's shape is already global on "dp"
    placements = (Shard(1) if isinstance(t, DTensor) else Replicate(), Shard(0))
    stride = tuple(torch.empty(shape, device="meta").stride())
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=stride)


@torch.no_grad()
def training_state(model: nn.Module, opt: torch.optim.Optimizer, mesh: DeviceMesh | None = None) -> dict:
    """The model and optimizer state in global shapes, sharing storage with the live tensors."""
    ensure_optimizer_state(opt)
    experts = expert_parallel_names(model)
    if experts and mesh is None:
        raise ValueError("training_state: the model has expert-parallel layers; pass the ('dp', 'ep') mesh")

    def view(name: str, t: torch.Tensor) -> torch.Tensor:
        return _global_expert(t, experts[name], mesh) if name in experts else t.detach()

    model_sd = {k: view(k, v) for k, v in model.state_dict().items()}
    optim = {}
    trained = {id(p) for group in opt.param_groups for p in group["params"]}
    for name, p in model.named_parameters():
        if id(p) not in trained:        # frozen (fine-tuning): no optimizer state
            continue
        s = opt.state[p]
        optim[name] = {"step": s["step"], **{m: view(name, s[m]) for m in MOMENTS}}
    return {"model": model_sd, "optim": optim}


@torch.no_grad()
def load_full_state(view: dict, full: dict, path: str = "") -> None:
    """Copy a consolidated state (plain full tensors, same nesting) into ``view``: each rank
    takes its own piece of every DTensor. Missing or misshaped entries are a clear error."""
    for key, target in view.items():
        where = f"{path}.{key}" if path else key
        if key not in full:
            raise ValueError(f"checkpoint has no {where!r}: it was saved by another model; "
                             "resume with the model it was trained with")
        src = full[key]
        if isinstance(target, dict):
            load_full_state(target, src, where)
            continue
        if tuple(src.shape) != tuple(target.shape):
            raise ValueError(f"checkpoint {where!r} has shape {tuple(src.shape)} but the model has "
                             f"{tuple(target.shape)}; resume with the model it was trained with")
        if isinstance(target, DTensor):   # this rank's piece, cut locally (no communication)
            piece = distribute_tensor(src.to(target.device), target.device_mesh, target.placements,
                                      src_data_rank=None)
            target.to_local().copy_(piece.to_local())
        else:
            target.copy_(src)
