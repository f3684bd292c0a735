"""Task-level routing (Kudugunta et al. 2021): MoEConfig.router_input "token+tag" and "tag".

The token router is unchanged bit for bit; the tag routers match the slow reference in outputs
and every gradient (their tag tables included), on every backend; tags thread through the
model (one per sequence or per token, under activation checkpointing); a tiny mixture run
records its route tags, resumes, and generates with --tag."""

import json

import pytest
import torch
import torch.nn.functional as F

from moekit import MoEConfig, MoELayer, reference_moe
from moekit.cli.main import main as cli
from moekit.config import RunConfig
from moekit.model.config import ModelConfig
from moekit.model.transformer import MoETransformer, route_tag_ids
from moekit.train.optim import param_groups

from ..conftest import rel_err
from ..train.test_faults import one_line_error
from .test_fast_vs_reference import BACKENDS, grads

TAGS = ["de", "en", "es"]


def model_cfg(router_input="tag", **moe):
    tags = None if router_input == "token" else TAGS
    return ModelConfig(vocab_size=61, d_model=16, n_layers=2, n_heads=2, d_ff=32, moe_layers="alternate",
                       moe=MoEConfig(d_model=16, d_ff=16, num_experts=6, top_k=2, router_input=router_input,
                                     route_tags=tags, **moe))


def layer_with_tags(router_input, seed=0, **kw):
    torch.manual_seed(seed)
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=5, top_k=2, router_input=router_input,
                               route_tags=TAGS, **kw))
    with torch.no_grad():                       # the embedding starts at zero: make it matter
        if layer.router.tag_embed_ND is not None:
            layer.router.tag_embed_ND.normal_(std=1.0)
        if layer.router.tag_logits_NE is not None:
            layer.router.tag_logits_NE.normal_(std=1.0)
    return layer


def test_token_routing_is_unchanged_bit_for_bit():
    """The default config has no tag parameters, ignores tags, and its router logits are the
    plain x W (+ the zero offset) they were before tag routing existed."""
    torch.manual_seed(0)
    cfg = model_cfg("token")
    assert cfg.moe.router_input == "token" and not cfg.routes_by_tag
    model = MoETransformer.build(cfg).eval()
    keys = set(model.state_dict())
    assert not any("tag_" in k for k in keys) and "blocks.1.ffn.router.weight_ED" in keys
    x = torch.randint(0, 61, (2, 7))
    plain = model(x).logits
    assert torch.equal(plain, model(x, tags=torch.tensor([0, 2])).logits)
    router = model.blocks[1].ffn.router
    h = torch.randn(9, 16)
    assert torch.equal(router.logits(h), F.linear(h, router.weight_ED) + router.expert_bias_E)
    assert torch.equal(router(h).logits_TE, router(h, torch.zeros(9, dtype=torch.long)).logits_TE)


@pytest.mark.parametrize("router_input", ["token+tag", "tag"])
def test_outputs_depend_on_the_tag(router_input):
    torch.manual_seed(0)
    model = MoETransformer.build(model_cfg(router_input)).eval()
    with torch.no_grad():
        router = model.blocks[1].ffn.router
        (router.tag_embed_ND if router_input == "token+tag" else router.tag_logits_NE).normal_(std=1.0)
    x = torch.randint(0, 61, (2, 7))
    a, b = model(x, tags=torch.tensor([0, 0])).logits, model(x, tags=torch.tensor([1, 1])).logits
    assert not torch.allclose(a, b)
    assert torch.allclose(model(x, tags=torch.tensor([0, 1])).logits[0], a[0], atol=1e-6)


def test_a_tag_routes_all_its_tokens_to_the_same_experts():
    layer = layer_with_tags("tag")
    routing = layer.router(torch.randn(12, 8), torch.tensor([1] * 6 + [2] * 6))
    experts = routing.experts_TK.sort(dim=1).values
    assert (experts[:6] == experts[0]).all() and (experts[6:] == experts[6]).all()
    top2 = torch.topk(layer.router.tag_logits_NE[1], 2).indices.sort().values
    assert torch.equal(experts[0], top2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("router_input, router, extra", [
    ("token+tag", "softmax", {}), ("tag", "softmax", {}), ("tag", "sigmoid", {"aux_loss_free": True}),
    ("token+tag", "sigmoid", {"normalize_topk": False}), ("tag", "softmax", {"capacity_factor": 1.0}),
])
def test_fast_path_matches_the_reference_with_tags(backend, router_input, router, extra):
    layer = layer_with_tags(router_input, backend=backend, router=router, **extra).eval()
    if layer.cfg.aux_loss_free:
        layer.update_router_bias(torch.tensor([9, 0, 3, 0, 1]))
    x = torch.randn(14, 8, requires_grad=True)
    tags_T = torch.randint(0, 3, (14,))
    grad_out = torch.randn_like(x)
    y, aux = layer(x, tags_T)
    fast = grads(y, layer, x, grad_out)
    y_ref = reference_moe(layer, x, tags_T)
    ref = grads(y_ref, layer, x, grad_out)
    assert rel_err(y, y_ref) < 1e-5
    tag_param = "router.tag_embed_ND" if router_input == "token+tag" else "router.tag_logits_NE"
    assert ref[tag_param] is not None and float(ref[tag_param].abs().sum()) > 0
    for name, g in fast.items():
        r = ref[name]
        if r is None or float(r.abs().sum()) == 0:     # e.g. no token reached an expert
            assert g is None or float(g.abs().sum()) == 0, name
        else:
            assert rel_err(g, r) < 1e-5, (name, rel_err(g, r))
    assert float(aux.z_loss.detach()) > 0 and float(aux.load_balancing_loss.detach()) > 0


def test_the_reference_refuses_a_tag_layer_without_tags():
    layer = layer_with_tags("tag")
    with pytest.raises(ValueError, match="pass tags_T"):
        reference_moe(layer, torch.randn(3, 8))


def test_tags_per_sequence_equal_tags_per_token():
    torch.manual_seed(1)
    model = MoETransformer.build(model_cfg("tag")).eval()
    x = torch.randint(0, 61, (3, 5))
    per_seq = model(x, tags=torch.tensor([2, 0, 1])).logits
    per_tok = model(x, tags=torch.tensor([[2] * 5, [0] * 5, [1] * 5])).logits
    assert torch.equal(per_seq, per_tok)
    mixed = model(x, tags=torch.tensor([[2] * 4 + [0], [0] * 5, [1] * 5])).logits
    assert not torch.equal(mixed[0, 4], per_seq[0, 4]) and torch.equal(mixed[0, :4], per_seq[0, :4])


def test_missing_or_bad_tags_are_one_line():
    model = MoETransformer.build(model_cfg("token+tag"))
    x = torch.randint(0, 61, (2, 5))
    with pytest.raises(ValueError, match=r"routes by tag \(model.moe.router_input='token\+tag'\): pass tags, "
                                         "e.g. moekit generate --tag NAME"):
        model(x)
    with pytest.raises(ValueError, match=r"shape \[B\]=\[2\] or \[B, S\]=\[2, 5\]"):
        model(x, tags=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        model(x, tags=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="routes by tag"):
        model.blocks[1].ffn(torch.randn(4, 16))


def test_config_checks():
    with pytest.raises(ValueError, match=r"router_input='tag': .*router='expert_choice'; use router="):
        MoEConfig(d_model=8, d_ff=8, router="expert_choice", router_input="tag")
    with pytest.raises(ValueError, match=r"router_input='both': is not one of"):
        MoEConfig(d_model=8, d_ff=8, router_input="both")
    with pytest.raises(ValueError, match="route_tags=.*names a tag twice"):
        MoEConfig(d_model=8, d_ff=8, router_input="tag", route_tags=["a", "a"])
    with pytest.raises(ValueError, match=r"route_tags=\[\]: must be a non-empty list"):
        MoEConfig(d_model=8, d_ff=8, router_input="tag", route_tags=[])
    with pytest.raises(ValueError, match="router_input='token' does not route by tag"):
        MoEConfig(d_model=8, d_ff=8, route_tags=["a"])
    unfilled = MoEConfig(d_model=8, d_ff=8, router_input="tag")      # fine until a layer is built
    with pytest.raises(ValueError, match="route_tags=None: .*the trainer fills it from the data's tags"):
        MoELayer(unfilled)


def test_tag_parameters_are_float32_and_never_decayed():
    router = MoETransformer.build(model_cfg("token+tag")).blocks[1].ffn.router
    assert router.tag_embed_ND.shape == (3, 16) and router.tag_embed_ND.dtype == torch.float32
    assert float(router.tag_embed_ND.detach().abs().sum()) == 0   # zero at init: the token router's function
    table = MoETransformer.build(model_cfg("tag")).blocks[1].ffn.router.tag_logits_NE
    assert table.shape == (3, 6) and table.dtype == torch.float32
    assert 0.01 < float(table.detach().std()) < 0.04                   # N(0, 0.02)
    for name in ("token+tag", "tag"):
        m = MoETransformer.build(model_cfg(name))
        tag_params = [p for n, p in m.named_parameters() if "tag_" in n]
        no_decay = param_groups(m, 0.1)[1]["params"]
        assert tag_params and all(any(p is q for q in no_decay) for p in tag_params)


@pytest.mark.parametrize("router_input", ["token+tag", "tag"])
def test_activation_checkpointing_gives_the_same_gradients(router_input):
    torch.manual_seed(0)
    model = MoETransformer.build(model_cfg(router_input, jitter_eps=0.1, noisy_gating=True)).train()
    with torch.no_grad():
        for p in model.parameters():     # noise weights start at zero: make the noise matter
            if p.abs().sum() == 0:
                p.normal_(std=0.1)
    x, tags = torch.randint(0, 61, (2, 6)), torch.tensor([1, 2])
    got = []
    for ckpt in (False, True):
        model.activation_checkpointing = ckpt
        model.zero_grad()
        torch.manual_seed(5)
        out = model(x, tags=tags)
        (out.logits.square().mean() + out.aux_loss + out.z_loss).backward()
        got.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert got[0].keys() == got[1].keys() and any("tag_" in n for n in got[0])
    for name in got[0]:
        assert torch.allclose(got[0][name], got[1][name], atol=1e-6), name


def _parallel_model():
    torch.manual_seed(0)
    return MoETransformer(model_cfg("token+tag", aux_loss_scope="global"))


def _parallel_steps(forward, opt, rank=0, world=1, after_backward=lambda: None):
    """Three SGD steps on rank's share of fixed global batches; the losses averaged over ranks."""
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(3):
        x, tags = torch.randint(0, 61, (8, 9), generator=g), torch.randint(0, 3, (8,), generator=g)
        x, tags = x.chunk(world)[rank], tags.chunk(world)[rank]
        out = forward(x[:, :-1], tags=tags)
        loss = F.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten()) + 0.1 * out.aux_loss
        loss.backward()
        after_backward()
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(total)
        losses.append(float(total) / world)
    return losses


def _parallel_worker(rank, world, dp, ep, sharding):
    from moekit.config import ParallelConfig
    from moekit.parallel.parallelize import build_mesh, parallelize
    cfg = ParallelConfig(dp=dp, ep=ep, sharding=sharding)
    par = parallelize(_parallel_model(), build_mesh(cfg), cfg)
    opt = torch.optim.SGD(par.module.parameters(), lr=0.5)
    return _parallel_steps(par.forward, opt, rank, world, par.sync_expert_grads)


@pytest.mark.parametrize("dp, ep, sharding", [(2, 1, "none"), (1, 2, "fsdp")])
def test_parallel_tag_routing_trains_like_one_process(dp, ep, sharding):
    """DDP and FSDP2 + expert parallelism pass the tags through their forwards (real gloo ranks)."""
    from ..conftest import run_ranks
    model = _parallel_model()
    want = _parallel_steps(model, torch.optim.SGD(model.parameters(), lr=0.5))
    got = run_ranks(_parallel_worker, dp * ep, dp, ep, sharding)[0]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_the_aux_loss_free_bias_steers_tag_routing():
    layer = layer_with_tags("tag", router="sigmoid", aux_loss_free=True).eval()
    tags_T = torch.zeros(10, dtype=torch.long)
    before = layer.router(torch.randn(10, 8), tags_T).experts_TK[0].tolist()
    for _ in range(2000):                       # the chosen experts look overloaded: pushed away
        layer.update_router_bias(torch.tensor([10 if e in before else 0 for e in range(5)]))
    after = layer.router(torch.randn(10, 8), tags_T).experts_TK[0].tolist()
    assert set(after).isdisjoint(before)


def test_route_tag_ids_map_by_name():
    cfg = model_cfg("tag")
    assert route_tag_ids(cfg, ["es", "de"], torch.tensor([0, 1, 1])).tolist() == [2, 0, 0]
    with pytest.raises(ValueError, match=r"tag 'fr' is not one the model routes by"):
        route_tag_ids(cfg, ["fr"], torch.tensor([0]))


def test_a_task_cannot_fine_tune_a_tag_routed_model():
    from moekit.train.run import _fill_route_tags, _finetune
    cfg = RunConfig.from_dict({"data": {"task": "rotten-tomatoes"}, "model": {
        "d_model": 16, "n_heads": 2, "moe": {"router_input": "tag", "route_tags": TAGS}}})
    with pytest.raises(ValueError, match="data.mixture=.*task:NAME"):
        _finetune(None, cfg, None)
    with pytest.raises(ValueError, match="data.mixture=.*task:NAME"):
        _fill_route_tags(cfg, {"tags": TAGS})


def test_route_tags_are_filled_from_the_data_or_must_match_it():
    from moekit.train.run import _fill_route_tags
    cfg = RunConfig.from_dict({"model": {"d_model": 16, "n_heads": 2, "moe": {"router_input": "token+tag"}}})
    _fill_route_tags(cfg, {"tags": ["b", "a"]})
    assert cfg.model.moe.route_tags == ["b", "a"]
    assert cfg.to_dict()["model"]["moe"]["route_tags"] == ["b", "a"]       # what config.json records
    _fill_route_tags(cfg, {"tags": ["b", "a"]})        # a resume: the same tags
    with pytest.raises(ValueError, match=r"differs from the data's tags \['a', 'b'\]"):
        _fill_route_tags(cfg, {"tags": ["a", "b"]})
    token = RunConfig.from_dict({"model": {"d_model": 16, "n_heads": 2}})
    _fill_route_tags(token, {"tags": ["a"]})
    assert token.model.moe.route_tags is None


def test_hf_export_refuses_tag_routing():
    from moekit.interop.hf import to_hf_config
    with pytest.raises(ValueError, match=r"router_input='tag' \(routing by tag\) has no equivalent"):
        to_hf_config(model_cfg("tag"))


def mixture_argv(parl_subset, tmp_path, steps=4, **extra):
    recipe = tmp_path / "mix.toml"
    recipe.write_text("".join(f'[[data.mixture]]\nsource = "{parl_subset}:{t}"\ntag = "{t}"\n'
                              for t in ("de", "en")))
    sets = {"data.vocab_size": 300, "data.seq_len": 16, "model.d_model": 16, "model.n_layers": 1,
            "model.n_heads": 2, "model.moe.d_ff": 16, "model.moe.num_experts": 4, "train.batch_size": 4,
            "train.max_steps": steps, "train.eval_every": 2, "train.eval_batches": 1, "train.save_every": 2,
            "train.log_every": 2, "model.moe.router_input": "tag", **extra}
    return ["--config", str(recipe), "--no-progress",
            *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]


def check_evaluation_maps_each_source_to_its_tag(run_dir):
    """A mixture source's own split knows one tag (index 0 there): evaluate routes it by the
    model's index of that tag (en = 1), not by 0."""
    from moekit.store.run_dir import load_run
    from moekit.train.evaluate import evaluate, lm_loss
    from moekit.train.splits import open_split
    model, _, cfg = load_run(run_dir)
    en = open_split(cfg, run_dir, "val").parts[1]
    loss = evaluate(model, en, 4, torch.device("cpu"), 1)
    x, y, t = en.batch(list(range(4)))
    assert t.tolist() == [0, 0, 0, 0] and en.tags == ["en"]
    with torch.no_grad():
        as_en, as_de = (float(lm_loss(model(x, tags=torch.full((4,), i)).logits, y)) for i in (1, 0))
    assert loss == pytest.approx(as_en, abs=1e-6) and as_en != as_de


def test_a_tag_routed_mixture_run_records_tags_resumes_and_generates(parl_subset, tmp_path, capsys):
    argv = mixture_argv(parl_subset, tmp_path)
    assert cli(["train", "--out", str(tmp_path / "whole"), *argv]) == 0
    saved = json.loads((tmp_path / "whole" / "config.json").read_text())
    moe = saved["model"]["moe"]
    assert moe["router_input"] == "tag" and moe["route_tags"] == ["de", "en"]
    assert cli(["train", "--out", str(tmp_path / "parts"), *argv, "--stop-at", "2"]) == 0
    assert cli(["train", "--resume", str(tmp_path / "parts"), "--no-progress"]) == 0
    rows = [[{k: v for k, v in json.loads(x).items() if not k.startswith("perf/")}
             for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("whole", "parts")]
    assert rows[0] == rows[1] and any("loss/val/en" in r for r in rows[0])
    capsys.readouterr()
    run = str(tmp_path / "whole")
    check_evaluation_maps_each_source_to_its_tag(tmp_path / "whole")
    assert cli(["report", run]) == 0                       # routing by source: the routers see the tags
    assert cli(["train", "--from", run, "--out", str(tmp_path / "from"), *argv]) == 0
    assert json.loads((tmp_path / "from" / "config.json").read_text())["model"]["moe"]["route_tags"] == [
        "de", "en"]
    capsys.readouterr()
    gen = ["generate", run, "--prompt", "Herr", "--max-new-tokens", "4", "--temperature", "0"]
    assert cli([*gen, "--tag", "de"]) == 0
    de = capsys.readouterr().out
    assert cli([*gen, "--tag", "en"]) == 0
    en = capsys.readouterr().out
    assert de.startswith("Herr") and en.startswith("Herr") and de != en    # each tag its own experts
    assert cli([*gen, "--tag", "fr"]) == 2
    one_line_error(capsys, "--tag 'fr' is not one of its tags de, en")
    assert cli(gen) == 2
    one_line_error(capsys, "pass --tag, one of de, en")
    assert cli(["export", run, "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    one_line_error(capsys, "router_input='tag'")
    assert not (tmp_path / "hf").exists()


def test_a_tag_for_a_model_that_does_not_route_by_tag_is_one_line():
    from moekit.serve.generate import tag_index
    for cfg in (model_cfg("token"), ModelConfig(vocab_size=61, d_model=16, n_layers=1, n_heads=2, d_ff=32)):
        model = MoETransformer.build(cfg)
        assert tag_index(model, None) is None
        with pytest.raises(ValueError, match=r"--tag 'de': this model does not route by tag .*; drop --tag"):
            tag_index(model, "de")
    assert tag_index(MoETransformer.build(model_cfg("tag")), "es") == 2
