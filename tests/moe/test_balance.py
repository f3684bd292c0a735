import math

import pytest
import torch

from moekit import MoEConfig, MoELayer
from moekit.moe.balance import StatsReducer, load_balancing_loss, tokens_per_expert, z_loss
from moekit.moe.router import topk_stable


@pytest.mark.parametrize("E,K", [(8, 2), (4, 1), (16, 4), (3, 3)])
def test_load_balancing_loss_matches_transformers(E, K):
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    torch.manual_seed(E * 10 + K)
    logits = torch.randn(3, 37, E)
    probs = torch.softmax(logits.view(-1, E), -1)
    experts = topk_stable(probs, K)[1]
    ours = load_balancing_loss(probs, experts)
    theirs = mixtral.load_balancing_loss_func((logits.view(-1, E),), num_experts=E, top_k=K)
    torch.testing.assert_close(ours, theirs)


def test_load_balancing_loss_is_top_k_at_perfect_balance_and_larger_when_skewed():
    E, K, T = 4, 2, 8
    probs = torch.full((T, E), 1.0 / E)
    balanced = torch.tensor([[0, 1], [2, 3]] * (T // 2))
    assert float(load_balancing_loss(probs, balanced)) == pytest.approx(K)
    skew_probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * T)
    skewed = torch.tensor([[0, 1]] * T)
    assert float(load_balancing_loss(skew_probs, skewed)) > K


def test_load_balancing_loss_all_tokens_on_one_expert():
    # every token's top-1 is expert 0 with probability 1: f = (1, 0, 0, 0), P = (1, 0, 0, 0),
    # so the loss is E * 1 * 1 = E, the most imbalanced value for K = 1
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 5)
    assert float(load_balancing_loss(probs, torch.zeros(5, 1, dtype=torch.long))) == pytest.approx(4.0)


def test_z_loss_by_hand():
    # logsumexp of four 0s is ln 4 = 2 ln 2, of four ln 2s is ln 8 = 3 ln 2:
    # z = ((2 ln 2)^2 + (3 ln 2)^2) / 2 = 6.5 (ln 2)^2; dz/dlogit = 2 lse * softmax / T = lse / 4
    ln2 = math.log(2)
    logits = torch.tensor([[0.0] * 4, [ln2] * 4], requires_grad=True)
    z = z_loss(logits)
    assert float(z.detach()) == pytest.approx(6.5 * ln2 ** 2)
    z.backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[2 * ln2 / 4] * 4, [3 * ln2 / 4] * 4]))
    assert z_loss(logits.detach().bfloat16()).dtype == torch.float32


def test_empty_batch_losses_are_zero_not_nan():
    assert float(load_balancing_loss(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.long))) == 0.0
    assert float(z_loss(torch.zeros(0, 4))) == 0.0


def test_sigmoid_balancing_loss_uses_normalized_scores():
    # logits (0, 0, ln 3, -ln 3): sigmoid scores (1/2, 1/2, 3/4, 1/4), normalized by their sum 2
    # to P = (1/4, 1/4, 3/8, 1/8). Top-2 is expert 2, then expert 0 (the tie goes to the lower
    # index): f = (1, 0, 1, 0), so the loss is 4 * (1/4 + 3/8) = 2.5 (raw scores would give 5).
    cfg = MoEConfig(d_model=4, d_ff=8, num_experts=4, top_k=2, router="sigmoid")
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight_ED.zero_()
        layer.router.weight_ED[:, 0] = torch.tensor([0.0, 0.0, math.log(3), -math.log(3)])
    x = torch.zeros(6, 4)
    x[:, 0] = 1.0
    _, aux = layer(x)
    assert aux.tokens_per_expert.tolist() == [6, 0, 6, 0]
    assert float(aux.load_balancing_loss.detach()) == pytest.approx(2.5)


def test_losses_reach_router_weights():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2))
    _, aux = layer(torch.randn(30, 16))
    (aux.load_balancing_loss + aux.z_loss).backward()
    assert layer.router.weight_ED.grad.abs().sum() > 0
    assert layer.experts.w_up_EDF.grad is None    # the losses see only the router


def test_global_scope_on_one_rank_is_the_local_loss_and_zero_without_tokens():
    """With a one-rank all-reduce (the identity) the global formula is the local one; with no
    tokens anywhere it is 0 with a zero gradient, not NaN."""
    torch.manual_seed(0)
    logits = torch.randn(13, 4, requires_grad=True)
    probs = logits.softmax(-1)
    experts = probs.topk(2, dim=-1).indices
    local = load_balancing_loss(probs, experts)
    one_rank = load_balancing_loss(probs, experts, StatsReducer(lambda t: None, world=1))
    torch.testing.assert_close(one_rank, local)
    (g_local,) = torch.autograd.grad(local, logits, retain_graph=True)
    (g_one,) = torch.autograd.grad(one_rank, logits)
    torch.testing.assert_close(g_one, g_local)
    empty = torch.zeros(0, 4, requires_grad=True)
    loss = load_balancing_loss(empty.softmax(-1), torch.zeros(0, 2, dtype=torch.long),
                               StatsReducer(lambda t: None, world=1))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(empty.grad, torch.zeros(0, 4))


@pytest.mark.parametrize("tokens", [(9, 4), (7, 0)])
def test_reducer_over_two_ranks_gives_the_global_batch_loss(tokens):
    """Two ranks simulated in one process: each rank's all_reduce adds the other rank's
    (counts, tokens). The mean of the two losses, and its gradient, are the loss of the
    concatenated batch, for uneven and empty ranks."""
    torch.manual_seed(1)
    E, K = 4, 2
    logits = [torch.randn(n, E, requires_grad=True) for n in tokens]
    probs = [lg.softmax(-1) for lg in logits]
    experts = [topk_stable(p.detach(), K)[1] for p in probs]
    stats = [torch.cat([tokens_per_expert(e, E).float(), torch.tensor([float(n)])])
             for e, n in zip(experts, tokens)]
    losses = [load_balancing_loss(probs[r], experts[r],
                                  StatsReducer(lambda t, other=stats[1 - r]: t.add_(other), world=2))
              for r in range(2)]
    mean = (losses[0] + losses[1]) / 2
    whole = load_balancing_loss(torch.cat(probs), torch.cat(experts))
    torch.testing.assert_close(mean, whole)
    grads = torch.autograd.grad(mean, logits, retain_graph=True)
    expected = torch.autograd.grad(whole, logits)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
