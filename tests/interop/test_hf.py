"""Hugging Face checkpoints: logits equal transformers' own, both ways, every tensor accounted for."""

import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
# a Qwen2-MoE without shared experts has a zero-width one, which transformers' init warns about
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")

from moekit.interop.hf import (  # noqa: E402
    from_hf_state,
    load_hf_dir,
    model_config_from_hf,
    save_hf_dir,
    to_hf_state,
)
from moekit.model.config import ModelConfig  # noqa: E402
from moekit.model.transformer import MoETransformer  # noqa: E402
from moekit.moe.config import MoEConfig  # noqa: E402

SMALL = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, rms_norm_eps=1e-5)


def hf_model(kind, tie=False, theta=10000.0, **extra):
    """A tiny random transformers model of ``kind`` (``extra`` overrides its config), with weights
    N(0, 0.2): transformers' init is tiny, and the logits should say something."""
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, intermediate_size=48)
    cls, own = {
        "llama": (transformers.LlamaConfig, dict(intermediate_size=48)),
        "mistral": (transformers.MistralConfig, dict(intermediate_size=48, sliding_window=None)),
        "qwen2": (transformers.Qwen2Config, dict(intermediate_size=48)),
        "qwen3": (transformers.Qwen3Config, dict(intermediate_size=48, head_dim=12)),
        "mixtral": (transformers.MixtralConfig, dict(intermediate_size=24, num_local_experts=4,
                                                     num_experts_per_tok=2)),
        "qwen2_moe": (transformers.Qwen2MoeConfig, dict(moe, shared_expert_intermediate_size=40)),
        "olmoe": (transformers.OlmoeConfig, dict(moe, intermediate_size=24)),
        "qwen3_moe": (transformers.Qwen3MoeConfig, moe),
    }[kind]
    cfg = cls(**{**SMALL, **own, "tie_word_embeddings": tie, "rope_theta": theta, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


TOKENS = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(1))


KINDS = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "olmoe", "qwen3_moe"]
# (kind, config overrides): mixed dense/MoE layers, head_dim != hidden / heads, top-1 routers
# renormalised or not, Qwen2-MoE without q/k/v biases or without a shared expert
VARIANTS = [
    ("qwen2_moe", dict(num_hidden_layers=3, mlp_only_layers=[0], norm_topk_prob=False)),
    ("qwen2_moe", dict(num_hidden_layers=4, decoder_sparse_step=2, qkv_bias=False, norm_topk_prob=True,
                       num_experts_per_tok=1, head_dim=12)),
    ("qwen2_moe", dict(shared_expert_intermediate_size=0, norm_topk_prob=True)),
    ("qwen3_moe", dict(num_hidden_layers=3, mlp_only_layers=[1], head_dim=12, norm_topk_prob=True)),
    ("qwen3_moe", dict(num_experts_per_tok=1, norm_topk_prob=False)),
    ("olmoe", dict(norm_topk_prob=True)),
    ("mixtral", dict(num_experts_per_tok=1, head_dim=12)),
]


def check_import(theirs, tmp_path):
    theirs.save_pretrained(tmp_path)                       # per-expert keys on disk
    ours = load_hf_dir(tmp_path)
    with torch.no_grad():
        expected = theirs(TOKENS).logits
        got = ours(TOKENS).logits
    assert float((got - expected).abs().max()) <= 1e-4
    assert float(expected.std()) > 0.1                     # not a trivial comparison
    return ours


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tie", [False, True])
def test_imported_logits_equal_transformers(kind, tie, tmp_path):
    ours = check_import(hf_model(kind, tie, theta=50000.0), tmp_path)
    assert ours.cfg.rope_theta == 50000.0 and ours.cfg.tie_embeddings == tie and ours.cfg.n_kv_heads == 2
    assert ours.cfg.qkv_bias == (kind in ("qwen2", "qwen2_moe"))
    assert ours.cfg.qk_norm == {"qwen3": "head", "qwen3_moe": "head", "olmoe": "full"}.get(kind, "none")
    assert (ours.cfg.moe is None) == (kind in ("llama", "mistral", "qwen2", "qwen3"))


@pytest.mark.parametrize("kind, extra", VARIANTS)
def test_imported_variants_equal_transformers(kind, extra, tmp_path):
    theirs = hf_model(kind, **extra)
    ours = check_import(theirs, tmp_path)
    is_moe = [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in theirs.model.layers]
    assert ours.cfg.moe_layer_ids() == [i for i, m in enumerate(is_moe) if m]
    assert ours.cfg.head_dim == extra.get("head_dim", 8)
    m = ours.cfg.moe
    shared = kind == "qwen2_moe" and extra.get("shared_expert_intermediate_size") != 0
    assert bool(m.num_shared_experts) == shared and m.shared_gate == shared
    if m.top_k == 1:
        assert m.top1_weight == ("one" if extra.get("norm_topk_prob", kind == "mixtral") else "prob")


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "olmoe", "qwen3_moe"])
def test_a_loaded_models_fused_state_dict_reads_too(kind):
    theirs = hf_model(kind, tie=True)
    assert any(k.endswith("experts.gate_up_proj") for k in theirs.state_dict())
    ours = from_hf_state(json.loads(theirs.config.to_json_string()), theirs.state_dict())
    with torch.no_grad():
        assert float((ours(TOKENS).logits - theirs(TOKENS).logits).abs().max()) <= 1e-4


def build(**kw):
    """A tiny moekit model with every parameter N(0, 0.2) (norms and gates included)."""
    cfg = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64,
               rope_theta=50000.0, tie_embeddings=False)
    torch.manual_seed(0)
    model = MoETransformer.build(ModelConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def moe(**kw):
    return MoEConfig(**{**dict(d_model=32, d_ff=24, num_experts=4, top_k=2), **kw})


EXPORTS = [   # (the model type written, ModelConfig options)
    ("llama", dict()),
    ("llama", dict(tie_embeddings=True, head_dim=12)),
    ("qwen2", dict(qkv_bias=True)),
    ("qwen3", dict(qk_norm="head", head_dim=12, tie_embeddings=True)),
    ("mixtral", dict(moe=moe())),
    ("mixtral", dict(moe=moe(top_k=1, top1_weight="one", jitter_eps=0.01))),
    ("qwen2_moe", dict(moe=moe(num_shared_experts=1, shared_d_ff=40, shared_gate=True), qkv_bias=True,
                       n_layers=3, moe_layers="alternate")),
    ("qwen2_moe", dict(moe=moe(num_shared_experts=2))),                    # ungated: zero gate, doubled down
    ("qwen2_moe", dict(moe=moe(normalize_topk=False))),                    # a zero-width shared expert
    ("qwen2_moe", dict(moe=moe(top_k=1), n_layers=3, moe_layers=[0, 2])),  # top-1 weight p
    ("olmoe", dict(moe=moe(top_k=3, normalize_topk=False), qk_norm="full", tie_embeddings=True)),
    ("qwen3_moe", dict(moe=moe(), qk_norm="head", head_dim=12, n_layers=3, moe_layers=[0, 2])),
    ("qwen3_moe", dict(moe=moe(top_k=1, top1_weight="one"), qk_norm="head")),
]


@pytest.mark.parametrize("kind, options", EXPORTS)
def test_exported_model_loads_in_transformers_with_equal_logits_and_round_trips(kind, options, tmp_path):
    ours = build(**options)
    save_hf_dir(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == kind
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        expected = ours(TOKENS).logits
        assert float((theirs.eval()(TOKENS).logits - expected).abs().max()) <= 1e-4
    assert float(expected.std()) > 0.1
    back = load_hf_dir(tmp_path)
    assert back.state_dict().keys() == ours.state_dict().keys()
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    for field in ("head_dim", "qkv_bias", "qk_norm", "tie_embeddings", "rope_theta"):
        assert getattr(back.cfg, field) == getattr(ours.cfg, field), field
    assert back.cfg.moe_layer_ids() == ours.cfg.moe_layer_ids()


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
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported yet; supported: llama, mistral, "
                                         "qwen2, qwen3, mixtral, qwen2_moe, olmoe, qwen3_moe"):
        from_hf_state({**cfg, "model_type": "gpt2"}, state)
    with pytest.raises(ValueError, match="sliding_window=4096"):
        from_hf_state({**cfg, "model_type": "mistral", "sliding_window": 4096}, state)


def test_an_ungated_shared_expert_needs_its_zero_gate():
    """moekit's ungated shared expert is written as Qwen2-MoE's gated one with a zero gate; a
    checkpoint that says so (moekit_shared_gate: false) but holds a gate that is not zero is refused."""
    config, state = to_hf_state(build(moe=moe(num_shared_experts=1)))
    assert config["moekit_shared_gate"] is False
    assert not from_hf_state(config, state).cfg.moe.shared_gate
    state["model.layers.1.mlp.shared_expert_gate.weight"] = torch.full((1, 32), 0.1)
    with pytest.raises(ValueError, match="moekit_shared_gate=false says the shared expert is ungated, but "
                                         "model.layers.1.mlp.shared_expert_gate.weight is not zero"):
        from_hf_state(config, state)


IMPORT_REFUSALS = [   # (kind, config.json changes, the message)
    ("olmoe", dict(clip_qkv=8.0), "clip_qkv=8.0: clipping q/k/v is not supported"),
    ("olmoe", dict(head_dim=12), "head_dim=12 differs from hidden_size / num_attention_heads = 8, which "
                                 "olmoe needs"),
    ("qwen2", dict(use_sliding_window=True), "use_sliding_window=true: sliding-window attention"),
    ("qwen3_moe", dict(use_sliding_window=True, sliding_window=16), "use_sliding_window=true"),
    ("qwen2", dict(sliding_window=16, layer_types=["sliding_attention"] * 2), None),   # off: imports
    ("qwen3_moe", dict(attention_bias=True), r"attention_bias=true \(qwen3_moe\): an o_proj bias"),
    ("llama", dict(mlp_bias=True), "mlp_bias=true"),
    ("qwen2_moe", dict(hidden_act="gelu"), "hidden_act='gelu': only SwiGLU"),
    ("qwen2", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
     "rope type 'linear'"),
    ("qwen3", dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    ("qwen2_moe", dict(decoder_sparse_step=0), "decoder_sparse_step=0"),
    # a value moekit's own config refuses: named by the config.json key, not MoEConfig.top_k
    ("mixtral", dict(num_experts_per_tok=8),
     r"^config.json num_experts_per_tok=8: exceeds num_local_experts="),
    ("qwen2_moe", dict(num_experts_per_tok=99), r"^config.json num_experts_per_tok=99: exceeds num_experts="),
    ("llama", dict(num_key_value_heads=3), r"^config.json num_key_value_heads=3: must divide "
                                           r"num_attention_heads="),
    ("qwen3_moe", dict(moe_intermediate_size=0), r"^config.json moe_intermediate_size=0: "),
]


@pytest.mark.parametrize("kind, change, message", IMPORT_REFUSALS)
def test_what_moekit_cannot_hold_is_refused_on_import(kind, change, message):
    cfg = json.loads(hf_model(kind).config.to_json_string())
    if message is None:
        model_config_from_hf({**cfg, **change})
        return
    with pytest.raises(ValueError, match=message) as err:
        model_config_from_hf({**cfg, **change})
    assert "\n" not in str(err.value)


EXPORT_REFUSALS = [   # (ModelConfig options, the feature named)
    (dict(moe=moe(router="expert_choice")), "router='expert_choice' has no equivalent in any Hugging Face"),
    (dict(moe=moe(router="sigmoid", aux_loss_free=True)), "router='sigmoid'"),
    (dict(moe=moe(noisy_gating=True)), "noisy_gating"),
    (dict(moe=moe(capacity_factor=1.25)), "capacity_factor=1.25"),
    (dict(moe=moe(activation="gelu")), "activation='gelu'"),
    (dict(qk_norm="full"), "qk_norm='full' in a dense model"),
    (dict(qk_norm="head", qkv_bias=True), "qkv_bias with qk_norm='head'"),
    (dict(moe=moe(num_shared_experts=1), qk_norm="full"), "shared experts with qk_norm='full' has no "
                                                           "equivalent in olmoe"),
    (dict(moe=moe(), qk_norm="full", moe_layers="alternate"), "dense layers among MoE with qk_norm='full'"),
    (dict(moe=moe(), qk_norm="full", head_dim=12), r"head_dim != d_model / n_heads"),
    (dict(moe=moe(num_shared_experts=1), qk_norm="head"), "shared experts with qk_norm='head' has no "
                                                           "equivalent in qwen3_moe"),
    # a dynamic number of experts per token, whatever else the model is (a sigmoid router: named first)
    *[(dict(moe=moe(dynamic_k=mode, **extra)), re.escape(
        f"dynamic_k={mode!r} (a dynamic number of experts per token) has no equivalent in any Hugging Face "
        "model type (llama, mistral, qwen2, qwen3, mixtral, qwen2_moe, olmoe, qwen3_moe); export a fixed "
        "top-k model (dynamic_k='none'), or keep moekit's own format (moekit export RUN)"))
      for mode, extra in (("top_p", {}), ("null", dict(num_null_experts=2)), ("relu", {}),
                          ("top_p", dict(router="sigmoid", target_k=2)))],
]


@pytest.mark.parametrize("options, message", EXPORT_REFUSALS)
def test_what_no_hugging_face_model_expresses_is_refused_before_writing(options, message, tmp_path):
    model = MoETransformer.build(ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=48,
                                             **options))
    with pytest.raises(ValueError, match=f"export to Hugging Face: {message}") as err:
        save_hf_dir(model, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


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
    from moekit.store.run_dir import load_run
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
