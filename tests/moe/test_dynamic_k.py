"""A dynamic number of experts per token (top_p, null, relu): the fast path against the slow
reference in outputs and every gradient, tokens with no expert and with max_k experts,
capacity from the mean k, the balancing losses' definitions, the compute-budget controller
and one-line refusals of bad configurations."""

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from moekit import MoEConfig, MoELayer
from moekit.moe.dynamic import experts_per_token_hist, mean_k, update_budget

from .test_fast_vs_reference import BACKENDS, check_against_reference

MODES = [("top_p", "softmax"), ("top_p", "sigmoid"), ("null", "softmax"), ("null", "sigmoid"),
         ("relu", "softmax")]


def dynamic_cfg(mode: str, router: str, E: int, max_frac: float = 1.0, **kw) -> MoEConfig:
    extra = {"router": router, "aux_loss_free": router == "sigmoid"}
    if mode == "null":
        extra.update(num_null_experts=max(1, E // 2), top_k=max(1, int(max_frac * E)))
    else:
        extra["max_k"] = max(1, int(max_frac * E))
    return MoEConfig(dynamic_k=mode, num_experts=E, **extra, **kw)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=60)
# every token reaches max_k experts (p = 1): a full histogram's last bin
@example(mode=("top_p", "softmax"), T=9, E=5, max_frac=1.0, control=1.0, zero_rows=0, cf=None,
         policy="position", backend="segment_mm", seed=0)
# relu: zeroed inputs have every gate 0: tokens with no expert, with and without capacity
@example(mode=("relu", "softmax"), T=12, E=4, max_frac=0.5, control=0.0, zero_rows=5, cf=None,
         policy="position", backend="segment_mm", seed=1)
@example(mode=("relu", "softmax"), T=12, E=4, max_frac=1.0, control=0.0, zero_rows=3, cf=0.6,
         policy="probability", backend="segment_mm", seed=2)
# null: a huge null bias sends every token to the null experts only (no expert at all)
@example(mode=("null", "softmax"), T=7, E=4, max_frac=0.5, control=50.0, zero_rows=0, cf=None,
         policy="position", backend="segment_mm", seed=3)
@given(
    mode=st.sampled_from(MODES),
    T=st.integers(1, 20),
    E=st.integers(2, 8),
    max_frac=st.floats(0.1, 1.0),
    control=st.floats(-3.0, 3.0),
    zero_rows=st.integers(0, 4),
    cf=st.sampled_from([None, 0.5, 1.0, 1.25, 2.0]),
    policy=st.sampled_from(["position", "probability"]),
    backend=st.sampled_from(BACKENDS),
    seed=st.integers(0, 2**16),
)
def test_dynamic_fast_path_matches_reference(mode, T, E, max_frac, control, zero_rows, cf, policy, backend,
                                             seed):
    torch.manual_seed(seed)
    cfg = dynamic_cfg(*mode, E, max_frac, d_model=8, d_ff=8, capacity_factor=cf, drop_policy=policy,
                      backend=backend, num_shared_experts=seed % 2)
    layer = MoELayer(cfg)
    with torch.no_grad():       # the controller's knob anywhere in its range: p, null bias, L1 coef
        layer.router.k_control.fill_({"top_p": min(1.0, max(0.05, abs(control) / 3)), "null": control,
                                      "relu": abs(control)}[mode[0]])
        if mode[0] == "top_p" and control == 1.0:
            layer.router.k_control.fill_(1.0)
        if cfg.aux_loss_free:
            layer.router.expert_bias_E.normal_(0, 0.1)
    x = torch.randn(T, 8)
    x[:zero_rows] = 0.0
    aux = check_against_reference(layer, x, 1e-5, atol=1e-6)
    lo, hi = cfg.k_range
    hist = aux.experts_per_token
    assert hist.shape == (hi + 1,) and int(hist.sum()) == T and int(hist[:lo].sum()) == 0
    assert int(aux.tokens_per_expert.sum()) <= int((hist * torch.arange(hi + 1)).sum())
    if mode[0] == "top_p" and control == 1.0:
        assert int(hist[hi]) == T                     # p = 1: every token takes max_k experts
    if mode[0] == "relu" and zero_rows:
        assert int(hist[0]) >= min(zero_rows, T)      # all gates 0: no expert
    if mode[0] == "null" and control == 50.0:
        assert int(hist[0]) == T and float(aux.unrouted_fraction) == 1.0


@pytest.mark.parametrize("mode, router", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dynamic_low_precision_and_all_tokens_on_one_expert(mode, router, dtype):
    torch.manual_seed(0)
    cfg = dynamic_cfg(mode, router, 6, 0.5, d_model=16, d_ff=16, dtype=dtype)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight_ED.zero_()
        layer.router.weight_ED[4] = 3.0           # positive inputs: expert 4 first for every token
        if cfg.dynamic_k == "null":
            layer.router.null_ND.zero_()
    x = torch.rand(10, 16, dtype=dtype)
    aux = check_against_reference(layer, x, 1e-5 if dtype == torch.float32 else 3e-2)
    assert int(aux.tokens_per_expert[4]) == 10


def test_top_p_takes_experts_until_the_mass_reaches_p():
    cfg = MoEConfig(d_model=4, d_ff=8, num_experts=4, dynamic_k="top_p", top_p=0.6, min_k=1, max_k=3)
    layer = MoELayer(cfg)
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05],     # 0.5 < 0.6: take the second -> 2
                          [0.7, 0.1, 0.1, 0.1],       # 0.7 alone reaches p -> 1
                          [0.25, 0.25, 0.25, 0.25]])  # 0.25, 0.5 < 0.6 -> 3 (max_k caps the 4th)
    with torch.no_grad():
        routing = layer.router._route_top_p(probs.log())
    assert (routing.experts_TK < 4).sum(1).tolist() == [2, 1, 3]
    assert routing.experts_TK[0].tolist() == [0, 1, 4]            # an unused slot holds id E = 4
    torch.testing.assert_close(routing.weights_TK[0], torch.tensor([0.625, 0.375, 0.0]))
    # one expert keeps its probability (the Switch weight): a weight of 1 has no router gradient
    torch.testing.assert_close(routing.weights_TK[1], torch.tensor([0.7, 0.0, 0.0]))
    assert experts_per_token_hist(routing.experts_TK, 4, 3).tolist() == [0, 1, 1, 1]


def test_load_balancing_loss_counts_the_assignments_made():
    """E * sum_i f_i P_i with f_i over the assignments made: mean k at perfect balance."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, dynamic_k="top_p", top_p=0.7))
    x = torch.randn(50, 8)
    _, aux = layer(x)
    routing = layer.router(x)
    made = routing.experts_TK[routing.experts_TK < 4]
    f = torch.bincount(made, minlength=4).float() / 50
    expected = 4 * torch.dot(f, routing.probs_TE.mean(0))
    torch.testing.assert_close(aux.load_balancing_loss, expected)
    assert float(f.sum()) == pytest.approx(float(mean_k(aux.experts_per_token)))
    # uniform probabilities and loads: the loss is the mean k (here every token takes 3 of 4)
    uniform = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, dynamic_k="top_p", top_p=0.6))
    with torch.no_grad():
        uniform.router.weight_ED.zero_()
    _, aux = uniform(torch.randn(8, 8))
    assert aux.experts_per_token.tolist() == [0, 0, 0, 8, 0]
    # every token takes experts 0-2 (ties go low): f = (1, 1, 1, 0), P = 1/4 -> 3
    assert float(aux.load_balancing_loss.detach()) == pytest.approx(3.0)


def test_null_balancing_sees_the_real_experts_renormalised():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, dynamic_k="null",
                               num_null_experts=4))
    routing = layer.router(torch.randn(6, 8))
    torch.testing.assert_close(routing.probs_TE.sum(1), torch.ones(6))
    assert routing.all_logits_TE.shape == (6, 8)       # the z-loss covers the null logits too


def test_relu_has_no_z_loss_and_a_load_weighted_l1():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, dynamic_k="relu", relu_l1=0.5))
    x = torch.randn(20, 8)
    _, aux = layer(x)
    gates = torch.relu(x @ layer.router.weight_ED.t())
    counts = (gates > 0).sum(0).float()
    expected = 0.5 * torch.dot(4 * counts / counts.sum(), gates.mean(0))
    torch.testing.assert_close(aux.sparsity_loss, expected)
    assert float(aux.z_loss.detach()) == 0.0 and aux.sparsity_loss.requires_grad


def test_capacity_follows_the_mean_k():
    """C = ceil(cf * assignments made / E): half the experts per token, half the slots."""
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=4, dynamic_k="top_p", top_p=0.5, max_k=4,
                    capacity_factor=1.0)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight_ED[0] += 1.0                # expert 0 over-wanted
    x = torch.randn(40, 8) + 0.5
    _, aux = layer(x)
    made = int((aux.experts_per_token * torch.arange(5)).sum())
    C = math.ceil(made / 4)
    assert int(aux.tokens_per_expert.max()) == C
    assert float(aux.dropped_fraction) == pytest.approx(1 - int(aux.tokens_per_expert.sum()) / made)


@pytest.mark.parametrize("mode", ["top_p", "null"])
def test_the_controller_holds_the_target_mean_k(mode):
    """A fixed router, the controller stepped on its own histogram: the mean k settles at the
    target within the controller's step (top_p moves p, null moves the null logit bias)."""
    torch.manual_seed(0)
    kw = dict(top_k=4, num_null_experts=4) if mode == "null" else {}
    target = 1.5 if mode == "null" else 2.5
    cfg = MoEConfig(d_model=16, d_ff=8, num_experts=8, dynamic_k=mode, target_k=target, **kw)
    layer = MoELayer(cfg).eval()
    x = torch.randn(512, 16)
    means = []
    for _ in range(400):
        with torch.no_grad():
            _, aux = layer(x)
        means.append(float(mean_k(aux.experts_per_token)))
        layer.update_budget(aux.experts_per_token)
    assert abs(sum(means[-50:]) / 50 - target) < 0.2, means[-10:]
    assert abs(means[0] - target) > 0.3                # it had somewhere to go


def test_controller_steps_and_standstills():
    hist_over = torch.tensor([0, 0, 0, 10])            # mean 3
    hist_under = torch.tensor([10, 0, 0, 0])           # mean 0
    for mode, kw, over, under in (
            ("top_p", dict(max_k=3), 0.5 - 0.005, 0.5 + 0.005),
            ("null", dict(top_k=3, num_null_experts=2), 0.05, -0.05),
            ("relu", dict(max_k=3), 1e-3 * 1.2, 1e-3 / 1.2)):
        cfg = MoEConfig(d_model=4, d_ff=4, num_experts=4, dynamic_k=mode, target_k=1.5, **kw)
        for hist, want in ((hist_over, over), (hist_under, under)):
            knob = torch.tensor(float({"top_p": 0.5, "null": 0.0, "relu": 1e-3}[mode]))
            update_budget(knob, cfg, hist)
            assert float(knob) == pytest.approx(want), mode
        knob = torch.tensor(0.5)
        update_budget(knob, cfg, torch.zeros(4, dtype=torch.long))     # no tokens: no move
        assert float(knob) == 0.5
    no_target = MoEConfig(d_model=4, d_ff=4, num_experts=4, dynamic_k="top_p")
    knob = torch.tensor(0.5)
    update_budget(knob, no_target, hist_over)
    assert float(knob) == 0.5
    p = torch.tensor(1.0)                                # p stays in (0, 1]
    update_budget(p, MoEConfig(d_model=4, d_ff=4, num_experts=4, dynamic_k="top_p", max_k=3, target_k=1.5),
                  hist_under)
    assert float(p) == 1.0


def test_k_control_is_saved_and_stays_float32():
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, dynamic_k="top_p", top_p=0.3))
    assert float(layer.state_dict()["router.k_control"]) == pytest.approx(0.3)
    layer.router.k_control.fill_(0.123456789)
    layer.to(torch.bfloat16)
    assert layer.router.k_control.dtype == torch.float32
    assert float(layer.router.k_control) == pytest.approx(0.123456789)


BAD = [
    (dict(dynamic_k="top_p", top_p=0.0), "MoEConfig.top_p=0.0: must be a finite number in (0, 1]"),
    (dict(dynamic_k="top_p", top_p=1.5), "MoEConfig.top_p=1.5: must be a finite number in (0, 1]"),
    (dict(dynamic_k="top_p", min_k=3, max_k=2), "MoEConfig.min_k=3: exceeds max_k=2; use min_k <= 2"),
    (dict(dynamic_k="top_p", max_k=9), "MoEConfig.max_k=9: exceeds num_experts=8"),
    (dict(dynamic_k="relu", max_k=4, target_k=5), "MoEConfig.target_k=5: must be a finite number in [0, 4]"),
    (dict(dynamic_k="top_p", min_k=2, target_k=1.5),
     "MoEConfig.target_k=1.5: must be a finite number in [2, 8]"),
    (dict(dynamic_k="null", num_null_experts=2, target_k=3), "MoEConfig.target_k=3: must be a finite number "
                                                             "in [0, 2]"),
    (dict(dynamic_k="top_p", router="expert_choice"), "MoEConfig.dynamic_k='top_p': gives each token its own "
                                                      "number of experts, which needs token choice"),
    (dict(dynamic_k="wide"), "MoEConfig.dynamic_k='wide': is not one of ('none', 'top_p', 'null', 'relu')"),
    (dict(dynamic_k="null"), "MoEConfig.num_null_experts=0: must be an integer >= 1; give the router"),
    (dict(num_null_experts=2), "MoEConfig.num_null_experts=2: configures dynamic_k='null', but "
                               "dynamic_k='none'; set dynamic_k='null', or leave num_null_experts unset"),
    (dict(target_k=2.0), "MoEConfig.target_k=2.0: configures dynamic_k='top_p' or 'null' or 'relu', but"),
    (dict(top_p=0.9), "MoEConfig.top_p=0.9: configures dynamic_k='top_p', but dynamic_k='none'"),
    (dict(dynamic_k="top_p", relu_l1=0.1), "MoEConfig.relu_l1=0.1: configures dynamic_k='relu', but"),
    (dict(dynamic_k="top_p", budget_rate=0.1), "MoEConfig.budget_rate=0.1: is the budget controller's step, "
                                               "but target_k is unset"),
    (dict(dynamic_k="top_p", target_k=2, budget_rate=1.0), "MoEConfig.budget_rate=1.0: must be a finite "
                                                           "number in (0, 1)"),
    (dict(dynamic_k="relu", relu_l1=0.0, target_k=2), "MoEConfig.relu_l1=0.0: is the L1 coefficient the "
                                                      "controller multiplies"),
    (dict(dynamic_k="top_p", min_k=0), "MoEConfig.min_k=0: top_p routing always takes the most probable"),
    (dict(dynamic_k="relu", router="sigmoid"), "MoEConfig.dynamic_k='relu': scores experts by relu(logits)"),
    (dict(dynamic_k="relu", min_k=1), "MoEConfig.min_k=1: relu routing gives no expert"),
    (dict(dynamic_k="null", num_null_experts=2, max_k=3),
     "MoEConfig.max_k=3: configures dynamic_k='top_p' or 'relu', but dynamic_k='null'"),
    (dict(dynamic_k="null", num_null_experts=2, target_k=1, budget_rate=0.0),
     "MoEConfig.budget_rate=0.0: must be a finite number > 0"),
]


@pytest.mark.parametrize("kw, message", BAD)
def test_bad_dynamic_configs_are_one_line(kw, message):
    with pytest.raises(ValueError) as err:
        MoEConfig(d_model=8, d_ff=8, num_experts=8, top_k=2, **kw)
    text = str(err.value)
    assert text.startswith(message) and "\n" not in text and "; " in text, text


def test_granularity_scales_the_dynamic_budget():
    cfg = MoEConfig(d_model=8, d_ff=16, num_experts=4, dynamic_k="top_p", max_k=2, target_k=1.5)
    fine = cfg.with_granularity(2)
    assert (fine.num_experts, fine.max_k, fine.target_k) == (8, 4, 3.0)


def test_one_expert_keeps_its_probability_like_a_fixed_top1():
    """top_p with max_k=1 is the Switch router (weight = probability), and a router whose tokens
    get one expert each still learns from the task loss."""
    torch.manual_seed(0)
    fixed = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=1))
    dyn = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, dynamic_k="top_p", max_k=1))
    dyn.load_state_dict(fixed.state_dict(), strict=False)
    x = torch.randn(16, 8)
    y_fixed, y_dyn = fixed(x)[0], dyn(x)[0]
    torch.testing.assert_close(y_dyn, y_fixed)
    y_dyn.square().sum().backward()
    assert float(dyn.router.weight_ED.grad.norm()) > 1e-3


def test_p_of_one_takes_every_max_k_even_for_a_confident_router():
    """A float32 running sum reaches 1 before the last slot once the router is confident."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=16, d_ff=8, num_experts=8, dynamic_k="top_p", top_p=1.0))
    with torch.no_grad():
        layer.router.weight_ED.mul_(40.0)
    _, aux = layer(torch.randn(200, 16))
    assert aux.experts_per_token.tolist() == [0] * 8 + [200]


def test_the_controllers_stay_in_range():
    relu = MoEConfig(d_model=4, d_ff=4, num_experts=4, dynamic_k="relu", target_k=1.0)
    coef = torch.tensor(1e-3)
    for _ in range(2000):                                  # always over budget: the coefficient grows
        update_budget(coef, relu, torch.tensor([0, 0, 10, 0, 0]))
    assert math.isfinite(float(coef)) and float(coef) == pytest.approx(1e4)
    top_p = MoEConfig(d_model=4, d_ff=4, num_experts=4, dynamic_k="top_p", target_k=1.5, budget_rate=0.5)
    p = torch.tensor(0.5)
    for _ in range(3):                                     # over budget: p falls to its floor, stays > 0
        update_budget(p, top_p, torch.tensor([0, 0, 10, 0, 0]))
    assert 0 < float(p) <= 1e-6
