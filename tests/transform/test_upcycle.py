"""Upcycling: copy and virtual-group preserve the dense function at step 0 for every layer
pattern and top_k 1 and 2; drop re-initialises what it promises and nothing else."""

import pytest
import torch

from moekit.cli.main import main as cli
from moekit.model.config import ModelConfig
from moekit.model.transformer import MoETransformer
from moekit.transform.upcycle import upcycle, upcycle_is_exact


def dense(n_layers=4, tie=True):
    torch.manual_seed(0)
    model = MoETransformer.build(ModelConfig(vocab_size=101, d_model=32, n_layers=n_layers, n_heads=4,
                                             n_kv_heads=2, d_ff=64, tie_embeddings=tie))
    with torch.no_grad():                       # larger weights: differences would show
        for p in model.parameters():
            p.mul_(5.0)
    return model.eval()


TOKENS = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(3))


def assert_same_function(src, moe):
    with torch.no_grad():
        want, got = src(TOKENS).logits, moe.eval()(TOKENS).logits
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert float(want.std()) > 1.0                # a comparison that could fail


@pytest.mark.parametrize("layers", ["all", "alternate", [0, 3]])
@pytest.mark.parametrize("experts, top_k, G", [(8, 4, 4), (8, 2, 2), (4, 4, 4), (4, 2, 1), (8, 8, 2)])
@pytest.mark.parametrize("router_init", ["normal", "zeros"])
def test_virtual_group_upcycle_equals_the_dense_model(layers, experts, top_k, G, router_init):
    src = dense()
    moe = upcycle(src, experts, top_k, method="virtual-group", granularity=G, layers=layers,
                  router_init=router_init)
    m = moe.cfg.moe
    assert (m.d_ff, m.num_experts, m.top_k) == (64 // G, experts, top_k)
    ex = moe.moe_layers()[moe.cfg.moe_layer_ids()[0]].experts
    i = moe.cfg.moe_layer_ids()[0]
    assert torch.equal(ex.w_up_EDF[G - 1], src.blocks[i].ffn.w_up.weight.t()[:, (G - 1) * (64 // G):])
    assert_same_function(src, moe)
    out = moe(TOKENS).moe
    assert all(int(a.tokens_per_expert.sum()) == TOKENS.numel() * top_k for a in out.values())


def test_virtual_group_top_k_g_has_the_dense_active_parameters():
    from moekit.model.transformer import model_flops
    src = dense()
    moe = upcycle(src, 16, 4, method="virtual-group", granularity=4)
    assert model_flops(moe.cfg)["params_active"] == pytest.approx(
        model_flops(src.cfg)["params_active"] + 4 * 16 * 32)      # + the routers (E x D per layer)


@pytest.mark.parametrize("method", ["copy", "drop"])
@pytest.mark.parametrize("gate", [False, True])
def test_shared_expert_from_the_ffn(method, gate):
    src = dense()
    ratio = {"drop_ratio": 0.0} if method == "drop" else {}
    moe = upcycle(src, 4, 2, method=method, shared_from_ffn=True, shared_gate=gate, **ratio)
    layer = moe.blocks[0].ffn
    assert moe.cfg.moe.num_shared_experts == 1 and (layer.shared_gate is not None) == gate
    assert torch.equal(layer.shared.w_up.weight, src.blocks[0].ffn.w_up.weight)
    factor = 1.0 if gate else 0.5              # a zero gate weight halves the shared output itself
    assert torch.equal(layer.shared.w_down.weight, src.blocks[0].ffn.w_down.weight * factor)
    assert_same_function(src, moe)              # drop with ratio 0 is a copy


@pytest.mark.parametrize("ratio", [0.25, 0.5, 1.0])
def test_drop_upcycle_reinitialises_its_share_per_expert(ratio):
    src = dense(n_layers=2, tie=False)
    moe = upcycle(src, 4, 2, method="drop", drop_ratio=ratio, seed=7)
    assert not upcycle_is_exact(moe.cfg.moe, "drop")
    ffn, ex = src.blocks[1].ffn, moe.blocks[1].ffn.experts
    gate_DF, down_FD = ffn.w_gate.weight.t(), ffn.w_down.weight.t()
    changed = []
    for e in range(4):
        cols = (ex.w_gate_EDF[e] != gate_DF).any(0)         # the hidden units re-drawn
        assert torch.equal(cols, (ex.w_up_EDF[e] != ffn.w_up.weight.t()).any(0))
        assert torch.equal(cols, (ex.w_down_EFD[e] != down_FD).any(1))
        assert int(cols.sum()) == round(ratio * 64)
        kept = ~cols
        assert torch.equal(ex.w_gate_EDF[e][:, kept], gate_DF[:, kept])
        changed.append(cols)
        if ratio == 1.0:                                     # drawn from the matrix's statistics
            std = float(gate_DF.detach().std())
            assert float(ex.w_gate_EDF[e].detach().std()) == pytest.approx(std, rel=0.15)
            assert float(ex.w_down_EFD[e].detach().mean()) == pytest.approx(float(down_FD.detach().mean()),
                                                                   abs=0.2 * float(down_FD.detach().std()))
    if ratio < 1:
        assert len({tuple(c.tolist()) for c in changed}) == 4   # each expert its own share
    for a, b in zip(ex.w_up_EDF[:-1], ex.w_up_EDF[1:]):
        assert not torch.equal(a, b)                          # distinct experts
    for name, t in src.state_dict().items():                  # attention, norms, embeddings untouched
        if ".ffn." not in name:
            assert torch.equal(moe.state_dict()[name], t), name
    again = upcycle(src, 4, 2, method="drop", drop_ratio=ratio, seed=7)
    assert torch.equal(again.blocks[1].ffn.experts.w_up_EDF, ex.w_up_EDF)   # seeded


@pytest.mark.parametrize("layers", ["all", "alternate", [0, 3]])
@pytest.mark.parametrize("experts, top_k", [(2, 2), (8, 2), (8, 3), (4, 1)])
@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_copy_upcycle_equals_the_dense_model(layers, experts, top_k, router):
    src = dense()
    moe = upcycle(src, experts, top_k, layers=layers, router=router).eval()
    assert upcycle_is_exact(moe.cfg.moe, "copy")
    assert_same_function(src, moe)
    assert sorted(moe.moe_layers()) == moe.cfg.moe_layer_ids() and moe.moe_layers()
    aux = moe(TOKENS).moe
    routed = sum(int((a.tokens_per_expert > 0).sum()) for a in aux.values())
    assert routed > len(aux)                    # the router spreads tokens: not one expert per layer


def test_upcycled_experts_are_copies_and_diverge_with_training():
    src = dense(n_layers=2, tie=False)
    moe = upcycle(src, 4, 2).train()
    ex = moe.blocks[0].ffn.experts
    assert torch.equal(ex.w_up_EDF[0], src.blocks[0].ffn.w_up.weight.t())
    assert torch.equal(ex.w_up_EDF[3], ex.w_up_EDF[0])
    assert torch.equal(moe.blocks[1].attn.wq.weight, src.blocks[1].attn.wq.weight)   # attention untouched
    assert torch.equal(moe.lm_head.weight, src.lm_head.weight)
    opt = torch.optim.SGD(moe.parameters(), lr=1e-3)
    for _ in range(2):
        out = moe(TOKENS)
        (out.logits.float().logsumexp(-1).mean() + 0.01 * out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(ex.w_up_EDF[0], ex.w_up_EDF[1])       # the router breaks the symmetry


def test_router_init_and_refusals():
    src = dense(n_layers=2)
    zeros = upcycle(src, 4, 2, router_init="zeros")
    assert all(float(layer.router.weight_ED.detach().abs().max()) == 0
               for layer in zeros.moe_layers().values())
    normal = upcycle(src, 4, 2, seed=1)
    std = float(normal.blocks[0].ffn.router.weight_ED.detach().std())
    assert 0.01 < std < 0.03
    with pytest.raises(ValueError, match="already an MoE"):
        upcycle(normal, 4, 2)
    with pytest.raises(ValueError, match="4 experts are fewer than top_k=5"):
        upcycle(src, 4, 5)
    assert not upcycle_is_exact(upcycle(src, 4, 2, capacity_factor=1.25).cfg.moe, "copy")
    assert not upcycle_is_exact(upcycle(src, 4, 1, top1_weight="prob").cfg.moe, "copy")
    for kwargs, match in [(dict(method="nope"), "method='nope'"),
                          (dict(method="drop", drop_ratio=1.5), "drop_ratio=1.5"),
                          (dict(granularity=2), "applies to method='virtual-group'"),
                          (dict(method="virtual-group", granularity=3), "granularity=3 must be"),
                          (dict(method="virtual-group", granularity=4), "multiples of granularity=4"),
                          (dict(activation="gelu"), "activation='gelu'"),
                          (dict(num_shared_experts=2), "num_shared_experts is set by the method"),
                          (dict(drop_ratio=0.3), "drop_ratio=0.3 applies to method='drop' only"),
                          (dict(layers=[]), "must list distinct layer indices"),
                          (dict(layers=[1, 1]), "must list distinct layer indices")]:
        with pytest.raises(ValueError, match=match):
            upcycle(src, 4, 2, **kwargs)


def test_cli_upcycles_a_model_directory(tmp_path, capsys):
    from moekit.config import RunConfig
    from moekit.data.tokenizer import train_tokenizer
    from moekit.store.run_dir import load_run, save_export
    model = MoETransformer.build(ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4,
                                             d_ff=64)).eval()
    tok = train_tokenizer(["the house will come to order " * 10] * 4, vocab_size=300)
    save_export(model, tok, RunConfig(model=model.cfg), tmp_path / "dense")
    assert cli(["upcycle", str(tmp_path / "dense"), "--experts", "4", "--layers", "1", "--out",
                str(tmp_path / "moe")]) == 0
    moe, _, _ = load_run(tmp_path / "moe")
    assert sorted(moe.moe_layers()) == [1]
    x = torch.tensor([tok.encode("the house will come").ids])
    with torch.no_grad():
        assert torch.allclose(moe(x).logits, model(x).logits, atol=1e-5)
    capsys.readouterr()
    assert cli(["upcycle", str(tmp_path / "moe"), "--experts", "4", "--out", str(tmp_path / "again")]) == 2
    assert "already an MoE" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def test_cli_methods_and_options(tmp_path, capsys):
    from moekit.config import RunConfig
    from moekit.data.tokenizer import train_tokenizer
    from moekit.store.run_dir import load_run, save_export
    model = MoETransformer.build(ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4,
                                             d_ff=64)).eval()
    tok = train_tokenizer(["the house will come to order " * 10] * 4, vocab_size=300)
    save_export(model, tok, RunConfig(model=model.cfg), tmp_path / "dense")
    x = torch.tensor([tok.encode("the house will come").ids])
    assert cli(["upcycle", str(tmp_path / "dense"), "--experts", "8", "--top-k", "4", "--method",
                "virtual-group", "--granularity", "4", "--set", "router=sigmoid", "--out",
                str(tmp_path / "vg")]) == 0
    out = capsys.readouterr().out
    assert "the dense function at step 0" in out and "cannot be exported to Hugging Face" in out
    moe, _, _ = load_run(tmp_path / "vg")
    assert (moe.cfg.moe.router, moe.cfg.moe.d_ff) == ("sigmoid", 16)
    with torch.no_grad():
        assert torch.allclose(moe(x).logits, model(x).logits, atol=1e-5)
    assert cli(["upcycle", str(tmp_path / "dense"), "--experts", "4", "--method", "drop", "--out",
                str(tmp_path / "drop")]) == 0
    assert "not the dense function" in capsys.readouterr().out
    for bad, match in [(["--set", "nope=1"], "--set nope: not an MoEConfig field"),
                       (["--set", "num_experts=3"], "--set num_experts: not an MoEConfig field"),
                       (["--experts", "1", "--top-k", "2"], "1 experts are fewer than top_k=2"),
                       (["--layers", ""], "--layers '': give all, alternate"),
                       (["--drop-ratio", "0.2"], "applies to method='drop' only")]:
        argv = ["upcycle", str(tmp_path / "dense"), "--experts", "4", "--out", str(tmp_path / "bad")] + bad
        assert cli(argv) == 2
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_top_p_upcycle_equals_the_dense_model(top_k, router):
    """top_p's renormalised weights over identical experts sum to one, whichever experts a token
    takes, once it takes two or more (min_k=2): the copy upcycle is the dense function (top_k = 1
    takes no top1_weight here). A token with one expert keeps its probability as its weight."""
    src = dense()
    moe = upcycle(src, 8, top_k, router=router, dynamic_k="top_p", top_p=0.5, min_k=2, target_k=3).eval()
    assert moe.cfg.moe.top1_weight == "prob" and upcycle_is_exact(moe.cfg.moe, "copy")
    assert_same_function(src, moe)
    hist = moe(TOKENS).moe[0].experts_per_token
    assert (hist > 0).sum() >= 2                     # the premise: tokens took different numbers of experts
    assert not upcycle_is_exact(moe.cfg.moe, "virtual-group")
    one = upcycle(src, 8, top_k, router=router, dynamic_k="top_p", top_p=0.1).eval()   # one expert each
    assert not upcycle_is_exact(one.cfg.moe, "copy")
    with torch.no_grad():
        assert float((one(TOKENS).logits - src(TOKENS).logits).abs().max()) > 1e-2


@pytest.mark.parametrize("mode, extra", [("null", dict(num_null_experts=4)), ("relu", {})])
@pytest.mark.parametrize("router_init", ["normal", "zeros"])
def test_null_and_relu_upcycles_route_but_are_not_the_dense_function(mode, extra, router_init):
    src = dense(n_layers=2)
    if mode == "relu" and router_init == "zeros":
        with pytest.raises(ValueError) as err:
            upcycle(src, 4, 2, dynamic_k=mode, router_init=router_init)
        assert str(err.value) == ("upcycle: router_init='zeros' with dynamic_k='relu' gates every expert "
                                  "relu(0) = 0: no token reaches an expert and no gate gets a gradient; use "
                                  "router_init='normal'")
        return
    moe = upcycle(src, 4, 2, dynamic_k=mode, router_init=router_init, seed=1, **extra).eval()
    assert not upcycle_is_exact(moe.cfg.moe, "copy")
    for layer in moe.moe_layers().values():          # the null experts' rows start like the experts'
        r = layer.router
        if mode == "null":
            null = r.null_ND.detach()
            assert (float(null.abs().max()) == 0) == (router_init == "zeros")
            assert router_init == "zeros" or 0.01 < float(null.std()) < 0.03
    with torch.no_grad():
        out = moe(TOKENS)
    assert torch.isfinite(out.logits).all() and sum(int(a.tokens_per_expert.sum()) for a in out.moe.values())


def test_cli_upcycles_into_a_dynamic_number_of_experts(tmp_path, capsys):
    from moekit.config import RunConfig
    from moekit.data.tokenizer import train_tokenizer
    from moekit.store.run_dir import load_run, save_export
    tok = train_tokenizer(["the house will come to order " * 10] * 4, vocab_size=300)
    model = MoETransformer.build(ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4,
                                             d_ff=64)).eval()
    save_export(model, tok, RunConfig(model=model.cfg), tmp_path / "dense")
    assert cli(["upcycle", str(tmp_path / "dense"), "--experts", "4", "--set", "dynamic_k=top_p", "--set",
                "min_k=2", "--set", "target_k=2", "--out", str(tmp_path / "moe")]) == 0
    out = capsys.readouterr().out
    assert "; the dense function at step 0;" in out
    assert "cannot be exported to Hugging Face (dynamic_k='top_p' (a dynamic number of experts per token) " \
           "has no equivalent" in out
    moe, _, _ = load_run(tmp_path / "moe")
    assert (moe.cfg.moe.dynamic_k, moe.cfg.moe.min_k, moe.cfg.moe.target_k) == ("top_p", 2, 2)
    x = torch.tensor([tok.encode("the house will come").ids])
    with torch.no_grad():
        assert torch.allclose(moe(x).logits, model(x).logits, atol=1e-5)


@pytest.mark.parametrize("method, experts, top_k, G", [("copy", 8, 2, 1), ("virtual-group", 16, 4, 4)])
def test_softmax_then_topk_upcycle_is_scaled_back_to_the_dense_function(method, experts, top_k, G):
    """Megatron's granular upcycling: unrenormalised top-k weights sum to k/E at a uniform router,
    so the experts are scaled by E / k; with a zero router the upcycle is exact."""
    src = dense()
    kw = dict(method=method, normalize_topk=False, router_init="zeros",
              **({"granularity": G} if G > 1 else {}))
    moe = upcycle(src, experts, top_k, **kw)
    assert upcycle_is_exact(moe.cfg.moe, method, "zeros")
    assert_same_function(src, moe)
    unscaled = upcycle(src, experts, top_k, weight_scale=1.0, **kw)
    with torch.no_grad():
        ratio = (unscaled.blocks[0].ffn.experts.w_down_EFD.abs().sum()
                 / moe.blocks[0].ffn.experts.w_down_EFD.abs().sum())
    assert float(ratio) == pytest.approx(top_k / experts)
    near = upcycle(src, experts, top_k, method=method, normalize_topk=False, router_std=1e-4,
                   **({"granularity": G} if G > 1 else {}))
    with torch.no_grad():               # a small random router: close to the dense function
        want = src(TOKENS).logits
        diff = (near.eval()(TOKENS).logits - want).abs().max() / want.abs().max()
    assert float(diff) < 1e-2
    with pytest.raises(ValueError, match="weight_scale=0 must be 'auto' or a number > 0"):
        upcycle(src, experts, top_k, weight_scale=0, **kw)
