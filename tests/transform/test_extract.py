"""moekit extract: the experts one tag is routed to, as a smaller model (task-level MoE)."""

import json

import pytest
import torch

from moekit import MoEConfig
from moekit.cli.main import main as cli
from moekit.data.stream import tag_split
from moekit.model.config import ModelConfig
from moekit.model.transformer import MoETransformer
from moekit.store.run_dir import load_run
from moekit.train.splits import open_split
from moekit.transform.extract import experts_by_load, extract_experts, is_exact, tag_loads

from ..moe.test_tag_routing import mixture_argv
from ..train.test_faults import one_line_error


@pytest.fixture(scope="module")
def runs(parl_subset, tmp_path_factory):
    """Two tiny mixture runs (de, en): one routed by the tag alone, one by token."""
    root = tmp_path_factory.mktemp("extract")
    out = {}
    for router_input in ("tag", "token"):
        (root / router_input).mkdir()
        argv = mixture_argv(parl_subset, root / router_input, steps=3, **{
            "model.moe.router_input": router_input, "model.n_layers": 2, "model.moe.num_experts": 6})
        assert cli(["train", "--out", str(root / router_input / "run"), *argv]) == 0
        out[router_input] = root / router_input / "run"
    return out


def last_json(capsys) -> tuple[str, dict]:
    text = capsys.readouterr().out.strip().splitlines()
    return "\n".join(text[:-1]), json.loads(text[-1])


def tag_windows(run_dir, tag, n=16):
    """Tokens [B, S] of the run's first n validation windows of ``tag``, and how many it has."""
    _, _, cfg = load_run(run_dir)
    part, windows, _ = tag_split(open_split(cfg, run_dir, "val"), tag)
    return part.batch(windows[:n])[0], len(windows)


def test_a_tag_routed_run_extracts_exactly(runs, tmp_path, capsys):
    out = tmp_path / "de"
    assert cli(["extract", str(runs["tag"]), "--task", "de", "--out", str(out)]) == 0
    text, result = last_json(capsys)
    assert result["exact"] and "exact" in text and "approximate" not in text
    assert result["experts"] == {"full": 6, "extracted": 2}          # top_k of 6, in every layer
    assert result["params"]["extracted"] < result["params"]["full"]
    assert result["max_abs_logit_diff"] < 1e-5 and set(result["tokens_per_s"]) == {"full", "extracted"}
    full, _, _ = load_run(runs["tag"])
    small, _, _ = load_run(out)
    assert small.cfg.moe.route_tags == ["de"] and small.cfg.moe.num_experts == 2
    assert sum(p.numel() for p in small.parameters()) == result["params"]["extracted"]
    x, windows = tag_windows(runs["tag"], "de")
    with torch.no_grad():
        want = full(x, tags=torch.zeros(len(x), dtype=torch.long)).logits      # de is tag 0 of the run
        got = small(x, tags=torch.zeros(len(x), dtype=torch.long)).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    en, _ = tag_windows(runs["tag"], "en")                                    # another tag's text: not kept
    with torch.no_grad():
        assert not torch.allclose(small(en, tags=torch.zeros(len(en), dtype=torch.long)).logits,
                                  full(en, tags=torch.ones(len(en), dtype=torch.long)).logits, atol=1e-3)
    assert cli(["eval", str(out)]) == 0                                    # the tag's own windows
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    _, _, cfg = load_run(out)                                    # whole batches of the tag's windows
    assert evaluated["val_windows"] == windows - windows % cfg.train.batch_size == evaluated["of_val_windows"]
    assert cli(["generate", str(out), "--tag", "de", "--max-new-tokens", "3", "--prompt", "Herr"]) == 0


def test_a_token_routed_run_extracts_approximately(runs, tmp_path, capsys):
    out = tmp_path / "en"
    assert cli(["extract", str(runs["token"]), "--task", "en", "--min-share", "0.2", "--out", str(out)]) == 0
    text, result = last_json(capsys)
    assert not result["exact"] and "approximate" in text and "max |logit difference|" in text
    assert 2 <= result["experts"]["extracted"] <= 5 and result["max_abs_logit_diff"] > 0
    assert result["params"]["extracted"] < result["params"]["full"]
    small, _, _ = load_run(out)
    assert small.cfg.moe.route_tags is None and small.cfg.moe.num_experts == result["experts"]["extracted"]
    full, _, _ = load_run(runs["token"])
    loads = tag_loads(full, [tag_windows(runs["token"], "en")[0]], "en")
    assert {str(k): v for k, v in experts_by_load(loads, 2, 0.2).items()} == result["kept"]


@pytest.mark.parametrize("router_input", ["tag", "token"])
def test_a_tag_the_run_never_saw_is_one_line_and_writes_nothing(runs, router_input, tmp_path, capsys):
    out = tmp_path / "fr"
    assert cli(["extract", str(runs[router_input]), "--task", "fr", "--out", str(out)]) == 2
    one_line_error(capsys, "--task 'fr': the run never saw that tag; its tags are de, en")
    assert not out.exists()


def tiny(router_input="tag", **moe):
    torch.manual_seed(0)
    moe = {"top_k": 2, **moe}
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, d_ff=32, moe=MoEConfig(
        d_model=16, d_ff=16, num_experts=8, router_input=router_input,
        route_tags=None if router_input == "token" else ["a", "b", "c"], **moe))
    model = MoETransformer.build(cfg).eval()
    with torch.no_grad():
        for layer in model.moe_layers().values():
            for table in (layer.router.tag_logits_NE, layer.router.tag_embed_ND):
                if table is not None:
                    table.normal_(std=2.0)
    return model


@pytest.mark.parametrize("moe, exact", [
    ({}, True), ({"router": "sigmoid", "aux_loss_free": True}, True),
    ({"top_k": 1, "top1_weight": "one"}, True),
    ({"normalize_topk": False}, False), ({"capacity_factor": 1.0}, False), ({"top_k": 1}, False),
])
def test_which_tag_routers_extract_exactly(moe, exact):
    model = tiny(**moe)
    assert is_exact(model.cfg.moe) == exact
    x = torch.randint(0, 50, (3, 9))
    if not exact:
        with pytest.raises(ValueError, match="pass loads"):
            extract_experts(model, "b")
        return
    if model.cfg.moe.aux_loss_free:
        for layer in model.moe_layers().values():
            layer.update_router_bias(torch.arange(8.0))
    small, kept = extract_experts(model, "b")
    assert all(len(e) == model.cfg.moe.top_k for e in kept.values())
    assert small.cfg.moe.num_experts == model.cfg.moe.top_k and small.cfg.moe.route_tags == ["b"]
    want = model(x, tags=torch.ones(3, dtype=torch.long)).logits
    got = small(x, tags=torch.zeros(3, dtype=torch.long)).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_a_token_plus_tag_router_keeps_the_tags_embedding_row():
    model = tiny("token+tag")
    loads = {0: [5, 0, 0, 9, 1, 0, 0, 0], 1: [0, 3, 3, 3, 0, 0, 0, 2]}
    small, kept = extract_experts(model, "c", loads=loads, min_share=0.2)
    assert kept == {0: [0, 3, 4], 1: [1, 2, 3]}       # 3 experts hold >= 20% in layer 1: 3 per layer
    r, s = model.blocks[0].ffn.router, small.blocks[0].ffn.router
    assert torch.equal(s.tag_embed_ND[0], r.tag_embed_ND[2])
    assert torch.equal(s.weight_ED, r.weight_ED[[0, 3, 4]])
    assert torch.equal(small.blocks[1].ffn.experts.w_up_EDF, model.blocks[1].ffn.experts.w_up_EDF[[1, 2, 3]])
    assert experts_by_load({0: [0, 0, 7, 0]}, 2, 0.0) == {0: [0, 2]}   # at least top_k, ties: lower index


@pytest.mark.parametrize("moe", [dict(dynamic_k="relu"), dict(dynamic_k="relu", max_k=3, target_k=2.5)])
def test_a_relu_tag_router_extracts_exactly_padding_the_layers_to_one_count(moe):
    model = tiny(**moe)
    assert is_exact(model.cfg.moe)
    gates = {i: torch.relu(layer.router.tag_logits_NE[1]) for i, layer in model.moe_layers().items()}
    cap = moe.get("max_k", 8)
    used = {i: sorted(torch.topk(g, cap).indices[torch.topk(g, cap).values > 0].tolist())
            for i, g in gates.items()}
    assert len({len(u) for u in used.values()}) == 2            # the premise: the layers use different counts
    small, kept = extract_experts(model, "b")
    n = max(len(u) for u in used.values())
    assert all(len(e) == n and set(used[i]) <= set(e) for i, e in kept.items())   # padded, E never kept
    assert small.cfg.moe.num_experts == n and small.cfg.moe.max_k == (min(cap, n) if "max_k" in moe else None)
    assert small.cfg.moe.target_k == (min(2.5, n) if "target_k" in moe else None)
    for i, layer in small.moe_layers().items():                 # the controller's knob travels
        assert torch.equal(layer.router.k_control, model.moe_layers()[i].router.k_control)
    x = torch.randint(0, 50, (3, 9))
    with torch.no_grad():
        want = model(x, tags=torch.ones(3, dtype=torch.long)).logits
        got = small(x, tags=torch.zeros(3, dtype=torch.long)).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("moe", [dict(dynamic_k="top_p", top_p=0.7, max_k=6, target_k=5.0),
                                 dict(dynamic_k="null", num_null_experts=3)])
def test_top_p_and_null_tag_routers_extract_by_load(moe):
    model = tiny(**moe)
    assert not is_exact(model.cfg.moe)
    with pytest.raises(ValueError, match="pass loads"):
        extract_experts(model, "b")
    batches = [torch.randint(0, 50, (3, 9))]
    loads = tag_loads(model, batches, "b")
    small, kept = extract_experts(model, "b", loads=loads)
    n = small.cfg.moe.num_experts
    assert n < 8 and all(len(e) == n for e in kept.values())
    if moe["dynamic_k"] == "top_p":                              # the bounds follow the smaller count
        assert small.cfg.moe.max_k == min(6, n) and small.cfg.moe.target_k == min(5.0, n)
    else:                                                        # the null experts' rows are kept whole
        assert n >= model.cfg.moe.top_k
        for i, layer in small.moe_layers().items():
            assert torch.equal(layer.router.null_ND, model.moe_layers()[i].router.null_ND)
    with torch.no_grad():
        assert torch.isfinite(small(batches[0], tags=torch.zeros(3, dtype=torch.long)).logits).all()
