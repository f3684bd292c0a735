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
