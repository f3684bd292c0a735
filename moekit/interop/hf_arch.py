"""The Hugging Face architectures moekit reads and writes: one table row each, the config.json
fields each one has, and which one an export writes.

| model_type | attention                         | FFN                                              |
|------------|-----------------------------------|--------------------------------------------------|
| llama      | plain                             | dense SwiGLU                                     |
| mistral    | plain (sliding window off)        | dense SwiGLU                                     |
| qwen2      | q/k/v biases                      | dense SwiGLU                                     |
| qwen3      | per-head q/k RMSNorm, any head_dim| dense SwiGLU                                     |
| mixtral    | plain                             | softmax top-k, renormalised, every layer         |
| qwen2_moe  | q/k/v biases (``qkv_bias``)       | softmax top-k (``norm_topk_prob``), a shared     |
|            |                                   | expert times sigmoid(x . w), dense layers        |
| olmoe      | q/k RMSNorm over the projection   | softmax top-k (``norm_topk_prob``), every layer  |
| qwen3_moe  | per-head q/k RMSNorm, any head_dim| softmax top-k (``norm_topk_prob``), dense layers |

Dense layers among MoE ones (Qwen2-MoE, Qwen3-MoE): layer i is MoE when it is not in
``mlp_only_layers`` and (i + 1) % ``decoder_sparse_step`` == 0 (step 2: moekit's "alternate").
A top-1 router with ``norm_topk_prob`` gives weight 1: moekit's ``top1_weight="one"``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moekit.model.config import ModelConfig
from moekit.moe.config import MoEConfig


@dataclass(frozen=True)
class Arch:
    cls: str                                   # config.json "architectures"
    moe: str | None = None                     # module of a layer's MoE; None: dense only
    experts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")   # per-expert (gate, up, down)
    n_experts: str = "num_experts"             # config.json key of the expert count written
    expert_ff: str = "intermediate_size"       # config.json key of the expert width
    renormalises: bool = False                 # top-k weights always renormalised (else norm_topk_prob)
    qk_norm: str = "none"                      # fixed by the architecture
    qkv_bias: str = "no"                       # "no" | "yes" | "flag" (config.json qkv_bias)
    sparse_layers: bool = False                # decoder_sparse_step / mlp_only_layers
    shared: bool = False                       # a gated shared expert per MoE layer
    sliding_switch: bool = False               # use_sliding_window turns the window on (Qwen)
    default_head_dim: int | None = None        # config class default (Qwen3: 128), else D // H


ARCHS = {
    "llama": Arch("LlamaForCausalLM"),
    "mistral": Arch("MistralForCausalLM"),
    "qwen2": Arch("Qwen2ForCausalLM", qkv_bias="yes", sliding_switch=True),
    "qwen3": Arch("Qwen3ForCausalLM", qk_norm="head", sliding_switch=True, default_head_dim=128),
    "mixtral": Arch("MixtralForCausalLM", moe="block_sparse_moe", experts=("w1", "w3", "w2"),
                    n_experts="num_local_experts", renormalises=True),
    "qwen2_moe": Arch("Qwen2MoeForCausalLM", moe="mlp", expert_ff="moe_intermediate_size", qkv_bias="flag",
                      sparse_layers=True, shared=True, sliding_switch=True),
    "olmoe": Arch("OlmoeForCausalLM", moe="mlp", qk_norm="full"),
    "qwen3_moe": Arch("Qwen3MoeForCausalLM", moe="mlp", expert_ff="moe_intermediate_size", qk_norm="head",
                      sparse_layers=True, sliding_switch=True),
}
ARCHITECTURES = {kind: arch.cls for kind, arch in ARCHS.items()}
_ALL = ", ".join(ARCHS)
# config.json key moekit writes for a shared expert without a gate (Qwen2-MoE always gates):
# the gate weight is zero (sigmoid(0) = 0.5) and the shared down_proj doubled, exactly
UNGATED = "moekit_shared_gate"


def _rope_theta(cfg: dict) -> float:
    for key in ("rope_parameters", "rope_scaling"):   # either may carry a scaling: both are read
        value = cfg.get(key) or {}
        if not isinstance(value, dict):
            raise ValueError(f"config.json {key}={value!r} is not a table; fix config.json")
        kind = value.get("rope_type", value.get("type", "default"))
        if kind != "default":
            raise ValueError(f"config.json {key} rope type {kind!r}: only plain RoPE (rope_type "
                             "'default') is supported; use a model without RoPE scaling")
    params = cfg.get("rope_parameters") or {}
    factor = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if factor not in (None, 1, 1.0):
        raise ValueError(f"config.json partial_rotary_factor={factor}: only RoPE over the whole head is "
                         "supported; use a model that rotates every head dim")
    return float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _check_attention(cfg: dict, kind: str, arch: Arch) -> None:
    """One line for what moekit's attention cannot hold."""
    if cfg.get("attention_bias"):
        raise ValueError(f"config.json attention_bias=true ({kind}): an o_proj bias is not supported; "
                         "moekit has q/k/v biases only (qwen2, qwen2_moe)")
    if cfg.get("clip_qkv") is not None:
        raise ValueError(f"config.json clip_qkv={cfg['clip_qkv']}: clipping q/k/v is not supported; use a "
                         "model trained without it (clip_qkv: null)")
    # Qwen: the window exists only with use_sliding_window (sliding_window and layer_types are
    # written either way); the others window every layer that has a sliding_window
    sliding = (bool(cfg.get("use_sliding_window")) if arch.sliding_switch
               else cfg.get("sliding_window") is not None
               or "sliding_attention" in (cfg.get("layer_types") or []))
    if sliding:
        flag = ("use_sliding_window=true" if arch.sliding_switch
                else f"sliding_window={cfg.get('sliding_window')}")
        raise ValueError(f"config.json {flag}: sliding-window attention is not supported; "
                         "switch it off if the model was trained without it")
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    if arch.qk_norm == "full" and cfg.get("head_dim") not in (None, D // H):
        raise ValueError(f"config.json head_dim={cfg['head_dim']} differs from hidden_size / "
                         f"num_attention_heads = {D // H}, which {kind} needs (its q/k norms span "
                         "hidden_size); head_dim may differ in the other model types")


def model_config_from_hf(cfg: dict) -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json dict (one line naming what does not fit,
    by config.json's keys)."""
    try:
        return _model_config_from_hf(cfg)
    except ValueError as err:
        raise _in_hf_terms(err, cfg) from None


def _hf_keys(cfg: dict) -> dict[str, str]:
    """moekit's config field -> the config.json key it is read from."""
    arch = ARCHS[cfg["model_type"]]
    experts = "num_experts" if "num_experts" in cfg or "num_local_experts" not in cfg else "num_local_experts"
    return {"vocab_size": "vocab_size", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
            "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
            "max_seq_len": "max_position_embeddings", "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta",
            "moe.d_ff": arch.expert_ff, "d_ff": "intermediate_size", "num_experts": experts,
            "top_k": "num_experts_per_tok", "jitter_eps": "router_jitter_noise",
            "shared_d_ff": "shared_expert_intermediate_size"}


def _in_hf_terms(err: ValueError, cfg: dict) -> ValueError:
    """"MoEConfig.top_k=8: exceeds num_experts=4; use top_k <= 4 ..." (moekit's names, which
    the user of a config.json never wrote) -> "config.json num_experts_per_tok=8: exceeds
    num_local_experts=4; fix config.json"."""
    text = str(err)
    match = re.match(r"(ModelConfig|MoEConfig)\.([a-z_.0-9]+)=(.*?): (.*); [^;]*$", text)
    if not match:
        return err
    owner, name, value, constraint = match.groups()
    keys = _hf_keys(cfg)
    name = keys.get("moe." + name if owner == "MoEConfig" and name == "d_ff" else name, name)
    constraint = re.sub(r"\b(" + "|".join(k for k in keys if "." not in k) + r")=",
                        lambda m: keys[m.group(1)] + "=", constraint)
    return ValueError(f"config.json {name}={value}: {constraint}; fix config.json (or use the model's own)")


def _model_config_from_hf(cfg: dict) -> ModelConfig:
    kind = cfg.get("model_type")
    if kind not in ARCHS:
        raise ValueError(f"config.json model_type={kind!r} is not supported yet; supported: {_ALL}")
    arch = ARCHS[kind]
    if cfg.get("mlp_bias"):
        raise ValueError("config.json mlp_bias=true: FFN biases are not supported; use a model without them")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={cfg.get('hidden_act')!r}: only SwiGLU (silu) is supported "
                         f"(in every one of {_ALL})")
    _check_attention(cfg, kind, arch)
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    moe, moe_ids = _moe_from_hf(cfg, arch, D)
    L = cfg["num_hidden_layers"]
    layers = ("all" if moe_ids == list(range(L)) else "alternate" if moe_ids == list(range(1, L, 2))
              else moe_ids)
    qkv_bias = {"no": False, "yes": True, "flag": bool(cfg.get("qkv_bias", True))}[arch.qkv_bias]
    return ModelConfig(vocab_size=cfg["vocab_size"], d_model=D, n_layers=L, n_heads=H,
                       n_kv_heads=cfg.get("num_key_value_heads") or H, d_ff=cfg["intermediate_size"],
                       head_dim=cfg.get("head_dim") or arch.default_head_dim or D // H,
                       qkv_bias=qkv_bias, qk_norm=arch.qk_norm,
                       max_seq_len=cfg.get("max_position_embeddings", 2048), rope_theta=_rope_theta(cfg),
                       norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                       tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), moe_layers=layers, moe=moe)


def _moe_from_hf(cfg: dict, arch: Arch, D: int) -> tuple[MoEConfig | None, list[int]]:
    """(the MoE layers' config, their indices), or (None, []) for a dense model."""
    L = cfg["num_hidden_layers"]
    # transformers 5 writes num_local_experts for qwen3_moe, earlier ones num_experts: read either
    E = (cfg.get("num_experts") or cfg.get("num_local_experts") or 0) if arch.moe else 0
    ids = list(range(L)) if E else []
    if E and arch.sparse_layers:
        step, dense = cfg.get("decoder_sparse_step", 1), cfg.get("mlp_only_layers") or []
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise ValueError(f"config.json decoder_sparse_step={step!r}: must be a positive integer "
                             "(every step-th layer is MoE); fix config.json")
        ids = [i for i in range(L) if i not in dense and (i + 1) % step == 0]
    if not ids:
        return None, []
    K = cfg["num_experts_per_tok"]
    normalize = arch.renormalises or bool(cfg.get("norm_topk_prob", False))
    shared = (cfg.get("shared_expert_intermediate_size") or 0) if arch.shared else 0
    moe = MoEConfig(d_model=D, d_ff=cfg[arch.expert_ff], num_experts=E, top_k=K, router="softmax",
                    normalize_topk=normalize or K == 1, top1_weight="one" if K == 1 and normalize else "prob",
                    jitter_eps=float(cfg.get("router_jitter_noise") or 0.0),
                    num_shared_experts=1 if shared else 0, shared_d_ff=shared or None,
                    shared_gate=bool(shared) and cfg.get(UNGATED, True) is not False)
    return moe, ids


def export_target(mcfg: ModelConfig) -> str:
    """The model_type that expresses ``mcfg`` exactly, or one line naming what none can.

    Example:
        >>> dense = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64)
        >>> export_target(ModelConfig(**dense, qkv_bias=True))
        'qwen2'
        >>> export_target(ModelConfig(**dense, moe=MoEConfig(d_model=32, d_ff=16, num_shared_experts=1)))
        'qwen2_moe'
    """
    def refuse(feature: str, fix: str, where: str = f"any Hugging Face model type ({_ALL})"):
        raise ValueError(f"export to Hugging Face: {feature} has no equivalent in {where}; {fix}")

    if mcfg.qk_norm != "none" and mcfg.qkv_bias:
        refuse(f"qkv_bias with qk_norm={mcfg.qk_norm!r}", "use one of them (Qwen3's and OLMoE's biases "
               "include o_proj)")
    if mcfg.moe is None:
        if mcfg.qk_norm == "full":
            refuse("qk_norm='full' in a dense model", "use qk_norm='head' (qwen3) or an MoE model (olmoe)")
        return {"head": "qwen3", "none": "qwen2" if mcfg.qkv_bias else "llama"}[mcfg.qk_norm]
    m = mcfg.moe
    for feature, present, fix in (
            (f"dynamic_k={m.dynamic_k!r} (a dynamic number of experts per token)", m.dynamic,
             "export a fixed top-k model (dynamic_k='none'), or keep moekit's own format (moekit export "
             "RUN)"),
            (f"router={m.router!r}", m.router != "softmax", "export a softmax top-k router"),
            ("noisy_gating", m.noisy_gating, "export a model trained without it"),
            (f"router_input={m.router_input!r} (routing by tag)", m.router_input != "token",
             "export a model that routes by token (router_input='token')"),
            (f"capacity_factor={m.capacity_factor}", m.capacity_factor is not None,
             "export a dropless model (capacity_factor=None)"),
            (f"activation={m.activation!r}", m.activation != "swiglu", "export SwiGLU experts")):
        if present:
            refuse(feature, fix)
    mixed = len(mcfg.moe_layer_ids()) != mcfg.n_layers
    normalized = m.normalize_topk if m.top_k > 1 else m.top1_weight == "one"
    if mcfg.qk_norm == "full":
        for feature, present in (("shared experts", m.num_shared_experts), ("dense layers among MoE", mixed),
                                 ("head_dim != d_model / n_heads",
                                  mcfg.head_dim * mcfg.n_heads != mcfg.d_model)):
            if present:
                refuse(f"{feature} with qk_norm='full'", "use qk_norm='head' (qwen3_moe)", "olmoe")
        return "olmoe"
    if mcfg.qk_norm == "head":
        if m.num_shared_experts:
            refuse("shared experts with qk_norm='head'", "use qk_norm='none' (qwen2_moe)", "qwen3_moe")
        return "qwen3_moe"
    return "qwen2_moe" if mixed or m.num_shared_experts or mcfg.qkv_bias or not normalized else "mixtral"


def to_hf_config(mcfg: ModelConfig, state: dict | None = None) -> dict:
    """config.json for transformers, of the model type :func:`export_target` picks. Given the
    model's ``state`` too, it refuses what only the weights show (:func:`check_router_offsets`)."""
    kind = export_target(mcfg)
    if mcfg.d_model % mcfg.n_heads:
        raise ValueError(f"export to Hugging Face: d_model={mcfg.d_model} is not a multiple of n_heads="
                         f"{mcfg.n_heads}, which transformers requires; grow d_model too (or keep "
                         "n_heads a divisor of d_model)")
    if state is not None:
        check_router_offsets(mcfg, state)
    theta = mcfg.rope_theta
    out = {"model_type": kind, "architectures": [ARCHITECTURES[kind]], "vocab_size": mcfg.vocab_size,
           "hidden_size": mcfg.d_model, "num_hidden_layers": mcfg.n_layers,
           "num_attention_heads": mcfg.n_heads, "num_key_value_heads": mcfg.n_kv_heads or mcfg.n_heads,
           "head_dim": mcfg.head_dim, "intermediate_size": mcfg.d_ff,
           "max_position_embeddings": mcfg.max_seq_len, "rms_norm_eps": mcfg.norm_eps, "rope_theta": theta,
           "rope_parameters": {"rope_type": "default", "rope_theta": theta},
           "tie_word_embeddings": mcfg.tie_embeddings, "hidden_act": "silu", "torch_dtype": "float32"}
    arch = ARCHS[kind]
    if arch.sliding_switch:
        out.update(use_sliding_window=False, sliding_window=None)
    if kind in ("llama", "qwen3", "olmoe", "qwen3_moe"):
        out["attention_bias"] = False
    if kind == "llama":
        out["mlp_bias"] = False
    m = mcfg.moe
    if m is None:
        return out
    out.update({arch.n_experts: m.num_experts, "num_experts_per_tok": m.top_k, "output_router_logits": False})
    if kind == "mixtral":
        return {**out, "intermediate_size": m.d_ff, "router_jitter_noise": m.jitter_eps,
                "sliding_window": None}
    out.update({arch.expert_ff: m.d_ff, "norm_topk_prob": m.normalize_topk if m.top_k > 1
                else m.top1_weight == "one"})
    if kind == "olmoe":
        return {**out, "clip_qkv": None}
    moe_ids = set(mcfg.moe_layer_ids())
    out.update(decoder_sparse_step=1, mlp_only_layers=[i for i in range(mcfg.n_layers) if i not in moe_ids])
    if kind == "qwen2_moe":
        out.update(qkv_bias=mcfg.qkv_bias, shared_expert_intermediate_size=m.shared_width)
        if m.num_shared_experts and not m.shared_gate:
            out[UNGATED] = False
    return out


def check_router_offsets(mcfg: ModelConfig, state: dict) -> None:
    """A softmax router's logit offset (``expert_bias_E``: -log(c) for experts grown into c
    copies, :mod:`moekit.transform.grow_experts`) has no Hugging Face counterpart. Zero, or equal
    over a layer's experts (``which="all"``: softmax is shift-invariant), it changes no
    probability and is left out exactly; otherwise one line."""
    for i in mcfg.moe_layer_ids():
        offset = state.get(f"blocks.{i}.ffn.router.expert_bias_E")
        if offset is not None and offset.numel() and bool(offset.max() != offset.min()):
            lo, hi = float(offset.min()), float(offset.max())
            raise ValueError(f"export to Hugging Face: layer {i}'s router logit offsets differ between "
                             f"experts ({lo:.3g} to {hi:.3g}: experts grown with which='most_loaded', or "
                             "merged "
                             "in groups of unequal size), which no Hugging Face router holds; export before "
                             "growing or merging, grow with which='all', or prune instead of merging")


_ATTN = (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj"))
_FFN = (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj"))
STACKED = ("w_gate_EDF", "w_up_EDF", "w_down_EFD")   # moekit's experts, in the order of Arch.experts


def key_map(mcfg: ModelConfig, kind: str) -> dict[str, str]:
    """moekit name -> Hugging Face name (on disk), for every tensor but the stacked experts."""
    arch = ARCHS[kind]
    keys = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not mcfg.tie_embeddings:
        keys["lm_head.weight"] = "lm_head.weight"
    moe_ids = set(mcfg.moe_layer_ids())
    for i in range(mcfg.n_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        keys[ours + "attn_norm.weight"] = theirs + "input_layernorm.weight"
        keys[ours + "ffn_norm.weight"] = theirs + "post_attention_layernorm.weight"
        for a, b in _ATTN:
            keys[f"{ours}attn.{a}.weight"] = f"{theirs}self_attn.{b}.weight"
        for a, b in _ATTN[:3] if mcfg.qkv_bias else ():
            keys[f"{ours}attn.{a}.bias"] = f"{theirs}self_attn.{b}.bias"
        for n in ("q_norm", "k_norm") if mcfg.qk_norm != "none" else ():
            keys[f"{ours}attn.{n}.weight"] = f"{theirs}self_attn.{n}.weight"
        if i not in moe_ids:
            for a, b in _FFN:
                keys[f"{ours}ffn.{a}.weight"] = f"{theirs}mlp.{b}.weight"
            continue
        keys[ours + "ffn.router.weight_ED"] = f"{theirs}{arch.moe}.gate.weight"
        for a, b in _FFN if mcfg.moe.num_shared_experts else ():
            keys[f"{ours}ffn.shared.{a}.weight"] = f"{theirs}mlp.shared_expert.{b}.weight"
        if mcfg.moe.shared_gate:
            keys[ours + "ffn.shared_gate.weight"] = theirs + "mlp.shared_expert_gate.weight"
    return keys


def expert_keys(kind: str, layer: int, num_experts: int) -> dict[str, list[str]]:
    """moekit's stacked expert tensor (under blocks.{layer}.ffn.experts.) -> the per-expert
    Hugging Face Linear weights ([F, D] gate/up, [D, F] down: a transpose each)."""
    arch = ARCHS[kind]
    return {ours: [f"model.layers.{layer}.{arch.moe}.experts.{e}.{theirs}.weight" for e in range(num_experts)]
            for ours, theirs in zip(STACKED, arch.experts)}


def hf_only(mcfg: ModelConfig, kind: str) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Hugging Face tensors moekit holds no counterpart of: name -> (shape, must be zero).
    Qwen2-MoE without shared experts: a zero-width shared expert (its gate multiplies zero);
    with an ungated one: the zero gate (see :data:`UNGATED`)."""
    if kind != "qwen2_moe" or mcfg.moe is None or mcfg.moe.shared_gate:
        return {}
    D, out = mcfg.d_model, {}
    for i in mcfg.moe_layer_ids():
        theirs = f"model.layers.{i}.mlp."
        out[theirs + "shared_expert_gate.weight"] = ((1, D), bool(mcfg.moe.num_shared_experts))
        if not mcfg.moe.num_shared_experts:
            out.update({f"{theirs}shared_expert.{b}.weight": ((D, 0) if b == "down_proj" else (0, D), False)
                        for _, b in _FFN})
    return out


def scaled(mcfg: ModelConfig, kind: str) -> dict[str, float]:
    """moekit name -> factor such that the Hugging Face tensor is factor * moekit's: an ungated
    shared expert's down_proj is doubled against its zero gate's sigmoid(0) = 0.5 (exact)."""
    m = mcfg.moe
    if kind != "qwen2_moe" or m is None or not m.num_shared_experts or m.shared_gate:
        return {}
    return {f"blocks.{i}.ffn.shared.w_down.weight": 2.0 for i in mcfg.moe_layer_ids()}
