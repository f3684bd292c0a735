"""DP=2, EP=2, FSDP2 and FSDP2 + EP (real gloo processes, parallelize()) train with the same
losses, global gradient norms and routing telemetry totals as one process on the same global
batch, with and without gradient accumulation (gradients reduced in the last micro-batch)."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from moekit.config import ModelConfig, MoEConfig, ParallelConfig
from moekit.model.transformer import MoETransformer
from moekit.parallel.parallelize import build_mesh, clip_grad_norm, parallelize
from moekit.train.telemetry import RoutingTelemetry

from ..conftest import run_ranks

STEPS, B, S, V = 4, 8, 16, 61
AUX = 0.1     # the load-balancing loss is part of the objective: "global" statistics make it exact


def _model() -> MoETransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=S,
                      moe=MoEConfig(d_model=32, d_ff=32, num_experts=4, top_k=2, aux_loss_scope="global"))
    return MoETransformer(cfg)


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, V, (B, S + 1), generator=g) for _ in range(STEPS)]


def _loss(module, tokens):
    out = module(tokens[:, :-1])
    ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
    return ce + AUX * out.aux_loss, out.moe


def _micro(tokens, world, rank, accum, m):
    """Micro-batch m of rank's share: the global batch is split over ranks, then over micro-batches."""
    return tokens.chunk(world)[rank].chunk(accum)[m]


def single_process(world: int, accum: int):
    """Losses, gradient norms and routing telemetry of one process on the same global micro-batches."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)   # SGD: sensitive to gradient scale (Adam is not)
    telemetry = RoutingTelemetry({i: b.ffn for i, b in enumerate(model.blocks)})
    losses, norms = [], []
    for tokens in _batches():
        total = 0.0
        for m in range(accum):
            micro = torch.cat([_micro(tokens, world, r, accum, m) for r in range(world)])
            loss, moe = _loss(model, micro)
            (loss / accum).backward()
            telemetry.update(moe)
            total += float(loss.detach()) / accum
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))))
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, norms, telemetry.flush()


def _worker(rank, world, dp, ep, sharding, accum):
    cfg = ParallelConfig(dp=dp, ep=ep, sharding=sharding)
    mesh = build_mesh(cfg)
    par = parallelize(_model(), mesh, cfg)
    opt = torch.optim.SGD(par.module.parameters(), lr=0.5)
    ep_group = mesh["ep"].get_group() if ep > 1 else None
    telemetry = RoutingTelemetry({i: b.ffn for i, b in enumerate(par.module.blocks)},
                                 all_reduce=dist.all_reduce, world=world)
    losses, norms = [], []
    for tokens in _batches():
        total = torch.zeros(())
        for m in range(accum):
            with par.accumulate(last=m == accum - 1):
                loss, moe = _loss(par.forward, _micro(tokens, world, rank, accum, m))
                (loss / accum).backward()
            telemetry.update(moe)
            total += loss.detach() / accum
        par.sync_expert_grads()
        norms.append(clip_grad_norm(par.module, float("inf"), ep_group))
        opt.step()
        opt.zero_grad()
        dist.all_reduce(total)
        losses.append(float(total) / world)
    flushed = telemetry.flush()      # collective
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in par.module.parameters())
    held = [None] * world
    dist.all_gather_object(held, local)     # parameters each rank holds
    return losses, norms, flushed, held


@pytest.mark.parametrize("dp, ep, sharding, accum", [
    (2, 1, "none", 1), (1, 2, "none", 1), (2, 1, "fsdp", 1), (1, 2, "fsdp", 1), (2, 2, "fsdp", 1),
    (2, 2, "none", 1), (2, 1, "none", 2), (2, 2, "fsdp", 2)])
def test_parallel_training_matches_one_process(dp, ep, sharding, accum):
    world = dp * ep
    losses, norms, (routing, loads, _), held = run_ranks(_worker, world, dp, ep, sharding, accum)[0]
    ref_losses, ref_norms, (ref_routing, ref_loads, _) = single_process(world, accum)
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-5), (losses, ref_losses)
    assert norms == pytest.approx(ref_norms, rel=1e-5), (norms, ref_norms)
    # what each rank holds: DDP a full copy of the non-expert part; FSDP every parameter once
    model = _model()
    n_experts = sum(p.numel() for b in model.blocks for p in b.ffn.experts.parameters())
    n_dense = sum(p.numel() for p in model.parameters()) - n_experts
    if sharding == "none":
        assert held == [n_dense + n_experts // ep] * world
    else:
        assert sum(held) == n_dense + n_experts
        share = n_dense / world + n_experts / (ep * dp)                 # up to uneven-shard rounding
        assert all(abs(h - share) <= 0.05 * share for h in held), (held, share)
    # telemetry totals over all ranks: the one process's counts; aux averaged over ranks
    assert loads == ref_loads
    for key in ("aux_loss", "dead_experts", "load_cv", "logit_max"):
        assert routing[f"moe/layer0/{key}"] == pytest.approx(ref_routing[f"moe/layer0/{key}"], rel=1e-4), key


def test_world_size_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="ParallelConfig.ep=0"):
        ParallelConfig(ep=0)
    with pytest.raises(ValueError, match="ParallelConfig.sharding='zero3'"):
        ParallelConfig(sharding="zero3")


def _reduce_step_worker(rank, world):
    from moekit.train.step import _reduce
    counts = {0: torch.tensor([3, 0, 1 + rank]), 2: torch.tensor([rank, 5])}   # int64, like the router's
    return _reduce({"lm": 1.0 + rank, "aux": 2.0 * rank, "z": 0.5}, counts, world)


def test_one_all_reduce_per_step_averages_losses_and_sums_expert_counts():
    for losses, counts in run_ranks(_reduce_step_worker, 2):
        assert losses == {"lm": 1.5, "aux": 1.0, "z": 0.5}
        assert list(counts) == [0, 2]
        assert counts[0].dtype == torch.int64 and counts[0].tolist() == [6, 0, 3]
        assert counts[2].tolist() == [1, 10]
