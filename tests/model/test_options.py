"""The attention and shared-expert options the Hugging Face architectures need: checked where
they are defined, initialised, counted, and (with the defaults) the attention of before."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moekit import MoEConfig
from moekit.model import ModelConfig, MoETransformer, model_flops
from moekit.model.transformer import apply_rope


def cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=101, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=16,
                tie_embeddings=False)
    return ModelConfig(**{**base, **kw})


def moe(**kw) -> MoEConfig:
    return MoEConfig(**{**dict(d_model=32, d_ff=16, num_experts=4, top_k=2), **kw})


@pytest.mark.parametrize("kwargs, field", [
    (dict(qk_norm="layer"), "qk_norm"), (dict(qkv_bias=1), "qkv_bias"),
    (dict(head_dim=7), "head_dim"), (dict(head_dim=0), "head_dim"), (dict(head_dim=True), "head_dim"),
    (dict(n_heads=3), "n_heads"),                       # 32 / 3: a head_dim must be given
])
def test_bad_attention_options(kwargs, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}=") as err:
        cfg(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, field", [
    (dict(shared_d_ff=0, num_shared_experts=1), "shared_d_ff"),
    (dict(shared_d_ff=40), "shared_d_ff"),              # without shared experts
    (dict(shared_gate=True), "shared_gate"),
    (dict(shared_gate=1, num_shared_experts=1), "shared_gate"),
])
def test_bad_shared_options(kwargs, field):
    with pytest.raises(ValueError, match=f"MoEConfig.{field}="):
        moe(**kwargs)


def test_head_dim_defaults_to_d_model_over_n_heads_and_may_differ():
    assert cfg().head_dim == 8
    c = cfg(n_heads=3, n_kv_heads=1, head_dim=12)      # 3 * 12 = 36 != d_model: Qwen3 allows it
    model = MoETransformer(c)
    assert model.blocks[0].attn.wq.weight.shape == (36, 32) and model.rope_cos.shape == (16, 6)
    assert model(torch.randint(0, 101, (2, 9))).logits.shape == (2, 9, 101)


CONFIGS = [cfg(), cfg(qkv_bias=True, head_dim=12), cfg(qk_norm="head", head_dim=6), cfg(qk_norm="full"),
           cfg(moe=moe(num_shared_experts=1, shared_d_ff=40, shared_gate=True), qkv_bias=True,
               qk_norm="full", moe_layers=[1]),
           cfg(moe=moe(num_shared_experts=2, shared_gate=True), qk_norm="head")]


@pytest.mark.parametrize("c", CONFIGS)
def test_parameter_count_and_init(c):
    torch.manual_seed(0)
    model = MoETransformer.build(c)
    assert model_flops(c)["params_total"] == sum(p.numel() for p in model.parameters())
    for name, p in model.state_dict().items():
        if name.endswith(".bias"):
            assert float(p.abs().max()) == 0, name
        elif "q_norm" in name or "k_norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("shared_gate.weight"):
            assert 0 < float(p.abs().max()) < 0.1, name            # N(0, 0.02)
    names = [n for n, _ in model.named_parameters()]
    assert sum(n.endswith(".bias") for n in names) == 3 * c.n_layers * c.qkv_bias
    assert sum(".q_norm." in n or ".k_norm." in n for n in names) == 2 * c.n_layers * (c.qk_norm != "none")


def test_the_defaults_add_nothing_and_compute_the_attention_of_before():
    """No new parameters, and the attention is bit for bit the plain one: project, split the
    heads, RoPE, SDPA with GQA, project out."""
    torch.manual_seed(0)
    model = MoETransformer.build(cfg())
    assert not [n for n in model.state_dict() if n.endswith(".bias") or "q_norm" in n or "shared_gate" in n]
    attn, x = model.blocks[0].attn, torch.randn(2, 9, 32)
    cos, sin = model.rope_cos, model.rope_sin
    q = apply_rope(attn.wq(x).view(2, 9, 4, -1).transpose(1, 2), cos, sin)
    k = apply_rope(attn.wk(x).view(2, 9, 2, -1).transpose(1, 2), cos, sin)
    v = attn.wv(x).view(2, 9, 2, -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(attn(x, cos, sin), attn.wo(out.transpose(1, 2).reshape(2, 9, -1)))


@pytest.mark.parametrize("qk_norm", ["none", "head", "full"])
def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k(qk_norm):
    torch.manual_seed(0)
    model = MoETransformer.build(cfg(qk_norm=qk_norm))
    attn, x = model.blocks[0].attn, torch.randn(2, 9, 32)
    before = attn(x, model.rope_cos, model.rope_sin)
    with torch.no_grad():
        attn.wq.weight.mul_(7.0)
        attn.wk.weight.mul_(3.0)
    after = attn(x, model.rope_cos, model.rope_sin)
    same = torch.allclose(after, before, atol=1e-4)
    assert same == (qk_norm != "none")


def test_qk_norm_head_and_full_differ():
    """Per head (Qwen3) and over the whole projection (OLMoE) are different functions."""
    models = []
    for qk_norm in ("head", "full"):
        torch.manual_seed(0)
        models.append(MoETransformer.build(cfg(qk_norm=qk_norm)))
    head, full = models
    assert torch.equal(head.blocks[0].attn.wq.weight, full.blocks[0].attn.wq.weight)
    tokens = torch.randint(0, 101, (1, 9))
    assert not torch.allclose(head(tokens).logits, full(tokens).logits, atol=1e-4)


def test_dense_baseline_counts_the_shared_width():
    c = cfg(moe=moe(num_shared_experts=1, shared_d_ff=40, shared_gate=True))
    dense = c.dense_baseline()
    assert dense.moe is None and dense.d_ff == 2 * 16 + 40
    router_and_gate = c.n_layers * (4 * 32 + 32)
    assert model_flops(dense)["params_active"] == model_flops(c)["params_active"] - router_and_gate
    assert moe(num_shared_experts=3).shared_width == 48 and moe().shared_width == 0


def test_head_dim_none_is_resolved_once():
    """``head_dim=None`` becomes d_model // n_heads when built; replacing the width needs it again."""
    c = cfg()
    assert dataclasses.replace(c, d_model=64, head_dim=None).head_dim == 16
    assert dataclasses.replace(c, d_model=64).head_dim == 8


def test_weight_decay_spares_norms_biases_routers_and_the_shared_gate():
    from moekit.train.optim import param_groups
    moe = MoEConfig(d_model=32, d_ff=16, num_experts=4, num_shared_experts=1, shared_gate=True)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, d_ff=64, qkv_bias=True,
                      qk_norm="head", moe=moe)
    model = MoETransformer.build(cfg)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert {"blocks.0.ffn.shared_gate.weight", "blocks.0.ffn.router.weight_ED", "blocks.0.attn.wq.bias",
            "blocks.0.attn.q_norm.weight", "norm.weight"} <= spared
    assert "blocks.0.ffn.experts.w_up_EDF" in {names[id(p)] for p in decay["params"]}
