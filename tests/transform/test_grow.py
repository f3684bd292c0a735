"""Growing: fpi and zero widths and zero depth keep the source's logits, for dense and MoE
models (mixed layers, a shared expert, tied and untied embeddings, q/k/v biases, q/k norms);
copies diverge with training; aki and stack do what they promise; bad growths are refused."""

import pytest
import torch

from moekit.cli.main import main as cli
from moekit.model.config import ModelConfig
from moekit.model.transformer import MoETransformer
from moekit.moe.config import MoEConfig
from moekit.transform.grow import block_plan, grow, grow_is_exact

V = 101
TOKENS = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(3))


def source(kind="dense", tie=True):
    torch.manual_seed(0)
    moe = None
    if kind == "moe":   # layers 0 and 2 MoE, 1 dense; a sigmoid router with a bias, noise, a gated shared FFN
        moe = MoEConfig(d_model=32, d_ff=32, num_experts=4, top_k=2, num_shared_experts=1, shared_gate=True,
                        router="sigmoid", aux_loss_free=True, noisy_gating=True)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, qkv_bias=True,
                      qk_norm="head", tie_embeddings=tie, moe_layers=[0, 2], moe=moe)
    model = MoETransformer.build(cfg)
    with torch.no_grad():                       # larger weights: differences would show
        for name, p in model.named_parameters():
            p.mul_(5.0) if "norm" not in name else p.uniform_(0.5, 1.5)
        for layer in model.moe_layers().values():
            layer.router.expert_bias_E.uniform_(-0.2, 0.2)   # carried, or routing changes
    return model.eval()


def assert_same_function(src, big):
    with torch.no_grad():
        want, got = src(TOKENS).logits, big.eval()(TOKENS).logits
    assert float(want.std()) > 0.3 and float(want.abs().max()) > 1.5   # a comparison that could fail
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


MODELS = [("dense", True), ("dense", False), ("moe", True), ("moe", False)]
GROWTHS = {
    "d_ff": dict(d_ff=96),
    "expert_d_ff": dict(expert_d_ff=48),
    "heads": dict(n_heads=8),
    "heads_6": dict(n_heads=6),                      # 6 heads of 8 on d_model 32: head_dim set explicitly
    "kv_heads": dict(n_kv_heads=4),
    "heads_and_kv": dict(n_heads=12, n_kv_heads=4),
    "d_model_fpi": dict(d_model=64),
    "d_model_zero": dict(d_model=48, width_mode="zero"),
    "depth_zero": dict(n_layers=5),
    "depth_double": dict(n_layers=6),
    "all_fpi": dict(d_model=64, d_ff=80, expert_d_ff=40, n_heads=8, n_kv_heads=4, n_layers=4),
    "all_zero": dict(d_model=40, d_ff=80, expert_d_ff=40, n_heads=6, width_mode="zero", n_layers=5),
}


@pytest.mark.parametrize("kind, tie", MODELS)
@pytest.mark.parametrize("growth", sorted(GROWTHS))
def test_grown_model_computes_the_source_function(kind, tie, growth):
    kwargs = dict(GROWTHS[growth])
    if kind == "dense":
        kwargs.pop("expert_d_ff", None)
        if not kwargs:
            return
    src = source(kind, tie)
    big = grow(src, **kwargs)
    for name in ("d_model", "d_ff", "n_heads", "n_layers"):
        assert getattr(big.cfg, name) == kwargs.get(name, getattr(src.cfg, name))
    if "n_kv_heads" in kwargs:
        assert big.cfg.n_kv_heads == kwargs["n_kv_heads"]
    if kind == "moe":
        assert big.cfg.moe.d_ff == kwargs.get("expert_d_ff", 32) == big.cfg.moe.shared_width
        assert len(big.moe_layers()) >= 2 and len(big.moe_layers()) < big.cfg.n_layers
    assert big.cfg.head_dim == 8 and big.cfg.tie_embeddings == tie
    assert grow_is_exact(src, big, kwargs.get("width_mode", "fpi"), "zero")
    assert_same_function(src, big)


def test_mha_model_stays_mha_and_grows_heads():
    torch.manual_seed(0)
    src = MoETransformer.build(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=64))
    with torch.no_grad():
        for p in src.parameters():
            p.mul_(5.0)
    big = grow(src.eval(), n_heads=6, d_model=64)
    assert (big.cfg.n_heads, big.cfg.n_kv_heads, big.cfg.head_dim) == (6, None, 8)
    assert_same_function(src, big)


def _train(model, steps=3):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        out = model(TOKENS)
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, V), TOKENS[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()


def _copy_pairs(w_new, w_old, size=1):
    """(new unit, old unit) pairs for units past the old count that equal an old unit (rows)."""
    n_old = w_old.shape[0] // size
    units = w_new.detach().view(w_new.shape[0] // size, -1)
    pairs = [(j, i) for j in range(n_old, units.shape[0]) for i in range(n_old)
             if torch.equal(units[j], units[i])]
    assert len(pairs) == units.shape[0] - n_old      # every new unit a copy of exactly one old unit
    return pairs


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_copies_diverge_with_training(kind):
    src = source(kind, tie=False)
    big = grow(src, d_model=64, d_ff=96, n_heads=8)
    ffn, attn = big.blocks[1].ffn, big.blocks[0].attn          # layer 1 is dense in both models
    ffn_pairs = _copy_pairs(ffn.w_gate.weight, src.blocks[1].ffn.w_gate.weight)
    embed_cols = big.embed.weight.detach().t()
    assert torch.equal(embed_cols[32:], embed_cols[:32])       # every channel copied once (k = 2)
    heads = attn.wq.weight.detach().view(8, -1)
    assert len({tuple(h.tolist()) for h in heads}) == 4        # 4 new query heads, copies at step 0
    down = ffn.w_down.weight.detach()
    for j, i in ffn_pairs[:4]:                                  # split, not copied
        assert not torch.equal(down[:, j], down[:, i])
    _train(big)
    rows = ffn.w_gate.weight.detach()
    assert all(not torch.equal(rows[j], rows[i]) for j, i in ffn_pairs)
    embed_cols = big.embed.weight.detach().t()
    assert all(not torch.equal(embed_cols[c + 32], embed_cols[c]) for c in range(32))
    heads = attn.wq.weight.detach().view(8, -1)
    assert len({tuple(h.tolist()) for h in heads}) == 8        # no two query heads alike any more


def test_heads_copy_heads_of_their_own_kv_group():
    src = source("dense")
    big = grow(src, n_heads=8)                                  # 2 kv groups: 2 -> 4 query heads each
    for block, old in zip(big.blocks, src.blocks):
        q_new, q_old = block.attn.wq.weight.detach().view(8, -1), old.attn.wq.weight.detach().view(4, -1)
        for h in range(8):
            group = h // 4
            assert any(torch.equal(q_new[h], q_old[s]) for s in (2 * group, 2 * group + 1))
        assert torch.equal(block.attn.wk.weight, old.attn.wk.weight)


def test_new_blocks_are_zero_branch_copies_placed_between_old_ones():
    assert block_plan(4, 5, "zero") == [(0, False), (1, False), (1, True), (2, False), (3, False)]
    assert block_plan(3, 6, "zero") == [(0, False), (0, True), (0, True), (1, False), (1, True), (2, False)]
    assert block_plan(30, 32, "zero").index((7, True)) == 8      # SmolLM2: after blocks 7 and 21
    assert [p for p, (_, fresh) in enumerate(block_plan(30, 32, "zero")) if fresh] == [8, 23]
    assert block_plan(1, 3, "zero") == [(0, False), (0, True), (0, True)]
    src = source("moe")
    big = grow(src, n_layers=4)                                 # one new block, after block 0 (MoE)
    assert big.cfg.moe_layer_ids() == [0, 1, 3]
    new = big.blocks[1]
    for w in (new.attn.wo.weight, new.ffn.experts.w_down_EFD, new.ffn.shared.w_down.weight):
        assert float(w.detach().abs().max()) == 0
    assert torch.equal(new.attn.wq.weight, src.blocks[0].attn.wq.weight)
    assert torch.equal(new.ffn.experts.w_up_EDF, src.blocks[0].ffn.experts.w_up_EDF)
    assert torch.equal(new.ffn.router.expert_bias_E, src.blocks[0].ffn.router.expert_bias_E)
    assert torch.equal(big.blocks[3].ffn.router.expert_bias_E, src.blocks[2].ffn.router.expert_bias_E)
    deeper = grow(source("dense"), n_layers=5)                  # after block 0 and block 1 (dense)
    assert float(deeper.blocks[3].ffn.w_down.weight.detach().abs().max()) == 0
    assert torch.equal(deeper.blocks[3].ffn.w_up.weight, deeper.blocks[2].ffn.w_up.weight)
    _train(big, steps=2)
    assert float(new.attn.wo.weight.detach().abs().max()) > 0            # it learns


def test_stack_repeats_the_block_sequence():
    src = source("moe")
    big = grow(src, n_layers=6, depth_mode="stack")
    assert big.cfg.moe_layer_ids() == [0, 2, 3, 5]
    for i in range(3):
        for name, t in big.blocks[i].state_dict().items():
            assert torch.equal(big.blocks[i + 3].state_dict()[name], t), name
            assert torch.equal(src.blocks[i].state_dict()[name], t), name
    assert not grow_is_exact(src, big, "fpi", "stack")


def test_aki_keeps_the_old_weights_and_takes_the_new_from_the_next_layer():
    src = source("moe", tie=False)
    big = grow(src, d_model=48, d_ff=96, expert_d_ff=40, width_mode="aki")
    assert not grow_is_exact(src, big, "aki", "zero")
    b0, s0, s1, s2 = big.blocks[0], src.blocks[0], src.blocks[1], src.blocks[2]
    # attention of block 0: old part unchanged, new input channels (cyclic j mod 32) from block 1
    wq = b0.attn.wq.weight.detach()
    assert torch.equal(wq[:, :32], s0.attn.wq.weight) and torch.equal(wq[:, 32:], s1.attn.wq.weight[:, :16])
    # experts of block 0 (MoE): the next MoE layer is block 2
    up = b0.ffn.experts.w_up_EDF.detach()                        # [E, D, X]
    assert torch.equal(up[:, :32, :32], s0.ffn.experts.w_up_EDF)
    for j in range(32, 40):                                      # a new expert unit: block 2's unit
        assert any(torch.equal(up[:, :32, j], s2.ffn.experts.w_up_EDF[:, :, u]) for u in range(32))
    assert torch.equal(up[:, 32:, :32], s2.ffn.experts.w_up_EDF[:, :16])
    # dense FFN of block 1 (the last dense block): no next one, so its own units
    gate = big.blocks[1].ffn.w_gate.weight.detach()
    assert torch.equal(gate[:64, :32], s1.ffn.w_gate.weight)
    for j in range(64, 96):
        assert any(torch.equal(gate[j, :32], s1.ffn.w_gate.weight[u]) for u in range(64))
    assert torch.equal(big.blocks[0].attn_norm.weight[32:], s1.attn_norm.weight[:16])
    with torch.no_grad():
        assert big(TOKENS).logits.isfinite().all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(d_model=16), "d_model=16 must be an integer >= the model's 32"),
    (dict(n_layers=2), "n_layers=2 must be an integer >= the model's 3"),
    (dict(d_ff=64.5), "d_ff=64.5 must be an integer"),
    (dict(n_heads=7), "n_heads=7 is not a multiple of n_kv_heads=2"),
    (dict(n_kv_heads=3), "n_heads=4 is not a multiple of n_kv_heads=3"),
    (dict(d_model=48), "not a multiple of 32: width_mode='fpi'.*width_mode='zero'"),
    (dict(d_ff=96, width_mode="wide"), "width_mode='wide' is not one of"),
    (dict(n_layers=4, depth_mode="copy"), "depth_mode='copy' is not one of"),
    (dict(n_layers=4, depth_mode="stack"), "n_layers=4 is not a multiple of 3"),
    (dict(d_model=32, n_layers=3), "nothing to grow"),
    (dict(), "nothing to grow"),
    (dict(expert_d_ff=64), "the model is dense"),
])
def test_refusals_are_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        grow(source("dense"), **kwargs)
    assert "\n" not in str(err.value)


def test_refusals_of_head_norms_groups_and_all_moe_d_ff():
    gqa = MoETransformer.build(ModelConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=8, n_kv_heads=2,
                                           d_ff=64))
    with pytest.raises(ValueError, match="n_heads=9, n_kv_heads=3 leave a kv group 3 query heads, too few"):
        grow(gqa, n_heads=9, n_kv_heads=3)                      # old groups hold 4 query heads
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=64, qk_norm="full",
                      moe=MoEConfig(d_model=32, d_ff=32, num_experts=4))
    model = MoETransformer.build(cfg)
    with pytest.raises(ValueError, match="qk_norm='full'"):
        grow(model, n_heads=8)
    with pytest.raises(ValueError, match="every layer is MoE"):
        grow(model, d_ff=128)
    assert grow(model, d_model=64).cfg.d_model == 64             # full q/k norms keep their width


def test_cli_grows_a_model_directory(tmp_path, capsys):
    from moekit.config import RunConfig
    from moekit.data.tokenizer import train_tokenizer
    from moekit.store.run_dir import load_run, save_export
    model = MoETransformer.build(ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4,
                                             d_ff=64)).eval()
    tok = train_tokenizer(["the house will come to order " * 10] * 4, vocab_size=300)
    save_export(model, tok, RunConfig(model=model.cfg), tmp_path / "small")
    assert cli(["grow", str(tmp_path / "small"), "--d-model", "64", "--n-heads", "8", "--n-layers", "3",
                "--out", str(tmp_path / "big")]) == 0
    out = capsys.readouterr().out
    assert "d_model 32 -> 64" in out and "n_layers 2 -> 3" in out and "the source function at step 0" in out
    big, _, _ = load_run(tmp_path / "big")
    assert (big.cfg.d_model, big.cfg.n_heads, big.cfg.n_layers) == (64, 8, 3)
    x = torch.tensor([tok.encode("the house will come").ids])
    with torch.no_grad():
        assert torch.allclose(big(x).logits, model(x).logits, atol=1e-5)
    for bad, match in [(["--d-model", "48"], "d_model=48 is not a multiple of 32"),
                       (["--n-layers", "1"], "n_layers=1 must be an integer >= the model's 2"),
                       (["--width-mode", "nope", "--d-ff", "96"], "width_mode='nope' is not one of")]:
        assert cli(["grow", str(tmp_path / "small"), "--out", str(tmp_path / "bad")] + bad) == 2
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "bad").exists()


def test_growth_is_seeded_and_leaves_the_global_rng_alone():
    src = source("moe")
    state = torch.get_rng_state()
    a, b, c = (grow(src, d_ff=96, expert_d_ff=48, seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.blocks[1].ffn.w_down.weight, b.blocks[1].ffn.w_down.weight)
    assert not torch.equal(a.blocks[1].ffn.w_down.weight, c.blocks[1].ffn.w_down.weight)


DYNAMIC = {"top_p": dict(top_p=0.7, max_k=3, target_k=2), "null": dict(num_null_experts=3),
           "relu": dict(max_k=3, target_k=1.5)}


def dynamic_source(mode):
    """Layers 0 and 2 MoE with a dynamic number of experts per token, a moved budget knob."""
    torch.manual_seed(0)
    moe = MoEConfig(d_model=32, d_ff=32, num_experts=4, top_k=2, num_shared_experts=1, dynamic_k=mode,
                    **DYNAMIC[mode])
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64,
                      moe_layers=[0, 2], moe=moe)
    model = MoETransformer.build(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.mul_(5.0) if "norm" not in name else p.uniform_(0.5, 1.5)
        for i, layer in model.moe_layers().items():
            layer.router.k_control.fill_({"top_p": 0.8, "null": -0.5, "relu": 0.01}[mode] + i / 100)
    return model.eval()


@pytest.mark.parametrize("mode", sorted(DYNAMIC))
@pytest.mark.parametrize("growth", ["all_fpi", "all_zero"])
def test_a_dynamic_number_of_experts_grows_with_its_function(mode, growth):
    src = dynamic_source(mode)
    with torch.no_grad():
        hist = src(TOKENS).moe[0].experts_per_token
    assert (hist > 0).sum() >= 2                         # the premise: tokens take different numbers
    big = grow(src, **GROWTHS[growth])
    assert_same_function(src, big)
    old, new = src.blocks, big.blocks
    plan = block_plan(3, big.cfg.n_layers, "zero")
    for p, (i, _) in enumerate(plan):                    # every block's knob is its source block's
        if i in (0, 2):
            assert torch.equal(new[p].ffn.router.k_control, old[i].ffn.router.k_control)
            if mode == "null":
                assert new[p].ffn.router.null_ND.shape == (3, big.cfg.d_model)
