"""Calibration statistics and expert pruning (usage, NAEE reconstruction)."""

import dataclasses
import itertools

import pytest
import torch

from moekit import MoEConfig
from moekit.model.config import ModelConfig
from moekit.model.transformer import MoETransformer
from moekit.moe.layer import MoELayer
from moekit.transform.calibrate import calibrate, expert_usage, layer_inputs
from moekit.transform.prune import prune_experts

VOCAB = 61


def tiny(seed: int = 0, n_layers: int = 2, **moe) -> MoETransformer:
    torch.manual_seed(seed)
    m = dict(d_model=32, d_ff=32, num_experts=6, top_k=2)
    m.update(moe)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=n_layers, n_heads=2, d_ff=64, max_seq_len=16,
                      moe=MoEConfig(**m))
    return MoETransformer.build(cfg).eval()


def token_batches(n: int = 2, B: int = 2, S: int = 16, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (B, S), generator=g) for _ in range(n)]


def noisy_sigmoid_model() -> MoETransformer:
    """A sigmoid, aux-loss-free, noisy-gated model with random biases and noise rows: every
    router tensor a prune or merge must carry."""
    model = tiny(router="sigmoid", aux_loss_free=True, noisy_gating=True)
    with torch.no_grad():
        for layer in model.moe_layers().values():
            layer.router.expert_bias_E.normal_()
            layer.router.noise_ED.normal_()
    return model


def hooked_inputs(model, batches) -> dict:
    """{MoE layer: all its inputs [T, D]} by a hook of the test's own."""
    xs = {i: [] for i in model.moe_layers()}
    def take(i):
        return lambda _module, args: xs[i].append(args[0].reshape(-1, args[0].shape[-1]))
    hooks = [layer.register_forward_pre_hook(take(i)) for i, layer in model.moe_layers().items()]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    return {i: torch.cat(v) for i, v in xs.items()}


def sliced_layer(layer: MoELayer, kept: list) -> MoELayer:
    """The layer with only ``kept`` experts, sliced by hand (not by the code under test)."""
    small = MoELayer(dataclasses.replace(layer.cfg, num_experts=len(kept))).eval()
    idx = torch.tensor(kept)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            sliced = p[idx] if name.startswith(("experts.", "router.")) else p
            small.get_parameter(name).copy_(sliced)
        small.router.expert_bias_E.copy_(layer.router.expert_bias_E[idx])
    return small


def error(layer, kept, x_TD) -> float:
    with torch.no_grad():
        return float((layer(x_TD)[0].double() - sliced_layer(layer, kept)(x_TD)[0].double()).norm())


def state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_calibration_counts_probs_and_inputs():
    model, batches = tiny(), token_batches()
    calib = calibrate(model, batches, max_tokens=20)
    full = hooked_inputs(model, batches)
    T = sum(x.numel() for x in batches)
    for i, c in calib.items():
        assert int(c.tokens_E.sum()) == T * 2 and c.tokens_E.shape == (6,)
        assert abs(float(c.mean_prob_E.sum()) - 1) < 1e-5
        assert c.x_TD.shape == (20, 32)
        # every sampled row is one of the layer's inputs, and no row twice
        d = torch.cdist(c.x_TD, full[i], compute_mode="donot_use_mm_for_euclid_dist")
        assert float(d.min(1).values.max()) < 1e-6 and len(set(d.argmin(1).tolist())) == 20
    assert torch.equal(expert_usage(model, batches)[0], calib[0].tokens_E)
    everything = layer_inputs(model, batches, 10_000)
    assert torch.allclose(everything[1], full[1])                  # all tokens, in order
    assert torch.equal(layer_inputs(model, batches, 20)[0], calib[0].x_TD)   # seeded


CONFIGS = {
    "softmax-top2": dict(),
    "softmax-top1-prob": dict(top_k=1),
    "gelu-shared": dict(activation="gelu", num_shared_experts=1, shared_gate=True),
    "sigmoid-aux-free": dict(router="sigmoid", aux_loss_free=True),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_usage_pruning_is_exact_when_pruned_experts_get_no_weight(name):
    model, batches = tiny(**CONFIGS[name]), token_batches()
    dead = {0: [1, 4], 1: [0, 5]}
    with torch.no_grad():
        for i, layer in model.moe_layers().items():
            # softmax: a logit offset of -1e4 makes their probability exactly 0 (the others'
            # weights unchanged); sigmoid: a selection bias of -1e4 means they are never picked
            layer.router.expert_bias_E[dead[i]] = -1e4
    usage = expert_usage(model, batches)
    for i in dead:
        assert usage[i][dead[i]].sum() == 0 and (usage[i] > 0).sum() == 4   # the premise
    before = state(model)
    small, kept = prune_experts(model, batches, 4, method="usage")
    assert kept == {i: [e for e in range(6) if e not in dead[i]] for i in dead}
    assert small.cfg.moe.num_experts == 4 and model.cfg.moe.num_experts == 6
    assert small.moe_layers()[0].experts.w_up_EDF.shape[0] == 4
    x = token_batches(1, seed=7)[0]
    with torch.no_grad():
        assert torch.allclose(small(x).logits, model(x).logits, atol=1e-5, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("E,n", [(4, 2), (6, 3)])
def test_reconstruction_is_the_best_subset_and_no_worse_than_usage(E, n):
    model, batches = tiny(seed=0, num_experts=E, top_k=1 if n == 2 else 2), token_batches()
    xs = hooked_inputs(model, batches)
    _, by_usage = prune_experts(model, batches, n, method="usage")
    small, kept = prune_experts(model, batches, n, method="reconstruction")
    for i, layer in model.moe_layers().items():
        errors = {s: error(layer, list(s), xs[i]) for s in itertools.combinations(range(E), n)}
        best = min(errors, key=errors.get)
        assert kept[i] == list(best)
        assert errors[best] <= error(layer, by_usage[i], xs[i]) + 1e-9
        with torch.no_grad():   # the new model's layer is that subset
            want = sliced_layer(layer, kept[i])(xs[i])[0]
            assert torch.allclose(small.moe_layers()[i](xs[i])[0], want, atol=1e-6)
    assert any(kept[i] != by_usage[i] for i in kept)       # the test tells the methods apart


def test_greedy_removal_equals_exhaustive_for_one_removal():
    model, batches = tiny(seed=5), token_batches()
    _, exhaustive = prune_experts(model, batches, 5, method="reconstruction")
    _, greedy = prune_experts(model, batches, 5, method="reconstruction", max_subsets=0)
    assert greedy == exhaustive
    _, greedy3 = prune_experts(model, batches, 3, method="reconstruction", max_subsets=0)
    assert all(len(k) == 3 and k == sorted(set(k)) for k in greedy3.values())


def test_pruning_leaves_the_source_model_unchanged():
    model, batches = noisy_sigmoid_model(), token_batches()
    before = state(model)
    model.train()
    for method in ("usage", "reconstruction"):
        small, kept = prune_experts(model, batches, 3, method=method)
        assert model.training and small.training
        for i, layer in small.moe_layers().items():
            src = model.moe_layers()[i].router
            assert torch.equal(layer.router.expert_bias_E, src.expert_bias_E[kept[i]])
            assert torch.equal(layer.router.noise_ED, src.noise_ED[kept[i]])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("case,match", [
    ("dense", "dense"), ("too_many", "num_experts=6 must be .* fewer than the model's 6"),
    ("below_k", "below model.moe.top_k=2"), ("expert_choice", "expert_choice"),
    ("tags", "routes by tag"), ("method", "method"), ("no_batches", "no calibration batches"),
    ("max_tokens", "max_tokens=0"),
])
def test_pruning_refusals(case, match):
    batches, n, kw = token_batches(1), 4, {}
    if case == "dense":
        cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, d_ff=64)
        model = MoETransformer.build(cfg)
    elif case == "expert_choice":
        model = tiny(router="expert_choice")
    elif case == "tags":
        model = tiny(router_input="tag", route_tags=["a", "b"])
    else:
        model = tiny()
    n = {"too_many": 6, "below_k": 1}.get(case, n)
    kw = {"method": {"method": "magnitude"}, "max_tokens": {"method": "reconstruction", "max_tokens": 0}
          }.get(case, {})
    batches = [] if case == "no_batches" else batches
    with pytest.raises(ValueError, match=match):
        prune_experts(model, batches, n, **kw)


DYNAMIC = {   # a dynamic number of experts per token, with bounds the pruned count must cut
    "top_p": dict(dynamic_k="top_p", top_p=0.6, max_k=6, target_k=5.0),
    "null": dict(dynamic_k="null", num_null_experts=3, target_k=1.5),
    "relu": dict(dynamic_k="relu", max_k=5, target_k=4.5),
}


@pytest.mark.parametrize("method", ["usage", "reconstruction"])
@pytest.mark.parametrize("name", sorted(DYNAMIC))
def test_dynamic_pruning_is_exact_when_pruned_experts_get_no_weight(name, method):
    model, batches = tiny(**DYNAMIC[name]), token_batches()
    dead = {0: [1, 4], 1: [0, 5]}
    with torch.no_grad():
        for i, layer in model.moe_layers().items():
            if name == "relu":      # a zero router row: gate relu(0) = 0, never an expert
                layer.router.weight_ED[dead[i]] = 0.0
            else:                   # probability exactly 0 (and null routing never selects them)
                layer.router.expert_bias_E[dead[i]] = -1e4
            layer.router.k_control.add_(0.01 * (i + 1))       # a moved knob, per layer
    usage = expert_usage(model, batches)
    for i in dead:
        assert usage[i][dead[i]].sum() == 0 and (usage[i] > 0).sum() == 4   # the premise
    before = state(model)
    small, kept = prune_experts(model, batches, 4, method=method)
    assert kept == {i: [e for e in range(6) if e not in dead[i]] for i in dead}
    m = small.cfg.moe
    assert m.num_experts == 4 and m.dynamic_k == name and model.cfg.moe.num_experts == 6
    assert (m.max_k, m.target_k) == {"top_p": (4, 4.0), "null": (None, 1.5), "relu": (4, 4.0)}[name]
    for i, layer in small.moe_layers().items():
        old = model.moe_layers()[i].router
        assert torch.equal(layer.router.k_control, old.k_control)
        if name == "null":          # the null experts are not experts: every row kept
            assert torch.equal(layer.router.null_ND, old.null_ND)
    x = token_batches(1, seed=7)[0]
    with torch.no_grad():
        out = model(x)
        assert (out.moe[0].experts_per_token > 0).sum() >= 2     # tokens take different numbers
        assert torch.allclose(small(x).logits, out.logits, atol=1e-5, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("moe, n, message", [
    (dict(dynamic_k="top_p", min_k=2), 1,
     "prune_experts: num_experts=1 is below model.moe.min_k=2 (every token gets at least 2 experts); "
     "pick one in [2, 5]"),
    (dict(dynamic_k="null", num_null_experts=2, top_k=3), 2,
     "prune_experts: num_experts=2 is below model.moe.top_k=3 (null routing picks top_k of the real and null "
     "experts, at most num_experts); pick one in [3, 5]"),
])
def test_dynamic_pruning_refuses_too_few_experts(moe, n, message):
    with pytest.raises(ValueError) as err:
        prune_experts(tiny(**moe), token_batches(1), n)
    assert str(err.value) == message


def test_top_p_and_relu_prune_below_top_k_which_they_do_not_read():
    for moe in (dict(dynamic_k="relu"), dict(dynamic_k="top_p", max_k=3)):
        small, kept = prune_experts(tiny(**moe), token_batches(1), 1)
        assert (small.cfg.moe.num_experts, small.cfg.moe.top_k, small.cfg.moe.max_k) == (
            1, 1, None if "max_k" not in moe else 1)
