"""Layers that must compute the same function: one expert = dense FFN; generous capacity =
dropless; moekit's layer = transformers' Mixtral sparse MoE block with the same weights."""

import pytest
import torch

from moekit import DenseFFN, MoEConfig, MoELayer

from ..conftest import rel_err


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("backend", ["segment_mm", "grouped_mm"])
def test_one_expert_top1_is_a_dense_ffn(activation, backend):
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=16, d_ff=32, num_experts=1, top_k=1, activation=activation,
                               backend=backend))
    dense = DenseFFN(16, 32, activation)
    with torch.no_grad():
        if activation == "swiglu":
            dense.w_gate.weight.copy_(layer.experts.w_gate_EDF[0].t())
        dense.w_up.weight.copy_(layer.experts.w_up_EDF[0].t())
        dense.w_down.weight.copy_(layer.experts.w_down_EFD[0].t())
    x1 = torch.randn(3, 7, 16, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    g = torch.randn(3, 7, 16)
    y_moe, aux = layer(x1)
    y_dense = dense(x2)
    torch.testing.assert_close(y_moe, y_dense, rtol=1e-5, atol=1e-6)
    y_moe.backward(g)
    y_dense.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.experts.w_up_EDF.grad[0], dense.w_up.weight.grad.t(),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.experts.w_down_EFD.grad[0], dense.w_down.weight.grad.t(),
                               rtol=1e-5, atol=1e-6)
    assert float(aux.load_balancing_loss.detach()) == pytest.approx(1.0)   # E * f * P = 1 * 1 * 1


@pytest.mark.parametrize("policy", ["position", "probability"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_capacity_equals_dropless(policy, dtype):
    torch.manual_seed(1)
    base = dict(d_model=16, d_ff=16, num_experts=8, top_k=2, dtype=dtype)
    dropless = MoELayer(MoEConfig(**base))
    capped = MoELayer(MoEConfig(**base, capacity_factor=8.0, drop_policy=policy))
    capped.load_state_dict(dropless.state_dict())
    x1 = torch.randn(40, 16, dtype=dtype, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, a1 = dropless(x1)
    y2, a2 = capped(x2)
    assert float(a2.dropped_fraction) == 0.0
    assert torch.equal(a1.tokens_per_expert, a2.tokens_per_expert)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y1, y2, **tol)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, **tol)
    for (n, p1), p2 in zip(dropless.named_parameters(), capped.parameters()):
        assert rel_err(p2.grad, p1.grad) < (1e-5 if dtype == torch.float32 else 2e-2), n


def mixtral_block_from(layer: MoELayer):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    cfg = layer.cfg
    hf = MixtralSparseMoeBlock(MixtralConfig(hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                                             num_local_experts=cfg.num_experts,
                                             num_experts_per_tok=cfg.top_k))
    ex = layer.experts
    with torch.no_grad():
        hf.gate.weight.copy_(layer.router.weight_ED)
        # transformers 5.x fuses experts: gate_up_proj [E, 2F, D] = cat(gate, up), down_proj [E, D, F]
        hf.experts.gate_up_proj.copy_(torch.cat([ex.w_gate_EDF, ex.w_up_EDF], dim=2).transpose(1, 2))
        hf.experts.down_proj.copy_(ex.w_down_EFD.transpose(1, 2))
    return hf


@pytest.mark.parametrize("E,K", [(8, 2), (4, 4), (6, 3)])
def test_matches_transformers_mixtral_block(E, K):
    # K >= 2: Mixtral renormalizes even a single weight to 1; with K = 1 we keep the Switch
    # weight (the probability), so that the task loss still trains the router.
    pytest.importorskip("transformers")
    torch.manual_seed(2)
    layer = MoELayer(MoEConfig(d_model=32, d_ff=48, num_experts=E, top_k=K))
    hf = mixtral_block_from(layer)
    hf.eval()
    x1 = torch.randn(2, 11, 32, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y, _ = layer(x1)
    y_hf = hf(x2)
    y_hf = y_hf[0] if isinstance(y_hf, tuple) else y_hf
    torch.testing.assert_close(y, y_hf, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_hf.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.router.weight_ED.grad, hf.gate.weight.grad, rtol=1e-4, atol=1e-6)
