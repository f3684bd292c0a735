import ast
import copy
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import moekit
from moekit import MoEConfig, MoELayer, reference_moe
from moekit.moe.dispatch import DispatchPlan, LocalDispatcher
from moekit.moe.experts import HAS_GROUPED_MM
from moekit.moe.layer import moe_layers

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
    with pytest.raises(ValueError, match="0-d tensor"):
        layer(torch.tensor(1.0))


@pytest.mark.parametrize("x, error, what", [
    (torch.ones(3, 8, dtype=torch.int64), ValueError, "dtype torch.int64 is not a floating type"),
    (torch.ones(3, 8, dtype=torch.bool), ValueError, "dtype torch.bool is not a floating type"),
    (torch.ones(3, 8, dtype=torch.complex64), ValueError, "dtype torch.complex64 is not a floating type"),
    (torch.ones(3, 8, dtype=torch.float64), ValueError, "dtype torch.float64 is not supported"),
    (torch.ones(3, 8, device="meta"), ValueError, "meta device"),
    ([[0.0] * 8] * 3, TypeError, "got list, expected a torch.Tensor"),
])
def test_bad_input_is_one_line_naming_x(x, error, what):
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2))
    with pytest.raises(error) as info:
        layer(x)
    msg = str(info.value)
    assert msg.startswith("MoELayer input x: ") and what in msg and ";" in msg and "\n" not in msg


@pytest.mark.parametrize("cfg", [None, {"d_model": 8, "d_ff": 8}, "MoEConfig"])
def test_layer_needs_an_moe_config(cfg):
    with pytest.raises(TypeError, match=f"MoELayer cfg: got {type(cfg).__name__}, expected an MoEConfig"):
        MoELayer(cfg)


def test_a_nan_token_makes_the_losses_nan_not_the_other_outputs():
    """What the MoELayer docstring says: the NaN token's output and both losses are NaN (they
    average over all tokens); after backward so are the router's gradient and those of the
    experts the token reached. The other tokens' outputs are unharmed."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2))
    x = torch.randn(6, 8)
    x[2, 5] = float("nan")
    y, aux = layer(x)
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3, 4, 5]]).all()
    assert math.isnan(float(aux.load_balancing_loss.detach())) and math.isnan(float(aux.z_loss.detach()))
    (y.sum() + aux.load_balancing_loss + aux.z_loss).backward()
    assert torch.isnan(layer.router.weight_ED.grad).all()
    assert torch.isnan(layer.experts.w_up_EDF.grad).any()


@pytest.mark.parametrize("router", ["softmax", "sigmoid", "expert_choice"])
def test_empty_batch(router):
    layer = MoELayer(MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2, router=router))
    x = torch.randn(0, 16, requires_grad=True)
    y, aux = layer(x)
    assert y.shape == (0, 16) and int(aux.tokens_per_expert.sum()) == 0
    (y.sum() + aux.load_balancing_loss + aux.z_loss).backward()
    assert x.grad.shape == (0, 16)
    assert float(aux.load_balancing_loss.detach()) == 0.0 and float(aux.z_loss.detach()) == 0.0


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


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="torch has no _grouped_mm")
@pytest.mark.parametrize("d_model, dtype, align", [(12, torch.bfloat16, 8), (6, torch.float32, 4)])
def test_grouped_mm_unaligned_dims_is_a_clear_error(d_model, dtype, align):
    layer = MoELayer(MoEConfig(d_model=d_model, d_ff=16, num_experts=4, top_k=2, backend="grouped_mm"))
    with pytest.raises(ValueError, match=f"divisible by {align}"):
        layer(torch.randn(5, d_model, dtype=dtype))


@pytest.mark.parametrize("backend", ["segment_mm", "grouped_mm", "reference"])
def test_double_backward_raises_instead_of_being_wrong(backend):
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, backend=backend))
    x = torch.randn(6, 8, requires_grad=True)
    y, _ = layer(x)
    (g,) = torch.autograd.grad(y.square().sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError):
        g.square().sum().backward()


def test_routing_stats_read_what_the_router_does():
    from moekit.moe.stats import load_cv, router_entropy
    assert float(load_cv(torch.tensor([5, 5, 5, 5]))) == 0.0
    assert float(load_cv(torch.tensor([20, 0, 0, 0]))) == pytest.approx(math.sqrt(3))
    assert float(load_cv(torch.tensor([1, 0, 0, 0]))) == pytest.approx(math.sqrt(3))   # mean 1/4
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


class _NoHostReads(TorchFunctionMode):
    """Fails on any read of tensor values into Python: on CUDA each one waits for the device."""

    READS = {"__bool__", "item", "tolist", "__int__", "__float__", "__index__"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in self.READS:
            raise AssertionError(f"host read in the forward: Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kwargs", [dict(), dict(capacity_factor=0.5),
                                    dict(router="sigmoid", aux_loss_free=True), dict(router="expert_choice")])
def test_forward_reads_no_tensor_values_outside_the_experts(kwargs):
    """The input checks, router, dispatch, combine and the aux statistics branch on shapes
    only. (The experts are outside: segment_mm needs its counts on the host by design, and the
    CPU-only counts check is free there.)"""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, **kwargs))
    x_TD = torch.randn(10, 8)
    with _NoHostReads():
        layer._check_input(x_TD)
        routing = layer.router(x_TD)
        x_RD, counts_E, plan = layer.dispatcher.dispatch(x_TD, routing)
    y_RD = layer.experts(x_RD, counts_E)
    with _NoHostReads():
        layer.dispatcher.combine(y_RD, plan)
        aux = layer._aux(routing, plan)
    assert math.isfinite(float(aux.load_cv))


@dataclass
class _RowsPlan(DispatchPlan):
    rows: tuple[int, int] = (0, 0)   # the rows of the kept experts, in the full plan's order


class _KeptExpertsDispatcher(LocalDispatcher):
    """In one process, what an expert-parallel rank does: hand the experts only the rows of
    experts lo..hi-1, and combine as if the other experts returned zeros."""

    def __init__(self, lo: int, hi: int, *args):
        super().__init__(*args)
        self.lo, self.hi = lo, hi

    def dispatch(self, x_TD, routing):
        x_RD, counts_E, plan = super().dispatch(x_TD, routing)
        counts = counts_E.tolist()
        a, b = sum(counts[:self.lo]), sum(counts[:self.hi])
        return x_RD[a:b], counts_E[self.lo:self.hi], _RowsPlan(**vars(plan), rows=(a, b))

    def combine(self, y_RD, plan):
        a, b = plan.rows
        full = y_RD.new_zeros(plan.token_R.shape[0], y_RD.shape[1])
        return super().combine(torch.cat([full[:a], y_RD, full[b:]]), plan)


def test_keep_experts_halves_add_up_to_the_whole_layer():
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=8, d_ff=16, num_experts=4, top_k=2)
    full = MoELayer(cfg)
    halves = [copy.deepcopy(full), copy.deepcopy(full)]
    for (lo, hi), half in zip([(0, 2), (2, 4)], halves):
        dispatcher = _KeptExpertsDispatcher(lo, hi, 4, 2)
        half.keep_experts(lo, hi, dispatcher)
        assert half.expert_range == (lo, hi) and half.experts_sharded and half.dispatcher is dispatcher
        assert half.experts.w_up_EDF.shape == (2, 8, 16)
        assert {n for n, _ in half.named_parameters()} == {n for n, _ in full.named_parameters()}
    assert full.expert_range == (0, 4) and not full.experts_sharded
    x = torch.randn(12, 8)
    y_full, aux_full = full(x)
    y_sum = halves[0](x)[0] + halves[1](x)[0]
    torch.testing.assert_close(y_sum, y_full, rtol=1e-5, atol=1e-6)
    y_sum.square().sum().backward()
    y_full.square().sum().backward()
    for (lo, hi), half in zip([(0, 2), (2, 4)], halves):
        for name in ("w_gate_EDF", "w_up_EDF", "w_down_EFD"):
            torch.testing.assert_close(getattr(half.experts, name).grad,
                                       getattr(full.experts, name).grad[lo:hi], rtol=1e-5, atol=1e-6)
    assert torch.equal(halves[0](x)[1].tokens_per_expert, aux_full.tokens_per_expert)   # stats over all E


@pytest.mark.parametrize("lo, hi", [(2, 2), (0, 5), (-1, 2), (0.0, 2)])
def test_keep_experts_rejects_a_bad_range(lo, hi):
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2))
    with pytest.raises(ValueError, match="keep_experts"):
        layer.keep_experts(lo, hi, layer.dispatcher)
    assert layer.expert_range == (0, 4) and layer.experts.w_up_EDF.shape[0] == 4


def test_keep_experts_twice_is_an_error():
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2))
    layer.keep_experts(0, 2, layer.dispatcher)
    with pytest.raises(ValueError, match=r"already holds experts \(0, 2\)"):
        layer.keep_experts(0, 1, layer.dispatcher)


def test_moe_layers_finds_every_layer_by_qualified_name():
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2)
    inner = MoELayer(cfg)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(8, 8),
                                 "b": torch.nn.Sequential(torch.nn.ReLU(), inner), "c": MoELayer(cfg)})
    found = moe_layers(model)
    assert list(found) == ["b.1", "c"] and found["b.1"] is inner
    assert moe_layers(inner) == {"": inner} and moe_layers(torch.nn.Linear(2, 2)) == {}


def test_nothing_under_moe_or_model_imports_torch_distributed():
    """Single-device model, parallelized from outside: moekit.parallel owns torch.distributed."""
    root = Path(moekit.__file__).parent
    files = sorted([*root.glob("moe/*.py"), *root.glob("model/*.py")])
    assert len(files) > 5
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            assert not any(n.startswith("torch.distributed") for n in names), (path.name, names)
