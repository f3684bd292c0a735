import pytest
import torch

from moekit import MoEConfig, MoELayer, reference_moe

from ..conftest import rel_err


def test_public_api_shapes_and_aux():
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=64, d_ff=128, num_experts=8, top_k=2)
    layer = MoELayer(cfg)
    x = torch.randn(2, 3, 5, 64)
    y, aux = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert aux.load_balancing_loss.shape == () and aux.load_balancing_loss.requires_grad
    assert aux.z_loss.shape == () and aux.z_loss.requires_grad
    assert aux.tokens_per_expert.shape == (8,) and int(aux.tokens_per_expert.sum()) == 2 * 3 * 5 * 2
    assert float(aux.dropped_fraction) == 0.0 and float(aux.unrouted_fraction) == 0.0


def test_bf16_in_bf16_out():
    layer = MoELayer(MoEConfig(d_model=64, d_ff=128, num_experts=8, top_k=2, dtype=torch.bfloat16))
    y, _ = layer(torch.randn(7, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_wrong_input_width_is_a_clear_error():
    layer = MoELayer(MoEConfig(d_model=64, d_ff=128))
    with pytest.raises(ValueError, match="d_model=64"):
        layer(torch.randn(3, 32))


@pytest.mark.parametrize("router", ["softmax", "sigmoid", "expert_choice"])
def test_empty_batch(router):
    layer = MoELayer(MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2, router=router))
    x = torch.randn(0, 16, requires_grad=True)
    y, aux = layer(x)
    assert y.shape == (0, 16) and int(aux.tokens_per_expert.sum()) == 0
    (y.sum() + aux.load_balancing_loss + aux.z_loss).backward()
    assert x.grad.shape == (0, 16)
    assert float(aux.load_balancing_loss.detach()) == 0.0


def test_capacity_drops_leave_zero_output_for_fully_dropped_tokens():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=16, d_ff=16, num_experts=2, top_k=1, capacity_factor=0.5))
    with torch.no_grad():
        layer.router.weight_ED.zero_()
        layer.router.weight_ED[0] = 1.0
    x = torch.rand(10, 16) + 0.1      # every token wants expert 0; it has 3 slots
    y, aux = layer(x)
    assert aux.tokens_per_expert.tolist() == [3, 0]
    assert float(aux.dropped_fraction) == pytest.approx(0.7)
    assert float(aux.unrouted_fraction) == pytest.approx(0.7)
    # position policy: the first 3 tokens keep their slot, the rest get exactly zero
    assert (y[3:] == 0).all() and (y[:3] != 0).any()


def test_state_dict_roundtrip_keeps_router_bias():
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=1, router="sigmoid", aux_loss_free=True)
    a, b = MoELayer(cfg), MoELayer(cfg)
    a.update_router_bias(torch.tensor([5, 1, 1, 1]))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.router.expert_bias_E, b.router.expert_bias_E)
    assert "router.expert_bias_E" in a.state_dict()


@pytest.mark.parametrize("backend", ["segment_mm", "grouped_mm"])
def test_sum_loss_stride_zero_grad(backend):
    # y.sum() sends a stride-0 gradient; the grouped kernels must not see it raw
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2, backend=backend))
    x = torch.randn(9, 16, requires_grad=True)
    y, _ = layer(x)
    (grad_fast,) = torch.autograd.grad(y.sum(), [x])
    (grad_ref,) = torch.autograd.grad(reference_moe(layer, x).sum(), [x])
    torch.testing.assert_close(grad_fast, grad_ref, rtol=1e-5, atol=1e-6)


def test_grouped_mm_bf16_unaligned_dims_is_a_clear_error():
    layer = MoELayer(MoEConfig(d_model=12, d_ff=16, num_experts=4, top_k=2, backend="grouped_mm"))
    with pytest.raises(ValueError, match="divisible by 8"):
        layer(torch.randn(5, 12, dtype=torch.bfloat16))


@pytest.mark.parametrize("backend", ["segment_mm", "grouped_mm", "reference"])
def test_grouped_experts_alone_take_a_stride_zero_grad(backend):
    from moekit.moe.experts import GroupedExperts, expert_loop
    torch.manual_seed(0)
    experts = GroupedExperts(MoEConfig(d_model=16, d_ff=16, num_experts=4, backend=backend))
    x = torch.randn(10, 16, requires_grad=True)
    counts = torch.tensor([3, 0, 5, 2])
    (g,) = torch.autograd.grad(experts(x, counts).sum(), [x])
    (g_ref,) = torch.autograd.grad(expert_loop(x, counts, *experts.weights(x.dtype)).sum(), [x])
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


def test_auto_backend_falls_back_for_unaligned_bf16():
    from moekit.moe.experts import HAS_GROUPED_MM, GroupedExperts
    experts = GroupedExperts(MoEConfig(d_model=12, d_ff=16, num_experts=4))
    assert experts.resolve_backend(torch.randn(3, 12, dtype=torch.bfloat16)) == "segment_mm"
    expected = "grouped_mm" if HAS_GROUPED_MM else "segment_mm"
    assert experts.resolve_backend(torch.randn(3, 12)) == expected


def test_routing_stats_read_what_the_router_does():
    import math

    from moekit.moe.stats import load_cv, router_entropy
    assert float(load_cv(torch.tensor([5, 5, 5, 5]))) == 0.0
    assert float(load_cv(torch.tensor([20, 0, 0, 0]))) == pytest.approx(math.sqrt(3))
    assert float(load_cv(torch.zeros(4, dtype=torch.long))) == 0.0
    assert float(router_entropy(torch.full((3, 8), 1 / 8))) == pytest.approx(math.log(8))
    assert float(router_entropy(torch.eye(4))) == pytest.approx(0.0, abs=1e-6)
    layer = MoELayer(MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=1))
    with torch.no_grad():
        layer.router.weight_ED.zero_()
    _, aux = layer(torch.randn(12, 16))
    assert float(aux.router_entropy) == pytest.approx(math.log(4))   # zero logits: uniform
    assert float(aux.load_cv) == pytest.approx(math.sqrt(3))          # ties: all on expert 0


def test_autocast_keeps_router_float32_and_runs_experts_in_bf16():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2))
    x = torch.randn(12, 16)
    logits = layer.router(x).logits_TE
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = layer(x)
        routing = layer.router(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(routing.logits_TE, logits)      # f32 GEMM, not bf16, inside forward too
    ref = reference_moe(layer, x.to(torch.bfloat16))
    assert rel_err(y, ref) < 3e-2
