"""Expert merging: HC-SMoE grouping, MC-SMoE aligned averaging, the merged router."""

import inspect

import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage

from moekit.moe.experts import expert_ffn
from moekit.transform.calibrate import calibrate, expert_usage
from moekit.transform.merge import group_experts, merge_experts

from .test_prune import hooked_inputs, noisy_sigmoid_model, state, tiny, token_batches


def ffn(layer, e, x_ND):
    ex = layer.experts
    gate = ex.w_gate_EDF[e] if ex.w_gate_EDF is not None else None
    with torch.no_grad():
        return expert_ffn(x_ND, gate, ex.w_up_EDF[e], ex.w_down_EFD[e])


@torch.no_grad()
def copy_expert(layer, src: int, dst: int, perm=None) -> None:
    """Expert ``dst`` := expert ``src`` (its hidden units permuted by ``perm``), router row too."""
    ex = layer.experts
    perm = torch.arange(ex.w_up_EDF.shape[2]) if perm is None else perm
    if ex.w_gate_EDF is not None:
        ex.w_gate_EDF[dst] = ex.w_gate_EDF[src][:, perm]
    ex.w_up_EDF[dst] = ex.w_up_EDF[src][:, perm]
    ex.w_down_EFD[dst] = ex.w_down_EFD[src][perm]
    layer.router.weight_ED[dst] = layer.router.weight_ED[src]
    layer.router.expert_bias_E[dst] = layer.router.expert_bias_E[src]


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_alignment_makes_merging_blind_to_a_permutation_of_hidden_units(activation):
    model, batches = tiny(num_experts=4, activation=activation), token_batches()
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(2))
    for layer in model.moe_layers().values():
        copy_expert(layer, 0, 1, perm)
    x = torch.randn(50, 32)
    src = model.moe_layers()[0]
    assert torch.allclose(ffn(src, 1, x), ffn(src, 0, x), atol=1e-5)      # same function
    for align in (True, False):
        small, groups = merge_experts(model, batches, 3, align=align)
        assert groups == {0: [[0, 1], [2], [3]], 1: [[0, 1], [2], [3]]}
        got, want = ffn(small.moe_layers()[0], 0, x), ffn(src, 0, x)
        if align:
            assert torch.allclose(got, want, atol=1e-5)
        else:   # averaging unaligned hidden units is another function
            assert float((got - want).norm() / want.norm()) > 0.1
        for j, e in ((1, 2), (2, 3)):   # singleton groups are kept as they were
            assert torch.allclose(ffn(small.moe_layers()[1], j, x), ffn(model.moe_layers()[1], e, x))


CONFIGS = {
    "softmax-top1-prob": dict(),
    "softmax-top1-one": dict(top1_weight="one"),
    "gelu-shared-gate": dict(activation="gelu", num_shared_experts=1, shared_gate=True),
    "sigmoid-aux-free": dict(router="sigmoid", aux_loss_free=True),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("router", ["mean", "dominant"])
def test_merging_exact_copies_keeps_the_top1_model(name, router):
    """Experts 2, 3 are copies of 0, 1 (router rows and bias too). Top-1 ties go to the lower
    index, so 2 and 3 never get a token, and each token keeps its pair after merging. With
    weight 1 (top1_weight="one") or a sigmoid score (the expert's own) the model is unchanged.
    A Switch weight (softmax over all 4) is not kept: the chosen copy had half its pair's
    probability, the merged expert gets the pair's whole mass, so that weight doubles."""
    model, batches = tiny(num_experts=4, top_k=1, **CONFIGS[name]), token_batches()
    with torch.no_grad():
        for layer in model.moe_layers().values():
            if name.startswith("sigmoid"):
                layer.router.expert_bias_E[:2] = torch.tensor([0.05, -0.03])
            copy_expert(layer, 0, 2)
            copy_expert(layer, 1, 3)
    usage = expert_usage(model, batches)
    assert all(u[2:].sum() == 0 and u[:2].min() > 0 for u in usage.values())   # the premise
    xs = hooked_inputs(model, token_batches(1, seed=9))
    for similarity in ("expert-output", "router-logits"):
        small, groups = merge_experts(model, batches, 2, similarity=similarity, router=router)
        assert groups == {0: [[0, 2], [1, 3]], 1: [[0, 2], [1, 3]]}
        with torch.no_grad():
            moe = model.cfg.moe
            if moe.router == "softmax" and moe.top1_weight == "prob":
                for i, layer in model.moe_layers().items():
                    full, merged = layer.router(xs[i]), small.moe_layers()[i].router(xs[i])
                    assert torch.equal(merged.experts_TK, full.experts_TK)
                    assert torch.allclose(merged.weights_TK, 2 * full.weights_TK, atol=1e-6)
            else:
                x = token_batches(1, seed=9)[0]
                assert torch.allclose(small(x).logits, model(x).logits, atol=1e-5, rtol=0)


def test_a_merged_softmax_expert_keeps_its_groups_probability_mass():
    """Experts 2, 3 copy expert 0: merged, the group {0, 2, 3} gets the logit offset log 3, so its
    probability is the three copies' summed probability (and expert 1's is its own)."""
    model, batches = tiny(num_experts=4, top_k=2), token_batches()
    for layer in model.moe_layers().values():
        copy_expert(layer, 0, 2)
        copy_expert(layer, 0, 3)
    xs = hooked_inputs(model, batches)
    small, groups = merge_experts(model, batches, 2)
    assert groups == {0: [[0, 2, 3], [1]], 1: [[0, 2, 3], [1]]}
    with torch.no_grad():
        for i, layer in model.moe_layers().items():
            full, merged = layer.router(xs[i]).probs_TE, small.moe_layers()[i].router(xs[i]).probs_TE
            assert torch.allclose(merged[:, 0], full[:, [0, 2, 3]].sum(1), atol=1e-6)
            assert torch.allclose(merged[:, 1], full[:, 1], atol=1e-6)


def test_groups_partition_the_experts_into_exactly_n():
    g = torch.Generator().manual_seed(0)
    for E, n in ((8, 2), (8, 5), (6, 1), (5, 4)):
        for metric in ("euclidean", "cosine"):
            groups = group_experts(torch.randn(E, 7, generator=g, dtype=torch.float64), n, metric)
            assert len(groups) == n and all(groups)
            assert sorted(e for grp in groups for e in grp) == list(range(E))
    # ties everywhere: fcluster's maxclust cut finds 1 cluster, not 3; the count cut must give 3
    same = torch.ones(6, 4, dtype=torch.float64)
    assert len(set(fcluster(linkage(same.numpy(), "average"), t=3, criterion="maxclust"))) < 3
    groups = group_experts(same, 3)
    assert len(groups) == 3 and sorted(sum(groups, [])) == list(range(6))
    # two clear clusters
    f = torch.tensor([[0.0, 0], [10, 10], [0.1, 0], [10, 10.1]], dtype=torch.float64)
    assert group_experts(f, 2) == [[0, 2], [1, 3]]


@torch.no_grad()
def merged_error(model, small, xs) -> float:
    """Summed relative layer reconstruction error of the merged model on the full model's inputs."""
    err = 0.0
    for i, layer in model.moe_layers().items():
        y = layer(xs[i])[0]
        err += float((small.moe_layers()[i](xs[i])[0] - y).norm() / y.norm())
    return err


def test_the_default_router_merge_has_the_lower_error():
    assert inspect.signature(merge_experts).parameters["router"].default == "mean"
    errors = {"mean": 0.0, "dominant": 0.0}
    for seed in range(2):
        model, batches = tiny(seed=seed, num_experts=8), token_batches()
        xs = hooked_inputs(model, batches)
        for router in errors:
            errors[router] += merged_error(model, merge_experts(model, batches, 4, router=router)[0], xs)
    assert errors["mean"] < errors["dominant"], errors


def test_merged_router_rows_and_bias_are_the_count_weighted_means():
    model, batches = noisy_sigmoid_model(), token_batches()
    before = state(model)
    calib = calibrate(model, batches)
    small, groups = merge_experts(model, batches, 3, router="mean")
    for i, layer in small.moe_layers().items():
        src = model.moe_layers()[i].router
        for j, group in enumerate(groups[i]):
            w = calib[i].tokens_E[group].double() + 1
            w = (w / w.sum()).float()
            assert torch.allclose(layer.router.weight_ED[j], w @ src.weight_ED[group], atol=1e-6)
            assert torch.allclose(layer.router.noise_ED[j], w @ src.noise_ED[group], atol=1e-6)
            assert torch.allclose(layer.router.expert_bias_E[j], w @ src.expert_bias_E[group], atol=1e-6)
        dom = merge_experts(model, batches, 3, router="dominant")[0].moe_layers()[i].router
        for j, group in enumerate(groups[i]):
            top = max(group, key=lambda e: (int(calib[i].tokens_E[e]), -e))
            assert torch.equal(dom.weight_ED[j], src.weight_ED[top])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_merging_leaves_the_source_model_unchanged_and_keeps_shared_experts():
    model, batches = tiny(num_shared_experts=1, shared_gate=True), token_batches()
    before = state(model)
    model.train()
    small, groups = merge_experts(model, batches, 3, similarity="router-logits", metric="cosine")
    assert model.training and small.training and small.cfg.moe.num_experts == 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for i, layer in small.moe_layers().items():
        assert torch.equal(layer.shared.w_up.weight, model.moe_layers()[i].shared.w_up.weight)
        assert len(groups[i]) == 3


@pytest.mark.parametrize("kw,match", [
    (dict(num_experts=6), "fewer than the model's 6"), (dict(num_experts=1), "below model.moe.top_k"),
    (dict(similarity="weights"), "similarity"), (dict(router="max"), "router"),
    (dict(metric="l1"), "metric"), (dict(max_tokens=0), "max_tokens"),
])
def test_merging_refusals(kw, match):
    args = dict(num_experts=3)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        merge_experts(tiny(), token_batches(1), **args)
    with pytest.raises(ValueError, match="routes by tag"):
        merge_experts(tiny(router_input="token+tag", route_tags=["a"]), token_batches(1), 3)
    with pytest.raises(ValueError, match="expert_choice"):
        merge_experts(tiny(router="expert_choice"), token_batches(1), 3)



@pytest.mark.parametrize("router", ["mean", "dominant"])
def test_merging_relu_copies_undoes_growing_them(router):
    """relu gates: growing splits an expert's router row into c copies of row / c; merging the c
    copies back multiplies the merged row by c, so the merged model is the source function."""
    from moekit.transform.grow_experts import grow_experts
    model, batches = tiny(dynamic_k="relu", max_k=None), token_batches()
    with torch.no_grad():
        for layer in model.moe_layers().values():
            layer.router.k_control.fill_(0.02)
    big, _ = grow_experts(model, 12)
    small, groups = merge_experts(big, batches, 6, router=router)
    assert groups == {i: [[e, e + 6] for e in range(6)] for i in (0, 1)}
    assert small.cfg.moe == model.cfg.moe
    for i, layer in small.moe_layers().items():
        assert torch.allclose(layer.router.weight_ED, model.moe_layers()[i].router.weight_ED, atol=1e-7)
        assert torch.equal(layer.router.k_control, model.moe_layers()[i].router.k_control)
    x = token_batches(1, seed=9)[0]
    with torch.no_grad():
        want = model(x)
        assert (want.moe[0].experts_per_token > 0).sum() >= 2          # tokens take different numbers
        assert torch.allclose(small(x).logits, want.logits, atol=1e-5, rtol=0)
        # a plain mean of the rows would halve every gate: a check that can fail
        half = merge_experts(big, batches, 6, router=router)[0]
        for layer in half.moe_layers().values():
            layer.router.weight_ED.mul_(0.5)
        assert float((half(x).logits - want.logits).abs().max()) > 1e-3


@pytest.mark.parametrize("name", ["top_p", "null", "relu"])
def test_merging_a_dynamic_model_keeps_its_bounds_inside_the_experts(name):
    from .test_prune import DYNAMIC
    model, batches = tiny(**DYNAMIC[name]), token_batches()
    small, groups = merge_experts(model, batches, 3)
    m = small.cfg.moe
    assert m.num_experts == 3 and m.dynamic_k == name
    assert (m.max_k, m.target_k) == {"top_p": (3, 3.0), "null": (None, 1.5), "relu": (3, 3.0)}[name]
    for i, layer in small.moe_layers().items():
        old = model.moe_layers()[i].router
        assert torch.equal(layer.router.k_control, old.k_control)
        if name == "null":
            assert torch.equal(layer.router.null_ND, old.null_ND)
    with torch.no_grad():
        assert torch.isfinite(small(token_batches(1, seed=9)[0]).logits).all()
