"""The federated averages, the probe diagnostics, partial weight loading and the spec's checks:
pure functions, checked against explicit loops on random tensors."""

import pytest
import torch

from moekit.config import RunConfig
from moekit.federate.diagnostics import federation_similarity, pair_similarity, probe
from moekit.federate.spec import FederationSpec
from moekit.federate.strategies import aggregate, fedavg, routing_weighted, sent_keys
from moekit.model.transformer import MoETransformer
from moekit.store.run_dir import model_config_for
from moekit.store.source import Initial
from moekit.train.run import load_initial

TINY = {"model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "tie_embeddings": True,
                  "moe": {"d_ff": 16, "num_experts": 4, "top_k": 2}},
        "data": {"vocab_size": 300}}


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return MoETransformer.build(model_config_for(RunConfig.from_dict(TINY), 300)).eval()


def states(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"blocks.0.ffn.experts.w_up_EDF": torch.randn(4, 3, 2, generator=g),
             "blocks.0.ffn.router.weight_ED": torch.randn(4, 3, generator=g),
             "blocks.0.ffn.router.tag_logits_NE": torch.randn(4, 4, generator=g),
             "blocks.0.attn.wq.weight": torch.randn(3, 3, generator=g),
             "steps": torch.tensor([7])} for _ in range(n)]


def test_fedavg_is_the_token_weighted_mean():
    s, w = states(3), [1.0, 2.0, 5.0]
    avg = fedavg(s, w)
    for key in ("blocks.0.attn.wq.weight", "blocks.0.ffn.experts.w_up_EDF"):
        want = sum(x[key] * wi for x, wi in zip(s, w)) / sum(w)
        torch.testing.assert_close(avg[key], want)
    assert avg["steps"].tolist() == [7]                    # integer tensors are not averaged


def test_routing_weighted_rows_follow_each_clients_expert_counts():
    s, w = states(3, seed=1), [1.0, 1.0, 2.0]
    loads = [{0: [10, 0, 3, 0]}, {"0": [0, 5, 1, 0]}, {0: [30, 5, 0, 0]}]   # expert 3: nobody used it
    avg = routing_weighted(s, w, loads)
    for key in ("blocks.0.ffn.experts.w_up_EDF", "blocks.0.ffn.router.weight_ED"):
        for e in range(4):
            c = [float(next(iter(ld.values()))[e]) for ld in loads]
            c = c if sum(c) > 0 else w                      # unused: by tokens
            want = sum(x[key][e] * ci for x, ci in zip(s, c)) / sum(c)
            torch.testing.assert_close(avg[key][e], want)
    plain = fedavg(s, w)                                    # not per-expert: plain FedAvg
    torch.testing.assert_close(avg["blocks.0.attn.wq.weight"], plain["blocks.0.attn.wq.weight"])
    tags = "blocks.0.ffn.router.tag_logits_NE"
    torch.testing.assert_close(avg[tags], plain[tags])
    assert not torch.allclose(avg["blocks.0.ffn.experts.w_up_EDF"], plain["blocks.0.ffn.experts.w_up_EDF"])


def test_aggregate_refuses_mismatched_clients():
    a, b = states(2)
    del b["blocks.0.attn.wq.weight"]
    with pytest.raises(ValueError, match="other tensors"):
        aggregate("fedavg", [a, b], [1, 1])
    with pytest.raises(ValueError, match="routing counts for layer 0"):
        aggregate("routing", states(2), [1, 1], [{}, {}])


def test_local_experts_sends_no_expert_and_tied_head_once():
    keys = list(tiny_model().state_dict())
    local = sent_keys(keys, "local-experts", tied=True)
    assert not any(".ffn.experts." in k for k in local) and "lm_head.weight" not in local
    assert "blocks.1.ffn.router.weight_ED" in local and "embed.weight" in local
    full = sent_keys(keys, "fedavg", tied=True)
    assert set(full) - set(local) == {k for k in keys if ".ffn.experts." in k}


def test_probe_similarity_sees_identical_and_permuted_experts():
    a = tiny_model()
    pa = probe(a, seed=3)
    assert pa["probe/experts.0"].shape == (4, 128, 32) and pa["probe/top1.1"].shape == (128,)
    load = {"0": [1, 2, 3, 4], "1": [4, 3, 2, 1]}
    same = pair_similarity(pa, probe(a, seed=3), load, load)
    assert same["experts/layer0/same_index_cos"] == pytest.approx(1.0)
    assert same["experts/layer0/same_index_match"] == 1.0 and same["routing/layer1/top1_agreement"] == 1.0
    b = tiny_model()                        # the same model with its experts renumbered (a cycle)
    perm = torch.tensor([1, 2, 3, 0])
    with torch.no_grad():
        for name, t in b.state_dict().items():
            if ".ffn.experts." in name or name.endswith("router.weight_ED"):
                t.copy_(t[perm])
    moved = pair_similarity(pa, probe(b, seed=3), load, load)
    for i in (0, 1):
        assert moved[f"experts/layer{i}/same_index_match"] == 0.0
        assert moved[f"experts/layer{i}/same_index_cos"] < 0.5
        assert moved[f"routing/layer{i}/top1_agreement"] < 0.5
    both = federation_similarity([pa, pa, probe(b, seed=3)], [load] * 3)   # mean over the 3 pairs
    assert both["experts/layer0/same_index_match"] == pytest.approx(1 / 3)


def test_partial_initial_loads_some_tensors_and_refuses_strangers():
    model, other = tiny_model(0), tiny_model(1)
    given = {"embed.weight": other.state_dict()["embed.weight"]}
    before = model.state_dict()["blocks.0.attn.wq.weight"].clone()
    load_initial(model, Initial(given, None, partial=True))
    torch.testing.assert_close(model.state_dict()["embed.weight"], given["embed.weight"])
    torch.testing.assert_close(model.state_dict()["lm_head.weight"], given["embed.weight"])   # tied
    torch.testing.assert_close(model.state_dict()["blocks.0.attn.wq.weight"], before)
    with pytest.raises(ValueError, match="does not have"):
        load_initial(model, Initial({"nope": torch.zeros(1)}, None, partial=True))
    with pytest.raises(ValueError, match=r"has as \(300, 32\)"):
        load_initial(model, Initial({"embed.weight": torch.zeros(3, 32)}, None, partial=True))


@pytest.mark.parametrize("change, message", [
    ({"rounds": 0}, "--rounds 0: a federation needs at least one round"),
    ({"strategy": "fedprox"}, "--strategy 'fedprox': no such strategy; use one of fedavg"),
    ({"min_clients": 3}, "--min-clients 3: must be between 1 and the number of clients"),
    ({"shards": []}, "a federation needs at least one client"),
])
def test_spec_checks_one_line_each(change, message):
    spec = {"recipe": RunConfig.from_dict(TINY).to_dict(), "shards": ["a", "b"], "rounds": 2, **change}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FederationSpec(**spec)


def test_client_schedule_spans_the_federation():
    spec = FederationSpec(recipe=RunConfig.from_dict({**TINY, "train": {"max_steps": 7}}).to_dict(),
                          shards=["x:de", "x:en"], rounds=3)
    cfg = spec.client_config(1)
    assert cfg.data.corpus == "x:en" and cfg.train.max_steps == 21
    assert cfg.train.eval_every == cfg.train.save_every == cfg.train.log_every == 7
    assert spec.quorum == 1
