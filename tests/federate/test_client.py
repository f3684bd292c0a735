"""A client's round in-process (no Flower): the engine's train() on its shard, the reply, and
a round asked again (after a restart) answered without training twice."""

import json

import pytest
import torch

from moekit.config import RunConfig
from moekit.federate import client, prepare
from moekit.federate.server import round_dir
from moekit.federate.spec import FederationSpec
from moekit.federate.strategies import on_wire
from moekit.store.checkpoint import Checkpoint
from moekit.store.run_dir import load_run

SETS = {"data": {"vocab_size": 512, "seq_len": 32},
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64,
                  "moe": {"d_ff": 32, "num_experts": 4, "top_k": 2}},
        "train": {"batch_size": 4, "max_steps": 3, "eval_batches": 2}}


@pytest.fixture
def federation(parl_subset, tmp_path):
    cfg = RunConfig.from_dict({**SETS, "data": {**SETS["data"], "corpus": str(parl_subset)}})
    shards = [f"{parl_subset}:de", f"{parl_subset}:en"]
    texts = prepare.shard_texts(cfg, shards)
    tok = prepare.shared_tokenizer(cfg, texts, None)
    out = tmp_path / "fed"
    out.mkdir()
    prepare.save_shared_tokenizer(tok, out)
    prepare.initial_model(cfg, tok, round_dir(out, 0))
    FederationSpec(recipe=cfg.to_dict(), shards=shards, rounds=3, strategy="routing").save(out)
    model = load_run(round_dir(out, 0))[0]
    return out, on_wire(model.state_dict(), model.state_dict()), tok.to_str()


def test_a_round_asked_again_is_not_trained_twice(federation):
    out, state, tok = federation
    first = client.train_round(out, 0, 1, state, tok)
    assert first.metrics["step"] == 3 and first.metrics["num-examples"] == 3 * 4 * 32
    assert len(first.metrics["load.0"]) == 4 and sum(first.metrics["load.0"]) == 3 * 4 * 32 * 2   # top-2
    assert set(first.arrays) >= {"probe/top1.0", "probe/experts.0", "blocks.0.ffn.experts.w_up_EDF"}
    second = client.train_round(out, 0, 2, state, tok)
    assert second.metrics["step"] == 6
    again = client.train_round(out, 0, 2, state, tok)                 # a restarted server asks again
    assert Checkpoint(client.client_dir(out, 0)).meta["step"] == 6 and again.metrics == second.metrics
    # the client died after round 2's checkpoint, before recording it: rebuilt from the run's metrics
    rounds = out / "clients" / "client0.rounds.json"
    record = json.loads(rounds.read_text())
    record["2"] = {"start": 3}
    rounds.write_text(json.dumps(record))
    rebuilt = client.train_round(out, 0, 2, state, tok)
    assert Checkpoint(client.client_dir(out, 0)).meta["step"] == 6
    assert rebuilt.metrics["train_loss"] == pytest.approx(second.metrics["train_loss"])
    assert rebuilt.metrics["load.0"] == second.metrics["load.0"]
    for k in second.arrays:
        torch.testing.assert_close(rebuilt.arrays[k], second.arrays[k])
    loss = client.evaluate_round(out, 0, state)["val_loss"]        # round 0's model on its own data
    assert 5.0 < loss < 7.5


def test_bf16_parameters_travel_as_float32_and_come_back():
    from flwr.app import ArrayRecord

    from moekit.model.transformer import MoETransformer
    from moekit.store.run_dir import model_config_for
    from moekit.store.source import Initial
    from moekit.train.run import load_initial
    cfg = RunConfig.from_dict({**SETS, "model": {**SETS["model"], "moe": {**SETS["model"]["moe"],
                                                                          "dtype": "bfloat16"}}})
    a, b = (MoETransformer.build(model_config_for(cfg, 300)) for _ in range(2))
    key = "blocks.0.ffn.experts.w_up_EDF"
    assert a.state_dict()[key].dtype == torch.bfloat16
    wire = ArrayRecord(on_wire(a.state_dict(), a.state_dict())).to_torch_state_dict()
    assert wire[key].dtype == torch.float32
    load_initial(b, Initial(wire, None, partial=True))
    got = b.state_dict()[key]
    assert got.dtype == torch.bfloat16 and torch.equal(got, a.state_dict()[key])
