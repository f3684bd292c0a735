"""Hugging Face checkpoints: logits equal transformers' own, both ways, every tensor accounted for."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.interop.hf import from_hf_state, load_hf_dir, save_hf_dir, to_hf_state  # noqa: E402
from moekit.model.config import ModelConfig  # noqa: E402
from moekit.model.transformer import MoETransformer  # noqa: E402
from moekit.moe.config import MoEConfig  # noqa: E402

SMALL = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, rms_norm_eps=1e-5)


def hf_model(kind, tie=False, theta=10000.0):
    if kind == "mistral":
        cfg = transformers.MistralConfig(**SMALL, intermediate_size=48, tie_word_embeddings=tie,
                                         rope_theta=theta, sliding_window=None)
        model = transformers.MistralForCausalLM(cfg)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(**SMALL, intermediate_size=48, tie_word_embeddings=tie,
                                       rope_theta=theta)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.MixtralConfig(**SMALL, intermediate_size=24, num_local_experts=4,
                                         num_experts_per_tok=2, tie_word_embeddings=tie, rope_theta=theta)
        model = transformers.MixtralForCausalLM(cfg)
    torch.manual_seed(0)
    with torch.no_grad():                 # transformers' init is tiny: make the logits say something
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


TOKENS = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["llama", "mistral", "mixtral"])
@pytest.mark.parametrize("tie", [False, True])
def test_imported_logits_equal_transformers(kind, tie, tmp_path):
    theirs = hf_model(kind, tie, theta=50000.0)
    theirs.save_pretrained(tmp_path)                       # per-expert keys on disk
    ours = load_hf_dir(tmp_path)
    assert ours.cfg.rope_theta == 50000.0 and ours.cfg.tie_embeddings == tie
    with torch.no_grad():
        expected = theirs(TOKENS).logits
        got = ours(TOKENS).logits
    assert float((got - expected).abs().max()) <= 1e-4
    assert float(expected.std()) > 0.1                     # not a trivial comparison


@pytest.mark.parametrize("moe", [None, MoEConfig(d_model=32, d_ff=24, num_experts=4, top_k=2)])
def test_exported_model_loads_in_transformers_with_equal_logits_and_round_trips(moe, tmp_path):
    torch.manual_seed(0)
    ours = MoETransformer.build(ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                            d_ff=48, max_seq_len=64, tie_embeddings=False, moe=moe)).eval()
    save_hf_dir(ours, tmp_path)
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        assert float((theirs.eval()(TOKENS).logits - ours(TOKENS).logits).abs().max()) <= 1e-4
    back = load_hf_dir(tmp_path)
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_every_tensor_is_accounted_for(tmp_path):
    theirs = hf_model("mixtral")
    cfg = json.loads(theirs.config.to_json_string())
    _, state = to_hf_state(from_hf_state(cfg, _disk_state(theirs, tmp_path)))
    missing = dict(state)
    del missing["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    with pytest.raises(ValueError, match="no source for blocks.1.ffn.experts.w_down_EFD"):
        from_hf_state(cfg, missing)
    extra = {**state, "model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}
    with pytest.raises(ValueError, match="unused model.layers.0.self_attn.q_proj.bias"):
        from_hf_state(cfg, extra)
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported yet"):
        from_hf_state({**cfg, "model_type": "gpt2"}, state)
    with pytest.raises(ValueError, match="sliding_window=4096"):
        from_hf_state({**cfg, "model_type": "mistral", "sliding_window": 4096}, state)


def test_what_mixtral_cannot_express_is_refused():
    model = MoETransformer.build(ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=48,
                                             moe=MoEConfig(d_model=32, d_ff=24, num_experts=4, top_k=2,
                                                           router="expert_choice")))
    with pytest.raises(ValueError, match="router has no Mixtral equivalent"):
        to_hf_state(model)


def _disk_state(model, tmp_path):
    from safetensors.torch import load_file
    model.save_pretrained(tmp_path)
    return load_file(str(tmp_path / "model.safetensors"))


def test_cli_import_generate_export_round_trip(tmp_path, capsys):
    from moekit import load_model
    from moekit.cli.main import main as cli
    from moekit.data.tokenizer import train_tokenizer
    tok = train_tokenizer(["Mr Speaker, the house will come to order. " * 20] * 5, vocab_size=300)
    cfg = transformers.MixtralConfig(**{**SMALL, "vocab_size": 300}, intermediate_size=24,
                                     num_local_experts=4, num_experts_per_tok=2)
    theirs = transformers.MixtralForCausalLM(cfg).eval()
    src = tmp_path / "hf"
    theirs.save_pretrained(src)
    tok.save(str(src / "tokenizer.json"))
    # a Hugging Face directory reads directly ...
    model, _ = load_model(src)
    tokens = torch.tensor([tok.encode("Mr Speaker, the house").ids])
    with torch.no_grad():
        assert float((model(tokens).logits - theirs(tokens).logits).abs().max()) <= 1e-4
    # ... and imports into a moekit directory that generate and export read
    assert cli(["import", str(src), "--out", str(tmp_path / "m")]) == 0
    assert cli(["generate", str(tmp_path / "m"), "--prompt", "Mr Speaker", "--max-new-tokens", "3"]) == 0
    assert cli(["export", str(tmp_path / "m"), "--format", "hf", "--out", str(tmp_path / "back")]) == 0
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert float((again(tokens).logits - theirs(tokens).logits).abs().max()) <= 1e-4
    assert (tmp_path / "back" / "tokenizer.json").exists()
    capsys.readouterr()
    assert cli(["import", str(tmp_path / "nowhere"), "--out", str(tmp_path / "n")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert cli(["import", str(src), "--out", str(tmp_path / "m" / "model.safetensors")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()


def test_real_smollm2_weights_give_transformers_logits(tmp_path, monkeypatch):
    """The catalog's SmolLM2-135M (real weights: the GGUF dequantized and cached once), cut to
    its first 3 layers, on a real sentence: our logits are transformers' own."""
    pytest.importorskip("gguf")
    from safetensors.torch import load_file

    from moekit.interop.hf import catalog_model_dir
    from moekit.train.run_dir import load_run
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    path = catalog_model_dir("smollm2-135m")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["vocab_size"] == 49152
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog near the river bank.").ids])
    cut = {**cfg, "num_hidden_layers": 3}
    state = {k: v for k, v in load_file(str(path / "model.safetensors")).items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < 3}
    ours = from_hf_state(cut, state)
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in cut.items()
                                                                       if k != "architectures"}))
    missing = theirs.load_state_dict(state, strict=False)
    assert set(missing.missing_keys) <= {"lm_head.weight"} and not missing.unexpected_keys
    theirs.tie_weights()
    with torch.no_grad():
        a, b = ours(ids).logits, theirs.eval()(ids).logits
    assert float((a - b).abs().max()) <= 1e-4 and float(b.std()) > 1.0
    model, tok2, _ = load_run("smollm2-135m")               # the catalog name reads as a model
    assert model.cfg.n_layers == 30 and tok2.get_vocab_size() == 49152
