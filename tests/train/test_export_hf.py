"""moekit export --format hf: the tokenizer and end-of-text token travel with the weights."""

import json

import pytest
import torch

from moekit.config import RunConfig
from moekit.data.tokenizer import train_tokenizer
from moekit.model.config import ModelConfig
from moekit.model.transformer import MoETransformer
from moekit.store.run_dir import export_hf, save_export

transformers = pytest.importorskip("transformers")


def test_transformers_reads_the_exported_tokenizer_and_stops_at_end_of_text(tmp_path):
    torch.manual_seed(0)
    model = MoETransformer.build(ModelConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=4, d_ff=64,
                                             max_seq_len=48)).eval()
    tok = train_tokenizer(["the house will come to order, order order " * 10] * 4, vocab_size=300)
    save_export(model, tok, RunConfig(model=model.cfg), tmp_path / "run")
    export_hf(tmp_path / "run", tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "the house will come to order"
    assert theirs(text)["input_ids"] == tok.encode(text).ids
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert theirs.eos_token == "<|endoftext|>"
    assert theirs.model_max_length == config["max_position_embeddings"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.generation_config.eos_token_id == 0 == config["eos_token_id"]
    ids = torch.tensor([tok.encode(text).ids])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids).logits, atol=1e-4)


def _llama_dir(path, tok, **cfg_kw):
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                   intermediate_size=48, max_position_embeddings=64, **cfg_kw)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    return path


def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_model_directories_are_never_overwritten_and_bad_files_are_one_line(tmp_path, capsys):
    from moekit.cli.main import main as cli
    tok = train_tokenizer(["the house will come to order " * 10] * 4, vocab_size=300)
    src = _llama_dir(tmp_path / "llama", tok)
    other = _llama_dir(tmp_path / "other", tok, rope_theta=5e4)
    before = _snapshot(other)

    def refused(argv, needle, keep=None):
        capsys.readouterr()
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
        if keep is not None:
            assert _snapshot(keep) == before

    refused(["import", str(other), "--out", str(other)], "is the source itself", other)
    refused(["upcycle", str(src), "--experts", "4", "--out", str(other)], "holds another model", other)
    refused(["export", str(src), "--format", "hf", "--out", str(other)], "holds another model", other)
    assert cli(["export", str(src), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert cli(["export", str(src), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0   # replaced
    refused(["import", str(src), "--out", str(tmp_path / "hf")], "not an earlier moekit export")

    bad = tmp_path / "bad"
    cases = {"no hidden_size": (lambda c: c.pop("hidden_size"), "config.json has no 'hidden_size'"),
             "rope scaling": (lambda c: c.update(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
                              "rope_scaling rope type 'llama3'"),
             "tied head": (lambda c: c.update(tie_word_embeddings=True), "lm_head.weight differs")}
    for name, (edit, needle) in cases.items():
        d = bad / name.replace(" ", "_")
        _llama_dir(d, tok)
        cfg = json.loads((d / "config.json").read_text())
        edit(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
        refused(["import", str(d), "--out", str(tmp_path / "out")], needle)
    d = _llama_dir(bad / "index", tok)
    (d / "model.safetensors.index.json").write_text('{"weight_map": ')
    refused(["import", str(d), "--out", str(tmp_path / "out")], "index.json' is not readable JSON")
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')
    refused(["import", str(d), "--out", str(tmp_path / "out")], "has no weight_map")
    d = _llama_dir(bad / "truncated", tok)
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000])
    refused(["generate", str(d), "--prompt", "the"], "is not a readable safetensors file")
    d = _llama_dir(bad / "bin", tok)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    refused(["import", str(d), "--out", str(tmp_path / "out")], "moekit reads safetensors only")
    assert not (tmp_path / "out").exists()
    exp = tmp_path / "exp"
    assert cli(["import", str(src), "--out", str(exp)]) == 0
    words = [f"{a}{b}{c}" for a in "abcdefgh" for b in "ijklmnop" for c in "qrstuvwx"]
    big = train_tokenizer([" ".join(words)] * 4, vocab_size=400)
    assert big.get_vocab_size() > 300
    big.save(str(exp / "tokenizer.json"))
    refused(["generate", str(exp), "--prompt", "the"], "tokens but the model's vocabulary is 300")
    refused(["generate", str(tmp_path / "nope"), "--prompt", "the"], "does not exist; give a run, export")


def test_a_model_transformers_cannot_express_is_refused_before_writing(tmp_path, capsys):
    from moekit.cli.main import main as cli
    torch.manual_seed(0)
    model = MoETransformer.build(ModelConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=5, head_dim=8,
                                             d_ff=64)).eval()     # 5 heads of 8 on d_model 32: moekit only
    tok = train_tokenizer(["the house will come to order " * 10] * 4, vocab_size=300)
    save_export(model, tok, RunConfig(model=model.cfg), tmp_path / "run")
    assert cli(["export", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a multiple of n_heads=5" in err, err
    assert not (tmp_path / "hf").exists()
    with pytest.raises(SystemExit) as stop:
        cli(["grow", str(tmp_path / "run"), "--d-model", "32.5", "--out", str(tmp_path / "g")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid int value: '32.5'" in err, err   # argparse: one line
