"""Growing the number of experts: copies equal their sources (experts, router rows, the -log c
offset); a softmax router keeps each source's probability mass; what must hold exactly does
(top-1 with weight one, top_k = m * K); the jump at the unchanged top_k is measured; most_loaded
follows the loads; the optimizer's moments follow the mapping; the CLI; never-grown models and
their state dicts are unchanged; Hugging Face export refuses uneven offsets."""

import dataclasses
import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from moekit.cli.main import main as cli
from moekit.model.config import ModelConfig
from moekit.model.transformer import MoETransformer
from moekit.moe.config import MoEConfig
from moekit.moe.dispatch import LocalDispatcher
from moekit.train.optim import grow_optimizer_state
from moekit.transform.grow_experts import (
    exact_max_k,
    exact_top_k,
    grow_experts,
    grow_experts_is_exact,
    last_loads,
)

V = 300   # byte-level BPE needs >= 257
TOKENS = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(3))
LOADS = {0: [5.0, 40.0, 1.0, 12.0], 2: [7.0, 7.0, 30.0, 0.0]}     # layer 0: 1, 3, 0, 2; layer 2: 2, 0, 1, 3
PER_EXPERT = ("experts.w_gate_EDF", "experts.w_up_EDF", "experts.w_down_EFD", "router.weight_ED")


def source(router="softmax", top_k=2, **moe):
    """Layers 0 and 2 MoE (4 experts, a gated shared expert), layer 1 dense; weights scaled up
    so that routing is sharp and differences show."""
    torch.manual_seed(0)
    m = MoEConfig(d_model=32, d_ff=16, num_experts=4, top_k=top_k, router=router, num_shared_experts=1,
                  shared_gate=True, **moe)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=3, n_heads=4, d_ff=48, moe_layers=[0, 2], moe=m,
                      tie_embeddings=False)
    model = MoETransformer.build(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.mul_(4.0 if "router" in name else 3.0) if "norm" not in name else p.uniform_(0.5, 1.5)
        if m.aux_loss_free:
            for layer in model.moe_layers().values():
                layer.router.expert_bias_E.uniform_(-0.2, 0.2)
    return model.eval()


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model.eval()(tokens).logits


def lm_loss(model, tokens=TOKENS):
    out = logits(model, tokens)
    return float(F.cross_entropy(out[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1)))


def with_top_k(model, top_k):
    """The same weights under another top_k (a config change only)."""
    cfg = dataclasses.replace(model.cfg, moe=dataclasses.replace(model.cfg.moe, top_k=top_k))
    other = MoETransformer(cfg)
    other.load_state_dict(model.state_dict())
    return other.eval()


@pytest.mark.parametrize("router", ["softmax", "sigmoid", "expert_choice"])
@pytest.mark.parametrize("which, n", [("all", 8), ("all", 12), ("most_loaded", 6), ("most_loaded", 11)])
def test_copies_equal_their_sources(router, which, n):
    src = source(router, aux_loss_free=router == "sigmoid")
    big, mapping = grow_experts(src, n, which=which, loads=LOADS if which == "most_loaded" else None)
    assert big.cfg.moe.num_experts == n and big.cfg.moe.top_k == 2 and sorted(mapping) == [0, 2]
    old, new = src.state_dict(), big.state_dict()
    assert set(old) == set(new)                                    # no new keys: every loader reads it
    for i, s in mapping.items():
        assert len(s) == n and s[:4] == [0, 1, 2, 3]              # old experts keep their indices
        idx = torch.tensor(s)
        for key in PER_EXPERT:
            assert torch.equal(new[f"blocks.{i}.ffn.{key}"], old[f"blocks.{i}.ffn.{key}"][idx]), key
        if router != "expert_choice":
            bias = new[f"blocks.{i}.ffn.router.expert_bias_E"]
            c = torch.bincount(idx, minlength=4)[idx].double()
            shift = -c.log() if router == "softmax" else torch.zeros(n, dtype=torch.float64)
            want = old[f"blocks.{i}.ffn.router.expert_bias_E"][idx].double() + shift
            assert torch.allclose(bias.double(), want, atol=1e-7), bias
    for key, t in old.items():                                     # everything else as it was
        if not any(f"ffn.{k}" in key for k in PER_EXPERT + ("router.expert_bias_E",)):
            assert torch.equal(new[key], t), key


@pytest.mark.parametrize("which, n", [("all", 8), ("most_loaded", 7), ("most_loaded", 13)])
def test_softmax_router_keeps_each_experts_probability_mass(which, n):
    src = source()
    big, mapping = grow_experts(src, n, which=which, loads=LOADS if which == "most_loaded" else None)
    x = torch.randn(200, 32)
    with torch.no_grad():
        for i, s in mapping.items():
            router = big.moe_layers()[i].router
            before, after = src.moe_layers()[i].router(x), router(x)
            summed = torch.zeros_like(before.probs_TE).index_add_(1, torch.tensor(s), after.probs_TE)
            assert float((summed - before.probs_TE).abs().max()) <= 1e-6
            lse = torch.logsumexp(after.logits_TE, -1) - torch.logsumexp(before.logits_TE, -1)
            assert float(lse.abs().max()) <= 1e-5                  # so the z-loss is the source's too
            router.expert_bias_E.zero_()                           # without the offset: a check that fails
            unshifted = torch.zeros_like(summed).index_add_(1, torch.tensor(s), router(x).probs_TE)
            assert float((unshifted - before.probs_TE).abs().max()) > 0.05 or which == "all"


def test_grown_layers_match_the_slow_reference():
    from moekit.moe.reference import reference_moe
    big, _ = grow_experts(source(capacity_factor=1.0), 7, which="most_loaded", loads=LOADS)
    x = torch.randn(2, 24, 32)
    with torch.no_grad():
        for layer in big.moe_layers().values():
            assert float(layer.router.expert_bias_E.abs().max()) > 0.5        # the offset is in play
            torch.testing.assert_close(layer(x)[0], reference_moe(layer, x), atol=1e-5, rtol=1e-5)


def test_what_holds_exactly():
    # top-1 with weight one: the chosen copy is a copy of the source's choice, weight 1
    one = source(top_k=1, top1_weight="one")
    big, mapping = grow_experts(one, 12)
    assert grow_experts_is_exact(one, big, mapping)
    torch.testing.assert_close(logits(big), logits(one), atol=1e-5, rtol=1e-5)
    # top_k = m * K takes all m copies of each chosen expert, with capacity too (same slots per expert)
    for moe in (dict(), dict(capacity_factor=1.0), dict(top_k=1, normalize_topk=False)):
        src = source(**moe)
        big, mapping = grow_experts(src, 8)
        k = exact_top_k(src, mapping)
        assert k == 2 * src.cfg.moe.top_k and not grow_experts_is_exact(src, big, mapping)
        torch.testing.assert_close(logits(with_top_k(big, k)), logits(src), atol=1e-5, rtol=1e-5)
    assert exact_top_k(src, grow_experts(src, 6, which="most_loaded", loads=LOADS)[1]) is None
    assert exact_top_k(source("sigmoid"), grow_experts(source("sigmoid"), 8)[1]) is None
    assert exact_top_k(source(top_k=1), mapping) is None          # Switch weight p, renormalised at m * 1
    assert exact_top_k(one, mapping) == 1
    # ... but not with a capacity: the source expert keeps 1/m of its slots, more tokens drop
    capped = source(top_k=1, top1_weight="one", capacity_factor=1.0)
    big, mapping = grow_experts(capped, 12)
    assert not grow_experts_is_exact(capped, big, mapping)
    assert float((logits(big) - logits(capped)).abs().max()) > 1e-3


def test_the_jump_at_the_unchanged_top_k():
    """top_k = 2 over m = 2 copies of each expert takes the top expert twice: the source's
    second choice is gone, so the function changes (by how much is measured here); the top-1
    source of every token is the same."""
    src = _trained(source())
    big, mapping = grow_experts(src, 8)
    x = torch.randn(300, 32) * 3
    for i, s in mapping.items():
        first = big.moe_layers()[i].router(x).experts_TK[:, 0]
        assert torch.equal(torch.tensor(s)[first], src.moe_layers()[i].router(x).experts_TK[:, 0])
    tokens = torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(7))
    jump = lm_loss(big, tokens) - lm_loss(src, tokens)
    exact = lm_loss(with_top_k(big, 4), tokens) - lm_loss(src, tokens)
    ml, _ = grow_experts(src, 6, which="most_loaded", loads=LOADS)
    jump_ml = lm_loss(ml, tokens) - lm_loss(src, tokens)
    assert abs(exact) < 1e-5 and abs(jump) > 1e-4 and abs(jump_ml) > 1e-4 and math.isfinite(jump + jump_ml)


def _trained(model, steps=8):
    """A few AdamW steps on a repeating sequence (so the routers have learned something)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.arange(64).remainder(V).view(4, 16)
    for _ in range(steps):
        out = model(data)
        lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), data[:, 1:].reshape(-1))
        (lm + 0.01 * out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_most_loaded_copies_the_most_loaded_first_and_cycles():
    src = source()
    _, mapping = grow_experts(src, 7, which="most_loaded", loads=LOADS)
    assert mapping == {0: [0, 1, 2, 3, 1, 3, 0], 2: [0, 1, 2, 3, 2, 0, 1]}   # ties: lower index first
    _, mapping = grow_experts(src, 10, which="most_loaded", loads={0: torch.tensor(LOADS[0]), 2: LOADS[2]})
    assert mapping[0] == [0, 1, 2, 3, 1, 3, 0, 2, 1, 3]
    assert grow_experts(src, 8)[1][0] == [0, 1, 2, 3, 0, 1, 2, 3]


def test_noise_is_seeded_on_the_copies_only_and_leaves_the_global_rng_alone():
    src = source()
    state = torch.get_rng_state()
    a, b, c = (grow_experts(src, 8, noise_std=0.1, seed=s)[0] for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), state)
    w = [m.moe_layers()[0].router.weight_ED.detach() for m in (a, b, c)]
    old = src.moe_layers()[0].router.weight_ED.detach()
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0][4:], w[2][4:])
    assert torch.equal(w[0][:4], old)                                  # the old rows stay exact
    assert 0.05 < float((w[0][4:] - old).std()) < 0.2
    exact = grow_experts(src, 8)[0]
    assert torch.equal(a.moe_layers()[0].experts.w_up_EDF, exact.moe_layers()[0].experts.w_up_EDF)


@pytest.mark.parametrize("model, kwargs, match", [
    ("dense", dict(num_experts=8), "the model is dense"),
    ("moe", dict(num_experts=4), "num_experts=4 must be an integer > the model's 4"),
    ("moe", dict(num_experts=2.5), "num_experts=2.5 must be an integer"),
    ("moe", dict(num_experts=6), "num_experts=6 is not a multiple of 4: which='all'"),
    ("moe", dict(num_experts=8, which="random"), "which='random' is not one of"),
    ("moe", dict(num_experts=6, which="most_loaded"), "which='most_loaded' needs loads="),
    ("moe", dict(num_experts=6, which="most_loaded", loads={0: [1, 2, 3, 4]}), r"loads holds layers \[0\]"),
    ("moe", dict(num_experts=6, which="most_loaded", loads={0: [1, 2, 3], 2: [1, 2, 3, 4]}),
     r"loads\[0\] \(shape \(3,\)\) is not 4 finite counts"),
    ("moe", dict(num_experts=6, which="most_loaded", loads={0: [1, 2, 3, -4], 2: [1, 2, 3, 4]}),
     "is not 4 finite counts >= 0"),
    ("moe", dict(num_experts=6, which="most_loaded", loads={0: "many", 2: [1, 2, 3, 4]}), "a non-numeric"),
    ("moe", dict(num_experts=8, loads=LOADS), "loads are read by which='most_loaded' only"),
    ("moe", dict(num_experts=8, noise_std=-1.0), "noise_std=-1.0 must be a finite number >= 0"),
    ("moe", dict(num_experts=8, seed=1.5), "seed=1.5 must be an integer"),
])
def test_refusals_are_one_line(model, kwargs, match):
    m = source() if model == "moe" else MoETransformer.build(
        ModelConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=4, d_ff=64))
    with pytest.raises(ValueError, match=match) as err:
        grow_experts(m, **kwargs)
    assert "\n" not in str(err.value)


def test_sharded_experts_are_refused():
    src = source()
    layer = src.moe_layers()[0]
    layer.keep_experts(0, 2, LocalDispatcher(2, 2, None, "position"))
    with pytest.raises(ValueError, match="sharded \\(expert parallelism\\)"):
        grow_experts(src, 8)


def test_optimizer_moments_follow_the_mapping():
    from moekit.config import TrainConfig
    from moekit.parallel.checkpointing import training_state
    from moekit.train.optim import build_optimizer
    src = source().train()
    opt = build_optimizer(src, TrainConfig(lr=1e-2, weight_decay=0.1))
    for _ in range(3):
        out = src(TOKENS)
        (F.cross_entropy(out.logits.reshape(-1, V), TOKENS.reshape(-1)) + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
    big, mapping = grow_experts(src, 6, which="most_loaded", loads=LOADS)
    saved = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    grown = grow_optimizer_state(opt.state_dict(), src, big, mapping)
    assert all(torch.equal(opt.state_dict()["state"][0][k], v) for k, v in saved.items())   # input intact
    new_opt = build_optimizer(big, TrainConfig(lr=1e-2, weight_decay=0.1))
    new_opt.load_state_dict(grown)
    old_params, new_params = dict(src.named_parameters()), dict(big.named_parameters())
    checked = 0
    for name, p in new_params.items():
        before, after = opt.state[old_params[name]], new_opt.state[p]
        assert torch.equal(after["step"], before["step"])
        for moment in ("exp_avg", "exp_avg_sq"):
            if after[moment].shape == before[moment].shape:
                assert torch.equal(after[moment], before[moment]), name
            else:
                i = int(name.split(".")[1])
                assert torch.equal(after[moment], before[moment][torch.tensor(mapping[i])]), name
                assert float(before[moment].abs().sum()) > 0
                checked += 1
    assert checked == 2 * 2 * 4                                  # 2 layers x (3 experts + router) x 2 moments
    out = big.train()(TOKENS)
    F.cross_entropy(out.logits.reshape(-1, V), TOKENS.reshape(-1)).backward()
    new_opt.step()                                               # it trains on
    ckpt = training_state(src, opt)["optim"]                     # the checkpoint's format: by name
    by_name = grow_optimizer_state(ckpt, src, big, mapping)
    key = "blocks.2.ffn.router.weight_ED"
    assert torch.equal(by_name[key]["exp_avg"], ckpt[key]["exp_avg"][torch.tensor(mapping[2])])
    with pytest.raises(ValueError, match=r"mapping\[0\] is not 6 expert indices"):
        grow_optimizer_state(ckpt, src, big, {0: mapping[0][:5], 2: mapping[2]})


def test_offsets_travel_through_exports_and_checkpoints(tmp_path):
    from moekit.config import RunConfig
    from moekit.parallel.checkpointing import training_state
    from moekit.store.checkpoint import Checkpoint, save_checkpoint
    from moekit.store.run_dir import load_run, save_export
    big, _ = grow_experts(source(), 6, which="most_loaded", loads=LOADS)
    tok = tokenizer()
    save_export(big, tok, RunConfig(model=big.cfg), tmp_path / "export")
    back, _, _ = load_run(tmp_path / "export")
    torch.testing.assert_close(logits(back), logits(big), atol=0, rtol=0)
    opt = torch.optim.AdamW(big.parameters())
    (tmp_path / "run").mkdir()
    save_checkpoint(tmp_path / "run", training_state(big, opt), {"step": 1, "config": RunConfig(
        model=big.cfg).to_dict()})
    fresh = MoETransformer.build(big.cfg)
    Checkpoint(tmp_path / "run").load_into(training_state(fresh, torch.optim.AdamW(fresh.parameters())))
    assert torch.equal(fresh.blocks[0].ffn.router.expert_bias_E, big.blocks[0].ffn.router.expert_bias_E)
    assert float(fresh.blocks[0].ffn.router.expert_bias_E.min()) == pytest.approx(-math.log(2))


def test_never_grown_router_is_bitwise_the_plain_softmax_router():
    """A zero offset changes no bit of the router's logits, probabilities or gradients."""
    layer = source().moe_layers()[0]
    x = torch.randn(64, 32, requires_grad=True)
    out = layer.router(x)
    x2 = x.detach().clone().requires_grad_(True)
    w = layer.router.weight_ED.detach().clone().requires_grad_(True)
    plain = F.linear(x2, w)
    assert torch.equal(out.logits_TE, plain) and torch.equal(out.probs_TE, torch.softmax(plain, -1))
    g = torch.randn(64, 4)
    (out.probs_TE * g).sum().backward()
    (torch.softmax(plain, -1) * g).sum().backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(layer.router.weight_ED.grad, w.grad)
    state = source().state_dict()                               # a state dict of a model that never grew
    again = MoETransformer.build(source().cfg)
    again.load_state_dict(state)
    assert torch.equal(logits(again), logits(source()))


def test_hugging_face_export_takes_even_offsets_and_refuses_uneven_ones(tmp_path):
    from moekit.interop.hf import from_hf_state, save_hf_dir, to_hf_config, to_hf_state
    src = source(top_k=1, top1_weight="one")
    assert to_hf_config(src.cfg, src.state_dict())["model_type"] == "qwen2_moe"     # zeros pass
    even, _ = grow_experts(src, 8)
    config, state = to_hf_state(even)                           # -log 2 everywhere: no probability changes
    torch.testing.assert_close(logits(from_hf_state(config, state)), logits(even), atol=1e-5, rtol=1e-5)
    uneven, _ = grow_experts(src, 6, which="most_loaded", loads=LOADS)
    for call in (lambda: to_hf_config(uneven.cfg, uneven.state_dict()),
                 lambda: save_hf_dir(uneven, tmp_path / "hf")):
        with pytest.raises(ValueError, match="layer 0's router logit offsets differ between experts") as err:
            call()
        assert "\n" not in str(err.value)
    assert not (tmp_path / "hf").exists()


@functools.cache
def tokenizer():
    from moekit.data.tokenizer import train_tokenizer
    return train_tokenizer(["the house will come to order " * 10] * 4, vocab_size=V)


def _export(tmp_path, metrics=True):
    from moekit.config import RunConfig
    from moekit.store.run_dir import save_export
    model, tok = source(), tokenizer()
    save_export(model, tok, RunConfig(model=model.cfg), tmp_path / "small")
    if metrics:
        rows = [{"step": 10, "moe/layer0/load": [1, 1, 1, 1], "moe/layer2/load": [1, 1, 1, 1]},
                {"step": 20, "loss/lm": 3.0, "moe/layer0/load": LOADS[0], "moe/layer2/load": LOADS[2]},
                {"step": 25, "loss/val": 3.1}]
        text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 30, "moe/la'      # a torn last line
        (tmp_path / "small" / "metrics.jsonl").write_text(text)
    return model, tok


def test_cli_grows_the_experts_of_a_model_directory(tmp_path, capsys):
    from moekit.store.run_dir import load_run
    model, tok = _export(tmp_path)
    assert last_loads(tmp_path / "small") == LOADS
    assert cli(["grow", str(tmp_path / "small"), "--experts", "6", "--which", "most_loaded",
                "--out", str(tmp_path / "big")]) == 0
    out = capsys.readouterr().out
    assert "experts 4 -> 6 in 2 MoE layers (most_loaded; new experts copy layer 0: [1, 3]; layer 2: [2, 0])" \
        in out
    big, _, _ = load_run(tmp_path / "big")
    assert big.cfg.moe.num_experts == 6
    want, _ = grow_experts(model, 6, which="most_loaded", loads=LOADS)
    torch.testing.assert_close(logits(big), logits(want), atol=0, rtol=0)
    assert cli(["grow", str(tmp_path / "small"), "--experts", "8", "--out", str(tmp_path / "big8")]) == 0
    assert "top_k 2 kept, so not the source function at step 0 (top_k=4 would be)" in capsys.readouterr().out


@pytest.mark.parametrize("flags, match", [
    (["--experts", "6"], "num_experts=6 is not a multiple of 4"),
    (["--experts", "8", "--d-model", "64"], "--experts with --d-model is not supported yet"),
    (["--which", "most_loaded", "--d-ff", "96"], "--which applies to --experts only"),
    (["--experts", "6", "--which", "most_loaded"], "has no metrics.jsonl to read expert loads from"),
])
def test_cli_refusals_are_one_line_and_write_nothing(tmp_path, capsys, flags, match):
    _export(tmp_path, metrics=False)
    assert cli(["grow", str(tmp_path / "small"), "--out", str(tmp_path / "bad")] + flags) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()


def with_moe(model, **change):
    """The same weights under other MoEConfig fields (a config change only)."""
    cfg = dataclasses.replace(model.cfg, moe=dataclasses.replace(model.cfg.moe, **change))
    other = MoETransformer(cfg)
    other.load_state_dict(model.state_dict())
    return other.eval()


@pytest.mark.parametrize("which, n, moe", [("all", 8, {}), ("all", 12, {}), ("most_loaded", 6, {}),
                                           ("most_loaded", 11, {}), ("all", 8, dict(capacity_factor=1.0)),
                                           ("all", 8, dict(target_k=1.5))])
def test_relu_routing_grows_with_its_function(which, n, moe):
    """relu gates: a source shared by c experts has its router row divided by c (relu(x w / c) =
    relu(x w) / c): the gates of the copies sum to the source's, so the function is the same."""
    src = source(dynamic_k="relu", **moe)
    with torch.no_grad():
        for layer in src.moe_layers().values():
            layer.router.k_control.fill_(0.05)
        hist = src(TOKENS).moe[0].experts_per_token
    assert (hist > 0).sum() >= 2                                   # the premise: different numbers per token
    big, mapping = grow_experts(src, n, which=which, loads=LOADS if which == "most_loaded" else None)
    assert grow_experts_is_exact(src, big, mapping) and big.cfg.moe == dataclasses.replace(src.cfg.moe,
                                                                                          num_experts=n)
    for i, s in mapping.items():
        old, new = src.moe_layers()[i].router, big.moe_layers()[i].router
        c = torch.bincount(torch.tensor(s), minlength=4)[s].float()
        torch.testing.assert_close(new.weight_ED * c[:, None], old.weight_ED[s])
        assert torch.equal(new.k_control, old.k_control) and torch.equal(new.expert_bias_E, torch.zeros(n))
    torch.testing.assert_close(logits(big), logits(src), atol=1e-5, rtol=1e-5)
    with torch.no_grad():      # every expert copied alike: the (load-weighted) L1 penalty is the source's too
        a, b = src.train()(TOKENS), big.train()(TOKENS)
    assert float(a.sparsity_loss) > 0
    if which == "all":
        torch.testing.assert_close(b.sparsity_loss, a.sparsity_loss, atol=1e-7, rtol=1e-5)
    noisy, mapping = grow_experts(src, n, which=which, loads=LOADS if which == "most_loaded" else None,
                                  noise_std=0.1)
    assert not grow_experts_is_exact(src, noisy, mapping)


def test_relu_routing_with_max_k_is_exact_at_m_times_max_k():
    src = source(dynamic_k="relu", max_k=2)
    big, mapping = grow_experts(src, 8)
    assert not grow_experts_is_exact(src, big, mapping) and exact_max_k(src, mapping) == 4
    assert float((logits(big) - logits(src)).abs().max()) > 1e-3          # max_k 2 kept cuts the copies
    torch.testing.assert_close(logits(with_moe(big, max_k=4)), logits(src), atol=1e-5, rtol=1e-5)
    assert exact_max_k(src, grow_experts(src, 6, which="most_loaded", loads=LOADS)[1]) is None
    assert exact_top_k(src, mapping) is None


@pytest.mark.parametrize("mode, extra, why", [
    ("top_p", {}, "takes experts until their probability mass reaches p, and a source's copies share its "
                  "probability, so a token may take some of them but not all (a different function)"),
    ("null", dict(num_null_experts=2), "compares each expert's logit with the null experts', and copies "
                                       "(logit offset -log c, the null experts uncopied) lose to them where "
                                       "the source won (a different function)"),
])
def test_top_p_and_null_routing_refuse_to_grow_experts(tmp_path, capsys, mode, extra, why):
    src = source(dynamic_k=mode, **extra)
    message = (f"grow_experts: model.moe.dynamic_k={mode!r} {why}; grow the experts of a dynamic_k='none' or "
               "'relu' model, or train this one with more experts from the start (model.moe.num_experts)")
    with pytest.raises(ValueError) as err:
        grow_experts(src, 8)
    assert str(err.value) == message
    from moekit.config import RunConfig
    from moekit.data.tokenizer import train_tokenizer
    from moekit.store.run_dir import save_export
    tok = train_tokenizer(["the house will come to order " * 10] * 4, vocab_size=V)
    save_export(src, tok, RunConfig(model=src.cfg), tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir() if p.is_file()}
    assert cli(["grow", str(tmp_path / "m"), "--experts", "8", "--out", str(tmp_path / "big")]) == 2
    assert capsys.readouterr().err.strip() == f"moekit grow: error: {message}"
    assert not (tmp_path / "big").exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir() if p.is_file()} == before
