"""The fast path (sort + grouped GEMM + permutation combine) against the slow reference
(token-by-token loops), in outputs and in every gradient: input, router, experts, shared."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from moekit import MoEConfig, MoELayer, reference_moe
from moekit.moe.experts import HAS_GROUPED_MM

from ..conftest import rel_err

BACKENDS = ["segment_mm", "padded_mm", "reference"] + (["grouped_mm"] if HAS_GROUPED_MM else [])


def grads(out, layer, x, grad_out):
    params = [p for p in layer.parameters() if p.requires_grad]
    names = ["x"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    if not out.requires_grad:   # e.g. every token chose only null experts: nothing depends on anything
        return dict.fromkeys(names)
    gs = torch.autograd.grad(out, [x] + params, grad_out, allow_unused=True)
    return dict(zip(names, gs))


def check_against_reference(layer: MoELayer, x: torch.Tensor, tol: float, atol: float = 0.0):
    """Fast layer vs reference in output and every gradient.

    float32: the reference on the same layer, to ``tol`` (or within ``atol`` everywhere: a
    gradient that is 0 in exact arithmetic, such as the router's when every token's
    renormalised weights are 1, is rounding noise). Low precision: the truth is the
    reference on a float32 copy; the fast path must be within ``tol`` of it, or within twice
    the error of the reference run in the same low precision (a straightforward bf16
    implementation), whichever is looser: a few-token router gradient can lose more than
    ``tol`` to bf16 rounding of the expert outputs alone.
    """
    layer.eval()
    grad_out = torch.randn_like(x)
    x = x.detach().requires_grad_()
    y, aux = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    fast = grads(y, layer, x, grad_out)
    if x.dtype == torch.float32:
        ref_layer, x_ref = layer, x
        y_ref = reference_moe(ref_layer, x_ref)
        ref = grads(y_ref, ref_layer, x_ref, grad_out)
        same_precision = None
    else:
        ref_layer = copy.deepcopy(layer).float()
        x_ref = x.detach().float().requires_grad_()
        y_ref = reference_moe(ref_layer, x_ref)
        ref = grads(y_ref, ref_layer, x_ref, grad_out.float())
        y_low = reference_moe(layer, x)
        same_precision = grads(y_low, layer, x, grad_out)
        same_precision["output"] = y_low
    fast["output"], ref["output"] = y, y_ref
    for name, g in fast.items():
        r = ref[name]
        if r is None or float(r.detach().abs().sum()) == 0:   # e.g. an expert no token reached
            assert g is None or float(g.detach().abs().sum()) == 0, name
            continue
        assert g is not None, name
        bound = tol if same_precision is None else max(tol, 2 * rel_err(same_precision[name], r))
        close = atol and float((g.detach().float() - r.detach().float()).abs().max()) < atol
        assert close or rel_err(g, r) < bound, (name, rel_err(g, r), bound)
    return aux


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(T=2, E=3, k_frac=0.0, d8=2, f8=1, backend="segment_mm", activation="swiglu",
         dtype=torch.bfloat16, cf=None, policy="position", seed=3)   # a 2-token bf16 router gradient
@example(T=20, E=4, k_frac=0.0, d8=1, f8=1, backend="segment_mm", activation="swiglu",
         dtype=torch.float32, cf=1.1, policy="position", seed=0)     # 1.1 * 20 / 4 = 5.5: 6 slots
@given(
    T=st.integers(1, 24),
    E=st.integers(1, 8),
    k_frac=st.floats(0, 1),
    d8=st.integers(1, 3),
    f8=st.integers(1, 3),
    backend=st.sampled_from(BACKENDS),
    activation=st.sampled_from(["swiglu", "gelu"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    # None: dropless; decimal factors whose slot count floats could round up (1.1, 1.3)
    cf=st.sampled_from([None, 0.5, 1.0, 1.1, 1.25, 1.3, 1.5, 2.0]),
    policy=st.sampled_from(["position", "probability"]),
    seed=st.integers(0, 2**16),
)
def test_fast_path_matches_reference(T, E, k_frac, d8, f8, backend, activation, dtype, cf, policy, seed):
    torch.manual_seed(seed)
    K = 1 + int(k_frac * (E - 1))     # 1..E, including top_k == num_experts
    cfg = MoEConfig(d_model=8 * d8, d_ff=8 * f8, num_experts=E, top_k=K, backend=backend,
                    activation=activation, dtype=dtype, capacity_factor=cf, drop_policy=policy)
    layer = MoELayer(cfg)
    x = torch.randn(T, cfg.d_model, dtype=dtype)
    check_against_reference(layer, x, 1e-5 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("policy", ["position", "probability"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_capacity_is_the_fast_paths(policy, backend):
    """cf=1.1, T=100, K=1, E=10: 1.1 * 100 / 10 is 11.000000000000002 in floats; both paths
    keep 11 slots (a plain ceil gave the reference 12, and it disagreed with the fast path)."""
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=10, top_k=1, capacity_factor=1.1,
                    drop_policy=policy, backend=backend)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight_ED[0] += 0.5       # expert 0 is wanted by far more than 11 tokens
    aux = check_against_reference(layer, torch.randn(100, 8) + 0.3, 1e-5)
    assert int(aux.tokens_per_expert[0]) == 11 == int(aux.tokens_per_expert.max())


@pytest.mark.parametrize("d_model, d_ff", [(6, 16), (16, 10), (2, 8)])
def test_auto_backend_with_unaligned_float32_dims_matches_reference(d_model, d_ff):
    """grouped_mm needs 16-byte rows (4 float32s): auto falls back to segment_mm, and the
    output and every gradient (input, experts, router) are the reference's."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=4, top_k=2))
    x = torch.randn(5, d_model)
    assert layer.experts.resolve_backend(x) == "segment_mm"
    check_against_reference(layer, x, 1e-5)


def test_probability_policy_ties_follow_gshard_priority_like_the_reference():
    cfg = MoEConfig(d_model=2, d_ff=8, num_experts=3, top_k=2, capacity_factor=0.75,
                    drop_policy="probability", backend="segment_mm")
    layer = MoELayer(cfg).eval()
    with torch.no_grad():
        layer.router.weight_ED.copy_(torch.tensor([[0.0, -20.0], [0.0, 0.0], [-20.0, 0.0]]))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])       # every weight is exactly 0.5: all ties
    check_against_reference(layer, x, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 2])
def test_all_tokens_on_one_expert(backend, dtype, top_k):
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, d_ff=16, num_experts=6, top_k=top_k, backend=backend, dtype=dtype)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight_ED.zero_()
        layer.router.weight_ED[4] = 1.0        # positive inputs -> expert 4 wins every token
    x = (torch.rand(20, 16) + 0.1).to(dtype)
    aux = check_against_reference(layer, x, 1e-5 if dtype == torch.float32 else 3e-2)
    counts = aux.tokens_per_expert.tolist()
    assert counts[4] == 20
    # the other choice is a 5-way tie among equal logits: the lowest index, expert 0, wins
    assert counts == ([0, 0, 0, 0, 20, 0] if top_k == 1 else [20, 0, 0, 0, 20, 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token_and_many_empty_experts(backend):
    torch.manual_seed(1)
    layer = MoELayer(MoEConfig(d_model=8, d_ff=16, num_experts=32, top_k=2, backend=backend))
    aux = check_against_reference(layer, torch.randn(1, 8), 1e-5)
    assert int((aux.tokens_per_expert == 0).sum()) == 30


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_empty_expert_weight_gradients_are_zero(backend):
    # exactly 0, in every weight: Blackwell's _grouped_mm backward writes non-zero ones there
    # (pytorch issue 172439), which GroupedExperts zeroes
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=16, top_k=1, backend=backend))
    y, aux = layer(torch.randn(3, 8))
    y.square().sum().backward()
    empty = (aux.tokens_per_expert == 0).nonzero().flatten()
    used = (aux.tokens_per_expert > 0).nonzero().flatten()
    assert len(empty) >= 13
    for w in (layer.experts.w_gate_EDF, layer.experts.w_up_EDF, layer.experts.w_down_EFD):
        assert float(w.grad[empty].abs().sum()) == 0
        assert float(w.grad[used].abs().sum()) > 0


@pytest.mark.parametrize("policy", ["position", "probability"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cf", [0.25, 0.6, 1.0])
def test_capacity_matches_reference(policy, backend, cf):
    torch.manual_seed(2)
    cfg = MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2, capacity_factor=cf,
                    drop_policy=policy, backend=backend)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight_ED[0] += 0.5   # make it skewed so something is dropped
    aux = check_against_reference(layer, torch.randn(30, 16) + 0.2, 1e-5)
    slots = {0.25: 4, 0.6: 9, 1.0: 15}[cf]      # ceil(cf * 30 tokens * top-2 / 4 experts)
    assert aux.tokens_per_expert.max() <= slots
    assert float(aux.dropped_fraction) == pytest.approx(1 - int(aux.tokens_per_expert.sum()) / 60)
    assert float(aux.dropped_fraction) > 0


def test_probability_policy_keeps_the_highest_weights():
    torch.manual_seed(3)
    cfg = MoEConfig(d_model=16, d_ff=16, num_experts=2, top_k=1, capacity_factor=0.5,
                    drop_policy="probability", normalize_topk=False)
    layer = MoELayer(cfg)
    x = torch.randn(16, 16)
    routing = layer.router(x)
    plan = layer.dispatcher.plan(routing)
    for e in range(2):
        mine = routing.weights_TK[:, 0][routing.experts_TK[:, 0] == e]
        kept = plan.weight_R[plan.token_R.new_tensor(
            [int(routing.experts_TK[t, 0]) == e for t in plan.token_R.tolist()]).bool()]
        assert sorted(kept.tolist(), reverse=True) == sorted(mine.tolist(), reverse=True)[:len(kept)]


@pytest.mark.parametrize("router", ["sigmoid", "expert_choice"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_other_routers_match_reference(router, dtype):
    torch.manual_seed(4)
    cfg = MoEConfig(d_model=16, d_ff=24, num_experts=4, top_k=2, router=router, dtype=dtype,
                    aux_loss_free=router == "sigmoid",
                    capacity_factor=0.75 if router == "expert_choice" else None)
    layer = MoELayer(cfg)
    if router == "sigmoid":
        layer.router.expert_bias_E.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    check_against_reference(layer, torch.randn(2, 9, 16, dtype=dtype), tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_experts_match_reference(dtype):
    torch.manual_seed(5)
    cfg = MoEConfig(d_model=16, d_ff=16, num_experts=8, top_k=2, num_shared_experts=2, dtype=dtype)
    layer = MoELayer(cfg)
    assert layer.shared.w_up.weight.shape == (32, 16)
    check_against_reference(layer, torch.randn(12, 16, dtype=dtype), 1e-5 if dtype == torch.float32 else 3e-2)


def test_mixed_precision_f32_params_bf16_activations():
    torch.manual_seed(6)
    layer = MoELayer(MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2))
    x = torch.randn(10, 16, dtype=torch.bfloat16)
    y, _ = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert layer.experts.w_up_EDF.grad.dtype == torch.float32
    ref = reference_moe(layer, x.float())
    assert rel_err(y, ref) < 3e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_top1_weight_one_matches_reference(backend):
    torch.manual_seed(5)
    layer = MoELayer(MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=1, top1_weight="one",
                               backend=backend))
    check_against_reference(layer, torch.randn(24, 16), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_shared_expert_of_its_own_width_matches_reference(backend, dtype):
    """Qwen2-MoE's shared expert: a width of its own (shared_d_ff, not a multiple of d_ff) and its
    output times sigmoid(x . w_gate); the gate's gradient is held to the reference's too."""
    torch.manual_seed(7)
    cfg = MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2, num_shared_experts=1, shared_d_ff=40,
                    shared_gate=True, backend=backend, dtype=dtype)
    layer = MoELayer(cfg)
    assert layer.shared.w_up.weight.shape == (40, 16) and layer.shared_gate.weight.shape == (1, 16)
    with torch.no_grad():
        layer.shared_gate.weight.normal_(0, 1.0)        # gates well away from 0.5
    x = torch.randn(3, 7, 16, dtype=dtype)
    check_against_reference(layer, x, 1e-5 if dtype == torch.float32 else 3e-2)
