"""Regressions for defects found in review: each test failed before its fix."""

import math
from fractions import Fraction

import pytest
import torch

from moekit import MoEConfig, MoELayer, reference_moe
from moekit.moe.balance import load_balancing_loss, z_loss
from moekit.moe.dispatch import DispatchPlan, LocalDispatcher
from moekit.moe.experts import HAS_GROUPED_MM, GroupedExperts
from moekit.moe.router import capacity

from ..conftest import rel_err


@pytest.mark.parametrize("d_model, d_ff", [(6, 16), (16, 10), (2, 8)])
def test_float32_dims_grouped_mm_cannot_take_fall_back_and_match_reference(d_model, d_ff):
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=4, top_k=2))
    x = torch.randn(5, d_model, requires_grad=True)
    y, _ = layer(x)
    y_ref = reference_moe(layer, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    # and the backward: the input's and every weight's gradient (experts and router)
    names, params = zip(*layer.named_parameters())
    grad_out = torch.randn_like(y)
    fast = torch.autograd.grad(y, [x, *params], grad_out)
    ref = torch.autograd.grad(y_ref, [x, *params], grad_out)
    for name, g, g_ref in zip(["x", *names], fast, ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="torch has no _grouped_mm")
def test_explicit_grouped_mm_with_unaligned_float32_is_a_clear_error():
    layer = MoELayer(MoEConfig(d_model=6, d_ff=16, num_experts=4, backend="grouped_mm"))
    with pytest.raises(ValueError, match="divisible by 4"):
        layer(torch.randn(3, 6))


def test_router_dtype_other_than_float32_is_rejected():
    with pytest.raises(ValueError, match="MoEConfig.router_dtype="):
        MoEConfig(d_model=8, d_ff=8, router_dtype=torch.float64)
    with pytest.raises(ValueError, match="MoEConfig.router_dtype='float128'"):
        MoEConfig(d_model=8, d_ff=8, router_dtype="float128")


@pytest.mark.parametrize("backend", ["segment_mm", "grouped_mm", "reference"])
def test_double_backward_raises_instead_of_being_wrong(backend):
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, backend=backend))
    x = torch.randn(6, 8, requires_grad=True)
    y, _ = layer(x)
    (g,) = torch.autograd.grad(y.square().sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError):
        g.square().sum().backward()


def test_empty_batch_losses_are_zero_not_nan():
    assert float(load_balancing_loss(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.long))) == 0.0
    assert float(z_loss(torch.zeros(0, 4))) == 0.0
    for router in ("softmax", "expert_choice"):
        layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, router=router))
        y, aux = layer(torch.randn(0, 8))
        assert y.shape == (0, 8)
        assert math.isfinite(float(aux.load_balancing_loss.detach()))
        assert math.isfinite(float(aux.z_loss.detach()))


def test_probability_policy_ties_follow_gshard_priority_like_the_reference():
    cfg = MoEConfig(d_model=2, d_ff=8, num_experts=3, top_k=2, capacity_factor=0.75,
                    drop_policy="probability", backend="segment_mm")
    layer = MoELayer(cfg).eval()
    with torch.no_grad():
        layer.router.weight_ED.copy_(torch.tensor([[0.0, -20.0], [0.0, 0.0], [-20.0, 0.0]]))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])       # every weight is exactly 0.5: all ties
    torch.testing.assert_close(layer(x)[0], reference_moe(layer, x), rtol=1e-5, atol=1e-6)


def test_capacity_is_exact_for_decimal_factors():
    assert capacity(1.1, 100, 1, 10) == 11
    for cf in (0.3, 0.7, 1.1, 1.25, 1.3, 2.2):
        for tokens_times_k in (10, 30, 100, 210, 1000):
            for E in (3, 7, 10, 64):
                exact = Fraction(str(cf)) * tokens_times_k / E
                assert capacity(cf, tokens_times_k, 1, E) == math.ceil(exact), (cf, tokens_times_k, E)


def test_combine_multiplies_and_sums_in_float32():
    torch.manual_seed(0)
    T, K, D = 64, 2, 16
    y_RD = (torch.randn(T * K, D) * torch.logspace(-3, 3, D)).to(torch.bfloat16)
    weights_TK = torch.softmax(torch.randn(T, K), -1)
    order_R = torch.randperm(T * K)
    inverse_A = torch.empty_like(order_R)
    inverse_A[order_R] = torch.arange(T * K)
    plan = DispatchPlan(token_R=order_R // K, weight_R=weights_TK.reshape(-1)[order_R],
                        counts_E=torch.tensor([T * K]), num_tokens=T, num_assignments=T * K,
                        inverse_A=inverse_A, weights_TK=weights_TK)
    out = LocalDispatcher(1, K).combine(y_RD, plan)
    y_TKD = y_RD[inverse_A].view(T, K, D).float()
    exact = (y_TKD * weights_TK.unsqueeze(-1)).sum(1)       # float32 products and sum
    assert torch.equal(out, exact.to(torch.bfloat16))      # rounded once, at the end


def test_expert_choice_capacity_uses_top_k():
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, router="expert_choice", capacity_factor=0.5)
    routing = MoELayer(cfg).router(torch.randn(30, 8))
    assert routing.tokens_EC.shape == (4, math.ceil(Fraction(1, 2) * 30 * 2 / 4))


def test_sigmoid_balancing_loss_uses_normalized_scores():
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, router="sigmoid")
    layer = MoELayer(cfg)
    x = torch.randn(20, 8)
    routing = layer.router(x)
    scores = torch.sigmoid(x @ layer.router.weight_ED.t())
    torch.testing.assert_close(routing.probs_TE, scores / scores.sum(-1, keepdim=True))
    f = torch.bincount(routing.experts_TK.flatten(), minlength=4).float() / 20
    P = (scores / scores.sum(-1, keepdim=True)).mean(0)
    assert rel_err(layer(x)[1].load_balancing_loss, 4 * (f * P).sum()) < 1e-6


@pytest.mark.parametrize("kwargs, field", [
    (dict(capacity_factor="1.25"), "capacity_factor"),
    (dict(capacity_factor=float("inf")), "capacity_factor"),
    (dict(jitter_eps=None), "jitter_eps"), (dict(jitter_eps=float("nan")), "jitter_eps"),
    (dict(num_shared_experts=1.5), "num_shared_experts"),
    (dict(bias_update_rate=float("nan")), "bias_update_rate"),
    (dict(noisy_gating=True, router="expert_choice"), "noisy_gating"), (dict(dtype="fp8"), "dtype"),
])
def test_more_bad_values_are_one_line_value_errors(kwargs, field):
    with pytest.raises(ValueError, match=f"MoEConfig.{field}="):
        MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, **kwargs)


def test_update_bias_on_expert_choice_is_a_clear_error():
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, router="expert_choice"))
    with pytest.raises(ValueError, match="expert_choice"):
        layer.update_router_bias(torch.tensor([1, 2, 3, 4]))


@pytest.mark.parametrize("backend", ["segment_mm", "grouped_mm"])
def test_counts_must_cover_the_rows(backend):
    experts = GroupedExperts(MoEConfig(d_model=8, d_ff=8, num_experts=2, backend=backend))
    with pytest.raises(ValueError, match="counts_E sums to 7"):
        experts(torch.randn(10, 8), torch.tensor([3, 4]))


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="torch has no _grouped_mm")
def test_in_place_op_on_grouped_mm_output():
    torch.manual_seed(0)
    experts = GroupedExperts(MoEConfig(d_model=8, d_ff=8, num_experts=2, backend="grouped_mm"))
    x = torch.randn(5, 8, requires_grad=True)
    y = experts(x, torch.tensor([2, 3]))
    y.mul_(2)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # the same gradients as the segment_mm backend, which has no hook to trip over
    segment = GroupedExperts(MoEConfig(d_model=8, d_ff=8, num_experts=2, backend="segment_mm"))
    segment.load_state_dict(experts.state_dict())
    x_seg = x.detach().requires_grad_()
    (2 * segment(x_seg, torch.tensor([2, 3]))).sum().backward()
    torch.testing.assert_close(x.grad, x_seg.grad, rtol=1e-5, atol=1e-6)
    for (name, p), p_seg in zip(experts.named_parameters(), segment.parameters()):
        torch.testing.assert_close(p.grad, p_seg.grad, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
