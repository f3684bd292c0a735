"""EP=2 on two real gloo processes against the single-process layer: outputs and every
gradient, including a rank whose experts receive no tokens and a rank with no tokens."""

import copy

import pytest
import torch
import torch.distributed as dist

from moekit import MoEConfig, MoELayer
from moekit.config import ParallelConfig
from moekit.moe import StatsReducer
from moekit.parallel.expert_parallel import shard_experts
from moekit.parallel.parallelize import build_mesh

from ..conftest import run_ranks

TOKENS = {"normal": (13, 7), "empty_rank": (11, 0)}


def _worker(rank: int, world: int, case: str, cfg_kw: dict):
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, d_ff=16, **cfg_kw)
    ref = MoELayer(cfg)
    if case == "idle_experts":   # every token picks experts 0 and 1: rank 1's experts get nothing
        with torch.no_grad():
            ref.router.weight_ED.zero_()
            ref.router.weight_ED[0] = 2.0
            ref.router.weight_ED[1] = 1.0
    ep = copy.deepcopy(ref)
    shard_experts(ep)
    counts = TOKENS.get(case, TOKENS["normal"])
    draw = torch.rand if case == "idle_experts" else torch.randn   # rand > 0: expert 0 wins
    gen = [torch.Generator().manual_seed(10 + r) for r in range(world)]
    xs = [draw(n, 16, generator=g) for n, g in zip(counts, gen)]
    gs = [torch.randn(n, 16, generator=g) for n, g in zip(counts, gen)]
    # single process: the whole global batch through the full layer
    x_all = torch.cat(xs).requires_grad_()
    y_all, _ = ref(x_all)
    (y_all * torch.cat(gs)).sum().backward()
    # expert parallel: this rank's tokens only
    x = xs[rank].clone().requires_grad_()
    y, aux = ep(x)
    (y * gs[rank]).sum().backward()
    start = sum(counts[:rank])
    torch.testing.assert_close(y, y_all[start:start + counts[rank]].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_all.grad[start:start + counts[rank]], rtol=1e-5, atol=1e-5)
    lo, hi = ep.expert_range
    assert (lo, hi) == (rank * cfg.num_experts // world, (rank + 1) * cfg.num_experts // world)
    for name in ("w_gate_EDF", "w_up_EDF", "w_down_EFD"):
        if getattr(ref.experts, name) is None:   # GELU experts have no gate
            continue
        expected = getattr(ref.experts, name).grad[lo:hi]
        got = getattr(ep.experts, name).grad
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=name)
    for name, p in ep.router.named_parameters():     # weight_ED (and null_ND for null experts)
        router_grad = p.grad.clone()
        dist.all_reduce(router_grad)          # replicated parameter: DDP/FSDP sums it over ranks
        torch.testing.assert_close(router_grad, ref.router.get_parameter(name).grad, rtol=1e-5, atol=1e-5)
    assert aux.tokens_per_expert.shape == (cfg.num_experts,)
    if cfg.dynamic:   # each rank's tokens routed as one process routes them: the same histogram
        _, aux_all = ref(x_all.detach())
        hist = aux.experts_per_token.clone()
        dist.all_reduce(hist)
        assert torch.equal(hist, aux_all.experts_per_token)
    # aux_loss_scope="global": the mean of the ranks' load-balancing losses is the loss of
    # the whole batch, and so is the summed router gradient (uneven and empty ranks too)
    ep.stats_reducer = StatsReducer(dist.all_reduce, world)
    ref.router.weight_ED.grad = ep.router.weight_ED.grad = None
    lb_all = ref(x_all.detach())[1].load_balancing_loss
    lb_all.backward()
    lb = ep(xs[rank])[1].load_balancing_loss
    (lb / world).backward()
    mean = lb.detach().clone()
    dist.all_reduce(mean)
    torch.testing.assert_close(mean / world, lb_all.detach(), rtol=1e-5, atol=1e-6)
    router_grad = ep.router.weight_ED.grad.clone()
    dist.all_reduce(router_grad)
    torch.testing.assert_close(router_grad, ref.router.weight_ED.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case, cfg_kw", [
    ("normal", dict(num_experts=4, top_k=2)),
    ("normal", dict(num_experts=8, top_k=3, activation="gelu")),
    ("normal", dict(num_experts=4, top_k=2, capacity_factor=8.0)),
    ("idle_experts", dict(num_experts=4, top_k=2)),
    ("empty_rank", dict(num_experts=4, top_k=2)),
    # a dynamic number of experts per token: variable per-token counts through the all-to-all
    ("normal", dict(num_experts=4, dynamic_k="top_p", top_p=0.6)),
    ("normal", dict(num_experts=4, top_k=3, dynamic_k="null", num_null_experts=2)),
    ("normal", dict(num_experts=4, dynamic_k="relu", max_k=3)),
    ("empty_rank", dict(num_experts=4, dynamic_k="top_p", top_p=0.9, capacity_factor=2.0)),
])
def test_ep2_equals_single_process(case, cfg_kw):
    run_ranks(_worker, 2, case, cfg_kw)


def _drops_worker(rank: int, world: int, cfg_kw: dict):
    """Capacity under EP is per source rank: compare each rank with the full layer on its own
    tokens; expert and router gradients summed over ranks."""
    torch.manual_seed(0)
    ref = MoELayer(MoEConfig(d_model=16, d_ff=16, **cfg_kw))
    ep = copy.deepcopy(ref)
    shard_experts(ep)
    n = (9, 0, 5, 12)[rank]
    gen = torch.Generator().manual_seed(rank)
    x, g = torch.randn(n, 16, generator=gen), torch.randn(n, 16, generator=gen)
    x_ref, x_ep = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, aux_ref = ref(x_ref)
    (y_ref * g).sum().backward()
    y_ep, aux_ep = ep(x_ep)
    (y_ep * g).sum().backward()
    torch.testing.assert_close(y_ep, y_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_ep.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert float(aux_ep.dropped_fraction) == float(aux_ref.dropped_fraction)
    lo, hi = ep.expert_range
    for name in ("w_gate_EDF", "w_up_EDF", "w_down_EFD"):
        full = getattr(ref.experts, name).grad.clone()
        dist.all_reduce(full)
        torch.testing.assert_close(getattr(ep.experts, name).grad, full[lo:hi], rtol=1e-5, atol=1e-5)
    a, b = ep.router.weight_ED.grad.clone(), ref.router.weight_ED.grad.clone()
    dist.all_reduce(a)
    dist.all_reduce(b)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy, dynamic", [("position", {}), ("probability", {}),
                                             ("position", dict(dynamic_k="top_p", top_p=0.7))])
def test_ep4_with_capacity_drops_and_uneven_ranks(policy, dynamic):
    """With a dynamic k the capacity comes from each rank's own mean k."""
    kw = dict(num_experts=8, capacity_factor=0.6, drop_policy=policy)
    run_ranks(_drops_worker, 4, dict(kw, **dynamic) if dynamic else dict(kw, top_k=2))


def _mesh_worker(rank: int, world: int) -> str:
    try:
        build_mesh(ParallelConfig(dp=2, ep=2))
    except ValueError as err:
        return str(err)
    return "no error"


def test_build_mesh_with_the_wrong_process_count_is_the_layout_check():
    """build_mesh says what ParallelConfig.check_world says everywhere else: one line with
    the layout, the processes launched and the fix."""
    (msg,) = run_ranks(_mesh_worker, 1)
    assert msg.startswith("parallel.dp x parallel.ep = 2 x 2 = 4 but 1 processes were launched; "), msg
    assert "torchrun --nproc-per-node" in msg and "\n" not in msg
