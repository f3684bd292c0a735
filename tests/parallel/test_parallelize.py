"""DP=2, EP=2, FSDP2 and FSDP2 + EP (real gloo processes, parallelize()) train with the same
losses and global gradient norms as one process on the same global batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moekit.config import ModelConfig, MoEConfig, ParallelConfig
from moekit.model.transformer import MoETransformer
from moekit.parallel.parallelize import build_mesh, clip_grad_norm, parallelize

STEPS, B, S, V = 4, 4, 16, 61


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
    return ce + AUX * out.aux_loss


def single_process_losses() -> tuple[list[float], list[float]]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)   # SGD: sensitive to gradient scale (Adam is not)
    losses, norms = [], []
    for tokens in _batches():
        loss = _loss(model, tokens)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))))
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses, norms


def _worker(rank, world, port, dp, ep, sharding, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = ParallelConfig(dp=dp, ep=ep, sharding=sharding)
        mesh = build_mesh(cfg)
        par = parallelize(_model(), mesh, cfg)
        opt = torch.optim.SGD(par.module.parameters(), lr=0.5)
        ep_group = mesh["ep"].get_group() if ep > 1 else None
        losses, norms = [], []
        for tokens in _batches():
            mine = tokens.chunk(world)[rank]             # this rank's share of the global batch
            loss = _loss(par.forward, mine)
            loss.backward()
            par.sync_expert_grads()
            norms.append(clip_grad_norm(par.module, float("inf"), ep_group))
            opt.step()
            opt.zero_grad()
            total = loss.detach().clone()
            dist.all_reduce(total)
            losses.append(float(total) / world)
        if rank == 0:
            results.put((losses, norms))
        del par, opt
        dist.barrier()      # no rank tears its gloo pairs down while another still talks
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dp, ep, sharding", [(2, 1, "none"), (1, 2, "none"), (2, 1, "fsdp"), (1, 2, "fsdp"),
                                               (2, 2, "fsdp"), (2, 2, "none")])
def test_parallel_training_matches_one_process(dp, ep, sharding):
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(dp * ep, port, dp, ep, sharding, results), nprocs=dp * ep, join=True)
    losses, norms = results.get()
    ref_losses, ref_norms = single_process_losses()
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-5), (losses, ref_losses)
    assert norms == pytest.approx(ref_norms, rel=1e-5), (norms, ref_norms)


def test_world_size_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="ParallelConfig.ep=0"):
        ParallelConfig(ep=0)
    with pytest.raises(ValueError, match="ParallelConfig.sharding='zero3'"):
        ParallelConfig(sharding="zero3")
