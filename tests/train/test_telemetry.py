import math

import pytest
import torch

from moekit import MoEConfig, MoELayer
from moekit.train.telemetry import RoutingTelemetry, routing_summary


def test_interval_statistics_match_a_direct_computation():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2, capacity_factor=0.75))
    tele = RoutingTelemetry({3: layer})
    xs = [torch.randn(20, 16) + 0.3 for _ in range(3)]
    auxes = [layer(x)[1] for x in xs]
    for a in auxes:
        tele.update({3: a})
    metrics, loads, warnings = tele.flush()
    counts = sum(a.tokens_per_expert for a in auxes).float()
    assert loads[3] == counts.tolist()
    assert metrics["moe/layer3/load_cv"] == pytest.approx(float(counts.std(unbiased=False) / counts.mean()))
    assert metrics["moe/layer3/max_load"] == pytest.approx(float(counts.max() / counts.mean()))
    assert metrics["moe/layer3/dropped_fraction"] == pytest.approx(
        sum(float(a.dropped_fraction) for a in auxes) / 3)
    logits = torch.cat([layer.router(x).logits_TE for x in xs]).detach()
    assert metrics["moe/layer3/logit_mean"] == pytest.approx(float(logits.mean()), abs=1e-5)
    assert metrics["moe/layer3/logit_std"] == pytest.approx(float(logits.std(unbiased=False)), rel=1e-4)
    assert metrics["moe/layer3/logit_max"] == pytest.approx(float(logits.max()))
    share = counts / counts.sum()
    assert metrics["moe/layer3/load_entropy"] == pytest.approx(float(-(share * share.log()).sum()), rel=1e-5)
    assert tele.flush() == ({}, {}, [])        # the interval was reset


def test_collapse_warning_names_layer_expert_and_remedies():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=1))
    with torch.no_grad():
        layer.router.weight_ED.zero_()
        layer.router.weight_ED[2] = 1.0
    tele = RoutingTelemetry({5: layer}, collapse_share=0.5, patience=2)
    x = torch.rand(30, 8) + 0.1                # every token picks expert 2
    warnings = []
    for _ in range(2):
        tele.update({5: layer(x)[1]})
        warnings = tele.flush()[2]
    text = " ".join(warnings)
    assert "routing collapse in layer 5: expert 2" in text and "aux_loss_coef" in text
    assert "3 dead experts in layer 5" in text
    assert "e2 100.0%" in routing_summary({5: [0, 0, 30, 0]})


def test_no_warning_for_balanced_routing():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2))
    tele = RoutingTelemetry({0: layer}, patience=1)
    tele.update({0: layer(torch.randn(200, 16))[1]})
    metrics, _, warnings = tele.flush()
    assert warnings == [] and metrics["moe/layer0/dead_experts"] == 0
    assert 0 < metrics["moe/layer0/token_entropy"] <= math.log(4) + 1e-6
