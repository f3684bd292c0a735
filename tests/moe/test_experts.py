"""GroupedExperts alone: its backends agree, take the gradients autograd hands them, check
their inputs, and run with parameters in any floating dtype."""

import pytest
import torch

from moekit import MoEConfig, MoELayer, reference_moe
from moekit.moe.experts import (
    HAS_GROUPED_MM,
    GroupedExperts,
    _grouped_ffn,
    _ZeroEmptyExperts,
    auto_backend,
    empty_grads_need_zeroing,
    expert_loop,
)

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


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize("device, capability, dtype, aligned, want", [
    ("cuda", (9, 0), BF16, True, "grouped_mm"),       # H100 / H200: the grouped-GEMM kernel
    ("cuda", (10, 0), BF16, True, "grouped_mm"),      # B200
    ("cuda", (9, 0), BF16, False, "segment_mm"),      # rows not 16-byte aligned
    ("cuda", (9, 0), FP32, True, "segment_mm"),       # the kernel is bf16 only
    ("cuda", (9, 0), FP16, True, "segment_mm"),
    ("cuda", (10, 0), FP32, True, "segment_mm"),
    ("cuda", (8, 0), BF16, True, "segment_mm"),       # A100: _grouped_mm would loop with fresh buffers
    ("cuda", (8, 9), BF16, True, "segment_mm"),       # L4, L40S, RTX 4090
    ("cuda", (7, 0), FP16, True, "segment_mm"),       # V100
    ("cuda", (7, 5), FP32, True, "segment_mm"),       # T4
    ("cuda", (12, 0), BF16, True, "segment_mm"),      # consumer Blackwell: not sm100
    ("cpu", None, BF16, True, "segment_mm"),
    ("cpu", None, FP32, True, "segment_mm"),
])
def test_auto_backend_table(device, capability, dtype, aligned, want):
    assert auto_backend(device, capability, dtype, aligned) == want


def test_auto_backend_without_grouped_mm_in_torch():
    assert auto_backend("cuda", (9, 0), BF16, True, has_grouped_mm=False) == "segment_mm"


@pytest.mark.parametrize("device, capability, want", [
    ("cuda", (10, 0), True), ("cuda", (10, 3), True), ("cuda", (9, 0), False), ("cuda", (12, 0), False),
    ("cpu", None, False),
])
def test_empty_expert_gradient_fix_is_for_sm100(device, capability, want):
    assert empty_grads_need_zeroing(device, capability) is want


def test_zero_empty_experts_masks_whatever_gradient_the_kernel_wrote():
    w = torch.randn(4, 3, 2, requires_grad=True)
    out = _ZeroEmptyExperts.apply(w, torch.tensor([2, 0, 1, 0]))
    torch.testing.assert_close(out, w)
    out.backward(torch.full_like(w, 7.0))          # a kernel's (wrong) gradient for every expert
    assert w.grad[[1, 3]].eq(0).all() and w.grad[[0, 2]].eq(7).all()


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="torch has no _grouped_mm")
@pytest.mark.parametrize("zero_empty", [False, True])
def test_grouped_ffn_with_and_without_the_fix_gives_the_loops_gradients(zero_empty):
    torch.manual_seed(0)
    experts = GroupedExperts(MoEConfig(d_model=8, d_ff=8, num_experts=4))
    x, counts = torch.randn(5, 8), torch.tensor([2, 0, 3, 0])
    ws = experts.weights(x.dtype)
    g = torch.autograd.grad(_grouped_ffn(x, counts, *ws, zero_empty=zero_empty).square().sum(), ws)
    g_ref = torch.autograd.grad(expert_loop(x, counts, *ws).square().sum(), ws)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert a[[1, 3]].eq(0).all() and a[[0, 2]].abs().sum() > 0


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
