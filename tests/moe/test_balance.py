import pytest
import torch

from moekit import MoEConfig, MoELayer
from moekit.moe.balance import load_balancing_loss, z_loss
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


def test_z_loss_formula_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(20, 6, requires_grad=True)
    z = z_loss(logits)
    torch.testing.assert_close(z, (torch.logsumexp(logits, -1) ** 2).mean())
    z.backward()
    assert logits.grad.abs().sum() > 0


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
    one_rank = load_balancing_loss(probs, experts, all_reduce=lambda t: None, world=1)
    torch.testing.assert_close(one_rank, local)
    (g_local,) = torch.autograd.grad(local, logits, retain_graph=True)
    (g_one,) = torch.autograd.grad(one_rank, logits)
    torch.testing.assert_close(g_one, g_local)
    empty = torch.zeros(0, 4, requires_grad=True)
    loss = load_balancing_loss(empty.softmax(-1), torch.zeros(0, 2, dtype=torch.long),
                               all_reduce=lambda t: None, world=1)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(empty.grad, torch.zeros(0, 4))
