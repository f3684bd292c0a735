import pytest
import torch

from moekit import MoEConfig, MoELayer
from moekit.model import ModelConfig, MoETransformer, model_flops


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=101, d_model=32, n_layers=4, n_heads=4, d_ff=96, max_seq_len=16,
                moe=MoEConfig(d_model=32, d_ff=48, num_experts=4, top_k=2))
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("kw, ids", [(dict(moe_layers="all"), [0, 1, 2, 3]),
                                     (dict(moe_layers="alternate"), [1, 3]),
                                     (dict(moe=None), []), (dict(moe_layers=[0, 2]), [0, 2])])
def test_layer_pattern_and_outputs(kw, ids):
    torch.manual_seed(0)
    model = MoETransformer(small(**kw))
    out = model(torch.randint(0, 101, (2, 12)))
    assert out.logits.shape == (2, 12, 101)
    assert sorted(out.moe) == ids
    layers = model.moe_layers()
    assert list(layers) == ids and all(layers[i] is model.blocks[i].ffn for i in ids)
    assert all(isinstance(m, MoELayer) for m in layers.values())
    expected_aux = sum(float(a.load_balancing_loss.detach()) for a in out.moe.values())
    assert float(out.aux_loss.detach()) == pytest.approx(expected_aux)
    if ids:
        (out.logits.square().mean() + out.aux_loss + out.z_loss).backward()
        router = model.blocks[ids[0]].ffn.router.weight_ED
        assert router.grad is not None and router.grad.abs().sum() > 0


def test_causal():
    torch.manual_seed(0)
    model = MoETransformer(small()).eval()
    tokens = torch.randint(0, 101, (1, 12))
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 101
    a, b = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_grouped_query_attention_and_bf16_autocast():
    torch.manual_seed(0)
    model = MoETransformer(small(n_kv_heads=2))
    assert model.blocks[0].attn.wk.weight.shape == (16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randint(0, 101, (2, 8)))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


def test_meta_build_allocates_once_and_initializes():
    torch.manual_seed(0)
    model = MoETransformer.build(small(), device="cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model.lm_head.weight is model.embed.weight
    assert 0.015 < float(model.embed.weight.detach().std()) < 0.025
    assert float(model.blocks[0].ffn.router.expert_bias_E.abs().sum()) == 0
    torch.testing.assert_close(model.rope_cos, MoETransformer(small()).rope_cos)
    out = model(torch.randint(0, 101, (1, 5)))
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("cfg", [small(), small(moe_layers="alternate", tie_embeddings=False),
                                 small(moe=MoEConfig(d_model=32, d_ff=16, num_experts=8, top_k=2,
                                                     num_shared_experts=1, noisy_gating=True)),
                                 small(moe=None)])
def test_parameter_count_matches_the_model(cfg):
    model = MoETransformer(cfg)
    assert model_flops(cfg)["params_total"] == sum(p.numel() for p in model.parameters())


def test_dense_baseline_has_the_same_active_parameters():
    cfg = small()
    dense = cfg.dense_baseline()
    assert dense.moe is None and dense.d_ff == 2 * 48
    moe_active = model_flops(cfg)["params_active"]
    router = cfg.n_layers * 4 * 32
    assert model_flops(dense)["params_active"] == moe_active - router
    assert model_flops(cfg)["params_total"] > model_flops(dense)["params_total"]


def test_flops_per_token_formula():
    cfg = small(moe=None)
    f = model_flops(cfg, seq_len=16)
    assert f["flops_per_token"] == 6 * f["params_matmul_active"] + 12 * 4 * 32 * 16
    assert f["params_active"] == f["params_total"]               # dense: every parameter is active
    moe = model_flops(small(), seq_len=16)
    m = small().moe
    unused = small().n_layers * (m.num_experts - m.top_k) * 3 * 32 * m.d_ff
    assert moe["params_active"] == moe["params_total"] - unused   # only the experts a token skips


@pytest.mark.parametrize("kwargs, field", [
    (dict(n_heads=5), "n_heads"), (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(moe_layers="every"), "moe_layers"), (dict(moe_layers=[7]), "moe_layers"),
    (dict(d_model=64), "moe.d_model"), (dict(vocab_size=0), "vocab_size"),
])
def test_bad_model_config(kwargs, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}="):
        small(**kwargs)


def test_too_long_sequence_is_a_clear_error():
    with pytest.raises(ValueError, match="max_seq_len=16"):
        MoETransformer(small())(torch.zeros(1, 17, dtype=torch.long))


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    cfg = small(moe=MoEConfig(d_model=32, d_ff=48, num_experts=4, top_k=2, jitter_eps=0.05))
    a = MoETransformer(cfg)
    b = MoETransformer(cfg)
    b.load_state_dict(a.state_dict())
    b.activation_checkpointing = True
    tokens = torch.randint(0, 101, (2, 12))
    grads = []
    for model in (a, b):
        torch.manual_seed(1)
        out = model(tokens)
        (out.logits.square().mean() + out.aux_loss).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("cast", ["to", "bfloat16"])
def test_model_cast_to_bf16_trains(cast):
    """``model.to(torch.bfloat16)``: forward and backward run, every parameter gets a finite bf16
    gradient; the router logits stay float32, and so do the rotary tables (recomputed, not
    rounded) and the aux-loss-free bias."""
    torch.manual_seed(0)
    cfg = small(moe=MoEConfig(d_model=32, d_ff=48, num_experts=4, top_k=2, router="sigmoid",
                              aux_loss_free=True, num_shared_experts=1, jitter_eps=0.01))
    model = MoETransformer(cfg)
    rope_cos = model.rope_cos.clone()
    model = model.to(torch.bfloat16) if cast == "to" else model.bfloat16()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rope_cos.dtype == torch.float32 and torch.equal(model.rope_cos, rope_cos)
    assert model.blocks[0].ffn.router.expert_bias_E.dtype == torch.float32
    seen = []
    hook = model.blocks[0].ffn.router.register_forward_hook(lambda m, args, out: seen.append(out))
    out = model(torch.randint(0, 101, (2, 12)))
    hook.remove()
    assert out.logits.dtype == torch.bfloat16 and seen[0].logits_TE.dtype == torch.float32
    assert out.aux_loss.dtype == out.z_loss.dtype == torch.float32
    (out.logits.float().square().mean() + out.aux_loss + out.z_loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16, name
        assert torch.isfinite(p.grad.float()).all(), name
