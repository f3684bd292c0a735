"""GroupedExperts alone: its backends agree, take the gradients autograd hands them, check
their inputs, and run with parameters in any floating dtype."""

import pytest
import torch

from moekit import MoEConfig, MoELayer, reference_moe
from moekit.moe.experts import HAS_GROUPED_MM, GroupedExperts, expert_loop

from ..conftest import rel_err

BACKENDS = ["segment_mm", "padded_mm", "reference"] + (["grouped_mm"] if HAS_GROUPED_MM else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_experts_alone_take_a_stride_zero_grad(backend):
    torch.manual_seed(0)
    experts = GroupedExperts(MoEConfig(d_model=16, d_ff=16, num_experts=4, backend=backend))
    x = torch.randn(10, 16, requires_grad=True)
    counts = torch.tensor([3, 0, 5, 2])
    (g,) = torch.autograd.grad(experts(x, counts).sum(), [x])
    (g_ref,) = torch.autograd.grad(expert_loop(x, counts, *experts.weights(x.dtype)).sum(), [x])
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


def test_auto_backend_is_segment_mm_on_cpu_and_grouped_mm_needs_aligned_rows():
    # CPU: segment_mm (pooled buffers) for every shape and dtype, few rows or many
    experts = GroupedExperts(MoEConfig(d_model=12, d_ff=16, num_experts=8))
    for x in (torch.randn(8, 12, dtype=torch.bfloat16), torch.randn(64, 12), torch.randn(3, 12)):
        assert experts.resolve_backend(x) == "segment_mm"
    # the rule auto applies on other devices: 16-byte rows
    assert experts._grouped_mm_aligned(torch.randn(8, 12))
    assert not experts._grouped_mm_aligned(torch.randn(8, 12, dtype=torch.bfloat16))
    x, counts = torch.randn(3, 12), torch.tensor([1, 0, 0, 2, 0, 0, 0, 0])
    torch.testing.assert_close(experts(x, counts), expert_loop(x, counts, *experts.weights(x.dtype)))


@pytest.mark.parametrize("backend", ["segment_mm", "grouped_mm"])
def test_counts_must_cover_the_rows(backend):
    experts = GroupedExperts(MoEConfig(d_model=8, d_ff=8, num_experts=2, backend=backend))
    with pytest.raises(ValueError, match="counts_E sums to 7"):
        experts(torch.randn(10, 8), torch.tensor([3, 4]))


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="torch has no _grouped_mm")
def test_in_place_op_on_grouped_mm_output_keeps_its_gradients():
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


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("cast", ["to", "bfloat16"])
def test_layer_cast_to_bf16_trains(backend, activation, cast):
    """``MoELayer(cfg).to(torch.bfloat16)`` (a float32 config): forward and backward run, every
    gradient exists, is finite and bf16, and the output is the float32 layer's to bf16
    accuracy. The router still computes in float32."""
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, d_ff=24, num_experts=4, top_k=2, backend=backend, activation=activation,
                    num_shared_experts=1, noisy_gating=True, capacity_factor=1.5)
    layer = MoELayer(cfg).train()
    x = torch.randn(20, 16)
    y32 = reference_moe(layer.eval(), x)
    low = layer.to(torch.bfloat16) if cast == "to" else layer.bfloat16()
    assert low is layer and {p.dtype for p in layer.parameters()} == {torch.bfloat16}
    y, aux = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and rel_err(y, y32) < 3e-2
    assert layer.router(x.bfloat16()).logits_TE.dtype == torch.float32
    layer.train()
    y, aux = layer(x.bfloat16().requires_grad_())
    (y.float().square().mean() + aux.load_balancing_loss + aux.z_loss).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16, name
        assert torch.isfinite(p.grad.float()).all() and float(p.grad.float().abs().sum()) > 0, name


def test_bf16_parameters_with_float32_input_compute_in_float32():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2)).bfloat16()
    x = torch.randn(8, 16, requires_grad=True)
    y, _ = layer(x)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert x.grad.dtype == torch.float32 and layer.experts.w_up_EDF.grad.dtype == torch.bfloat16
    torch.testing.assert_close(y, reference_moe(layer, x), rtol=1e-5, atol=1e-5)
