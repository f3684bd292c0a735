"""train --from: a new run from another model's weights, architecture and tokenizer."""

import json

import pytest
import torch

from moekit.cli.main import main as cli
from moekit.store.run_dir import load_run

from .test_faults import one_line_error


def data_and_train(corpus, max_steps=3, **train_kw):
    """Only data and train settings: the architecture comes from --from."""
    sets = {"data.corpus": f'"{corpus}"', "data.seq_len": 32, "train.batch_size": 4,
            "train.eval_batches": 1, "train.max_steps": max_steps, "train.log_every": 1,
            "train.warmup_steps": 1, "train.eval_every": 1000,
            **{f"train.{k}": v for k, v in train_kw.items()}}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def src_run(parl_subset, tmp_path_factory):
    run = tmp_path_factory.mktemp("src") / "run"
    assert cli(["train", "--out", str(run), "--no-progress", "--set", "data.vocab_size=512",
                "--set", "model.d_model=64", "--set", "model.n_layers=2", "--set", "model.d_ff=128",
                "--set", "model.moe.d_ff=64", "--set", "model.moe.num_experts=4",
                "--set", "model.moe_layers=[1]",
                *data_and_train(parl_subset, max_steps=4)]) == 0
    return run


def test_a_run_from_weights_starts_at_their_function_with_their_tokenizer(src_run, parl_subset, tmp_path):
    out = tmp_path / "new"
    assert cli(["train", "--from", str(src_run), "--out", str(out), "--no-progress",
                *data_and_train(parl_subset, max_steps=2, lr=1e-12, weight_decay=0.0)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    src_cfg = json.loads((src_run / "config.json").read_text())
    assert cfg["train"]["init_from"] == str(src_run)
    # the architecture is SRC's (whose config.json keeps the recipe's vocab_size: the BPE set 512)
    assert {**cfg["model"], "vocab_size": None} == {**src_cfg["model"], "vocab_size": None}
    assert cfg["model"]["vocab_size"] == 512
    assert (out / "tokenizer.json").read_text() == (src_run / "tokenizer.json").read_text()
    assert json.loads((out / "data" / "meta.json").read_text())["vocab_size"] == 512
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/lm" in r] == [1, 2]                # step 0, fresh schedule
    before, _, _ = load_run(src_run)
    after, _, _ = load_run(out)
    for name, t in before.state_dict().items():          # lr ~ 0: still SRC's weights
        assert torch.allclose(after.state_dict()[name], t, atol=1e-6), name
    src_losses = [json.loads(line)["loss/lm"] for line in (src_run / "metrics.jsonl").read_text().splitlines()
                  if "loss/lm" in line]
    new_loss = rows[0]["loss/lm"]
    assert new_loss < src_losses[0] - 0.1     # SRC's trained function, not a fresh initialisation


def test_a_run_from_a_hugging_face_dir_keeps_its_padded_vocabulary_and_resumes(src_run, parl_subset,
                                                                                 tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = tmp_path / "hf"
    cfg = transformers.LlamaConfig(vocab_size=520, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                   intermediate_size=48, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(hf)
    (hf / "tokenizer.json").write_text((src_run / "tokenizer.json").read_text())   # 512 tokens
    out = tmp_path / "run"
    assert cli(["train", "--from", str(hf), "--out", str(out), "--no-progress", "--stop-at", "2",
                *data_and_train(parl_subset, max_steps=4)]) == 0
    assert json.loads((out / "config.json").read_text())["model"]["vocab_size"] == 520
    assert cli(["train", "--resume", str(out), "--no-progress"]) == 0
    model, tok, _ = load_run(out)
    assert model.cfg.vocab_size == 520 and tok.get_vocab_size() == 512 and model.cfg.moe is None


def test_bad_sources_and_contradicting_recipes_are_one_line(src_run, parl_subset, tmp_path, capsys):
    out = tmp_path / "new"
    cases = [(["--from", str(tmp_path / "nope")], "no such directory or catalog model"),
             (["--from", str(src_run), "--set", "model.d_model=128"], "model.d_model=128 contradicts --from"),
             (["--from", str(src_run), "--set", "model.moe.num_experts=8"],
              "model.moe.num_experts=8 contradicts --from"),
             (["--from", str(src_run), "--set", "model.moe=false"], "model.moe=False contradicts --from"),
             (["--from", str(src_run), "--resume", str(src_run)], "drop --from")]
    for extra, needle in cases:
        capsys.readouterr()
        assert cli(["train", "--out", str(out), "--no-progress", *extra, *data_and_train(parl_subset)]) == 2
        one_line_error(capsys, needle)
        assert not out.exists()
    capsys.readouterr()
    assert cli(["train", "--config", "configs/tiny-moe.toml", "--from", str(src_run), "--out", str(out),
                "--no-progress", *data_and_train(parl_subset)]) == 2
    one_line_error(capsys, "model fields contradict --from", "remove the recipe's [model] section")
    # equal in meaning is not a contradiction: [1] is the layer list SRC holds; None heads = n_heads
    assert cli(["train", "--from", str(src_run), "--out", str(tmp_path / "same"), "--no-progress",
                "--set", "model.moe_layers=[1]", "--set", "model.n_kv_heads=4",
                *data_and_train(parl_subset, max_steps=1)]) == 0
    # what holds no weights may differ: a longer context
    assert cli(["train", "--from", str(src_run), "--out", str(out), "--no-progress",
                "--set", "model.max_seq_len=128", *data_and_train(parl_subset, max_steps=1)]) == 0
    assert json.loads((out / "config.json").read_text())["model"]["max_seq_len"] == 128
