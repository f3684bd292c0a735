import math
from fractions import Fraction

import pytest
import torch

from moekit import MoEConfig, MoELayer
from moekit.moe.router import ExpertChoiceRouter, TopKRouter, capacity, jitter, topk_stable


def test_topk_stable_breaks_ties_to_lower_index():
    torch.manual_seed(0)
    scores = torch.randint(-3, 3, (500, 16)).float()   # many ties, negatives too
    values, idx = topk_stable(scores, 5)
    ref = torch.sort(scores, dim=-1, descending=True, stable=True)
    assert torch.equal(idx, ref.indices[:, :5]) and torch.equal(values, ref.values[:, :5])
    zeros = torch.zeros(3, 8)
    assert topk_stable(zeros, 2)[1].tolist() == [[0, 1]] * 3
    signed = torch.tensor([[-0.0, 0.0, 1.0]])
    assert topk_stable(signed, 3)[1].tolist() == [[2, 0, 1]]   # -0.0 == 0.0: lower index first


def test_router_math_is_float32_for_bf16_input():
    router = TopKRouter(MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2, dtype=torch.bfloat16))
    out = router(torch.randn(10, 16, dtype=torch.bfloat16))
    assert out.logits_TE.dtype == out.probs_TE.dtype == out.weights_TK.dtype == torch.float32
    assert out.experts_TK.dtype == torch.int64
    torch.testing.assert_close(out.weights_TK.sum(-1), torch.ones(10))


def test_switch_top1_weight_is_the_max_probability():
    torch.manual_seed(0)
    router = TopKRouter(MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=1, normalize_topk=False))
    out = router(torch.randn(32, 16))
    torch.testing.assert_close(out.weights_TK[:, 0], out.probs_TE.max(-1).values)
    assert torch.equal(out.experts_TK[:, 0], out.probs_TE.argmax(-1))


def test_top1_weight_one_is_one_in_value_and_carries_the_probability_gradient():
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    unit = TopKRouter(MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=1, top1_weight="one"))
    switch = TopKRouter(MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=1))
    switch.load_state_dict(unit.state_dict())
    u, s = unit(x), switch(x)
    assert torch.equal(u.weights_TK, torch.ones(32, 1)) and torch.equal(u.experts_TK, s.experts_TK)
    g = torch.randn(32, 1)
    (gu,) = torch.autograd.grad((u.weights_TK * g).sum(), unit.weight_ED)
    (gs,) = torch.autograd.grad((s.weights_TK * g / s.weights_TK.detach()).sum(), switch.weight_ED)
    torch.testing.assert_close(gu, gs)
    assert float(gu.abs().sum()) > 0
    with pytest.raises(ValueError, match="top1_weight"):
        MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2, top1_weight="one")


def test_noisy_gating_is_training_only_and_learns_its_std():
    torch.manual_seed(0)
    router = TopKRouter(MoEConfig(d_model=16, d_ff=16, num_experts=8, top_k=2, noisy_gating=True))
    torch.nn.init.normal_(router.noise_ED, std=1.0)
    x = torch.randn(64, 16)
    router.eval()
    a, b = router(x), router(x)
    assert torch.equal(a.logits_TE, b.logits_TE)
    router.train()
    c = router(x)
    assert not torch.allclose(c.logits_TE, a.logits_TE)
    c.logits_TE.square().sum().backward()
    assert router.noise_ED.grad is not None and router.noise_ED.grad.abs().sum() > 0


@pytest.mark.parametrize("router_kind", ["softmax", "expert_choice"])
def test_jitter_is_training_only(router_kind):
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, d_ff=16, num_experts=8, top_k=2, jitter_eps=0.1, router=router_kind)
    router = MoELayer(cfg).router
    x = torch.randn(64, 16)
    router.eval()
    assert torch.equal(router(x).logits_TE, router(x).logits_TE)
    router.train()
    diff = (router(x).logits_TE - router(x).logits_TE).abs().max()
    assert diff > 0


def test_jitter_scales_each_element_within_eps():
    torch.manual_seed(0)
    x = torch.randn(200, 16)
    ratio = jitter(x, 0.1, training=True) / x
    assert float(ratio.min()) >= 0.9 - 1e-6 and float(ratio.max()) <= 1.1 + 1e-6
    assert float(ratio.std()) > 0.03            # U(0.9, 1.1) has std 0.058: it does jitter
    assert jitter(x, 0.1, training=False) is x and jitter(x, 0.0, training=True) is x


def test_aux_loss_free_bias_changes_choice_not_weights():
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=1, router="sigmoid", aux_loss_free=True,
                    normalize_topk=False)
    router = TopKRouter(cfg)
    x = torch.randn(50, 16)
    unbiased = router(x)
    router.expert_bias_E[3] = 10.0
    biased = router(x)
    assert (biased.experts_TK == 3).all() and not (unbiased.experts_TK == 3).all()
    scores = torch.sigmoid(biased.logits_TE)
    torch.testing.assert_close(biased.weights_TK[:, 0], scores[:, 3])   # no bias in the weight


def test_update_bias_sign_rule_and_errors():
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=1, router="sigmoid", aux_loss_free=True,
                    bias_update_rate=0.5)
    layer = MoELayer(cfg)
    layer.update_router_bias(torch.tensor([10, 0, 5, 5]))
    assert layer.router.expert_bias_E.tolist() == [-0.5, 0.5, 0.0, 0.0]
    plain = TopKRouter(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=1))
    with pytest.raises(ValueError, match="aux_loss_free"):
        plain.update_bias(torch.tensor([1, 2, 3, 4]))


@pytest.mark.parametrize("counts, error", [
    (torch.tensor([1, 2, 3]), ValueError), (torch.ones(2, 4), ValueError), (torch.tensor(4), ValueError),
    ([1, 2, 3, 4], TypeError),
])
def test_update_bias_with_wrong_counts_names_the_argument(counts, error):
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=1, router="sigmoid", aux_loss_free=True)
    layer = MoELayer(cfg)
    with pytest.raises(error, match="tokens_per_expert_E") as info:
        layer.update_router_bias(counts)
    assert "\n" not in str(info.value)
    assert float(layer.router.expert_bias_E.abs().sum()) == 0     # nothing was applied


def test_update_bias_on_expert_choice_is_a_clear_error():
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, router="expert_choice"))
    with pytest.raises(ValueError, match="expert_choice"):
        layer.update_router_bias(torch.tensor([1, 2, 3, 4]))


def test_aux_loss_free_updates_balance_a_skewed_router():
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, d_ff=16, num_experts=8, top_k=2, router="sigmoid", aux_loss_free=True,
                    bias_update_rate=0.02)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight_ED[0] += 0.5        # expert 0 is favoured by tokens with a positive mean
    x = torch.randn(512, 16) + 0.3

    def cv():
        _, aux = layer(x)
        load = aux.tokens_per_expert.float()
        return float(load.std() / load.mean()), aux.tokens_per_expert
    before, _ = cv()
    for _ in range(100):
        _, counts = cv()
        layer.update_router_bias(counts)
    after, _ = cv()
    assert after < 0.5 * before, (before, after)


def test_expert_choice_fills_each_expert_and_reports_unrouted():
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=1, router="expert_choice",
                    capacity_factor=0.5)
    layer = MoELayer(cfg)
    x = torch.randn(40, 16)
    routing = layer.router(x)
    C = 5                                  # 0.5 * 40 tokens * top-1 / 4 experts
    assert routing.tokens_EC.shape == (4, C)
    _, aux = layer(x)
    assert aux.tokens_per_expert.tolist() == [C] * 4
    got_expert = torch.zeros(40, dtype=torch.bool)
    got_expert[routing.tokens_EC.reshape(-1)] = True
    assert float(aux.unrouted_fraction) == pytest.approx(1 - got_expert.float().mean().item())
    assert float(aux.unrouted_fraction) >= 0.5   # only 20 slots for 40 tokens


def test_expert_choice_capacity_uses_top_k():
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, router="expert_choice", capacity_factor=0.5)
    routing = MoELayer(cfg).router(torch.randn(30, 8))
    assert routing.tokens_EC.shape == (4, 8)     # ceil(0.5 * 30 tokens * top-2 / 4 experts) = ceil(7.5)


def test_capacity_is_exact_for_decimal_factors():
    assert capacity(1.1, 100, 1, 10) == 11      # 1.1 * 100 / 10 is 11.000000000000002 in floats
    for cf in (0.3, 0.7, 1.1, 1.25, 1.3, 2.2):
        for tokens_times_k in (10, 30, 100, 210, 1000):
            for E in (3, 7, 10, 64):
                exact = Fraction(str(cf)) * tokens_times_k / E
                assert capacity(cf, tokens_times_k, 1, E) == math.ceil(exact), (cf, tokens_times_k, E)


@pytest.mark.parametrize("router_kind", ["softmax", "sigmoid", "expert_choice"])
@pytest.mark.parametrize("cast", ["to", "bfloat16"])
def test_bf16_router_parameters_still_route_in_float32(router_kind, cast):
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2, router=router_kind,
                    noisy_gating=router_kind == "softmax", jitter_eps=0.01)
    router = MoELayer(cfg).router
    x = torch.randn(10, 16)
    router = router.to(torch.bfloat16) if cast == "to" else router.bfloat16()
    assert router.weight_ED.dtype == torch.bfloat16
    out = router.eval()(x.bfloat16())
    assert out.logits_TE.dtype == out.probs_TE.dtype == torch.float32
    torch.testing.assert_close(out.logits_TE, torch.nn.functional.linear(x.bfloat16().float(),
                                                                         router.weight_ED.float()))
    router.train()
    out = router(x.bfloat16())             # noise and jitter too
    (out.logits_TE.square().sum() + out.probs_TE.sum()).backward()
    grad = router.weight_ED.grad
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all()


def test_aux_loss_free_bias_stays_float32_under_bf16():
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=1, router="sigmoid", aux_loss_free=True,
                    bias_update_rate=1e-3)
    layer = MoELayer(cfg)
    layer.router.expert_bias_E.fill_(0.5)
    layer.bfloat16()
    assert layer.router.expert_bias_E.dtype == torch.float32
    assert layer.router.expert_bias_E.tolist() == [0.5] * 4            # not rounded on the way
    layer.update_router_bias(torch.tensor([0, 2, 1, 1]))
    # 0.5 + 1e-3 is 0.5 in bf16 (its spacing there is 2^-8): a bf16 bias would not move
    assert layer.router.expert_bias_E[0] > 0.5 and layer.router.expert_bias_E[1] < 0.5
    back = MoELayer(cfg)
    back.load_state_dict(layer.state_dict())
    assert torch.equal(back.router.expert_bias_E, layer.router.expert_bias_E)


def test_expert_choice_capacity_clamps_to_tokens():
    router = ExpertChoiceRouter(MoEConfig(d_model=8, d_ff=8, num_experts=2, top_k=2, capacity_factor=4.0))
    assert router.capacity(3) == 3
