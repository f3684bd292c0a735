import math

import pytest
import torch

from moekit import MoEConfig, MoELayer
from moekit.moe.router import ExpertChoiceRouter, TopKRouter, topk_stable


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


def test_jitter_is_training_only():
    torch.manual_seed(0)
    router = TopKRouter(MoEConfig(d_model=16, d_ff=16, num_experts=8, top_k=2, jitter_eps=0.1))
    x = torch.randn(64, 16)
    router.eval()
    assert torch.equal(router(x).logits_TE, router(x).logits_TE)
    router.train()
    diff = (router(x).logits_TE - router(x).logits_TE).abs().max()
    assert diff > 0


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
    C = math.ceil(0.5 * 40 * 1 / 4)
    assert routing.tokens_EC.shape == (4, C)
    _, aux = layer(x)
    assert aux.tokens_per_expert.tolist() == [C] * 4
    got_expert = torch.zeros(40, dtype=torch.bool)
    got_expert[routing.tokens_EC.reshape(-1)] = True
    assert float(aux.unrouted_fraction) == pytest.approx(1 - got_expert.float().mean().item())
    assert float(aux.unrouted_fraction) >= 0.5   # only 20 slots for 40 tokens


def test_expert_choice_capacity_clamps_to_tokens():
    router = ExpertChoiceRouter(MoEConfig(d_model=8, d_ff=8, num_experts=2, top_k=2, capacity_factor=4.0))
    assert router.capacity(3) == 3
