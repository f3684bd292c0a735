"""ModelConfig: the decoder-only LM, dense or MoE, checked when built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from moekit.checks import bad, check_bool, check_choice, check_int, check_real, is_int
from moekit.moe.config import MoEConfig

_OWN = "ModelConfig"
QK_NORMS = ("none", "head", "full")


@dataclass
class ModelConfig:
    """A decoder-only LM. ``moe`` configures the MoE layers (its d_model is the model's);
    ``moe = None`` (``moe = false`` in TOML) is the one switch for a dense model.
    ``moe_layers`` says which layers of an MoE model get one: "all", "alternate" (GShard:
    every other layer, starting with the second) or an explicit list of layer indices.
    ``vocab_size`` is the tokenizer's: a run trained on a corpus sets it from the BPE it trains.

    Attention options (the Hugging Face architectures moekit imports need them):
    ``qkv_bias`` adds biases to the q, k and v projections (Qwen2); ``qk_norm`` applies an
    RMSNorm to queries and keys before RoPE: "head" per head over head_dim (Qwen3), "full"
    over the whole q or k projection (OLMoE), "none" not at all; ``head_dim`` is the width of
    a head, which may differ from d_model / n_heads (Qwen3). ``head_dim=None`` means
    d_model // n_heads and is resolved when the config is built, so ``cfg.head_dim`` is always
    an int (pass ``head_dim=None`` again when replacing d_model or n_heads).

    ``dropout`` (training only, 0 = none and no extra op) drops the token embeddings and the
    attention and FFN/MoE outputs before their residual adds, the places T5 and Switch put
    it; Switch fine-tunes best with 0.1 here and a separate 0.4 inside the experts
    (``moe.expert_dropout``). It holds no weights: exports carry it, evaluation ignores it.

    Example:
        >>> cfg = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, d_ff=128,
        ...                   moe=MoEConfig(d_model=64, d_ff=64, num_experts=4, top_k=2))
        >>> cfg.moe_layer_ids()
        [0, 1]
    """

    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None       # None = n_heads (no grouped-query attention)
    head_dim: int | None = None         # None = d_model // n_heads (resolved in __post_init__)
    qkv_bias: bool = False              # biases on q, k, v (Qwen2)
    qk_norm: str = "none"               # "none" | "head" (Qwen3) | "full" (OLMoE): RMSNorm on q, k
    d_ff: int = 1024                    # width of the dense FFN layers
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0                # on the embeddings and each attention and FFN/MoE output
                                        # before its residual add, training only (Switch
                                        # fine-tuning: 0.1; inside experts: moe.expert_dropout)
    moe_layers: str | list[int] = "all"
    moe: MoEConfig | None = field(default=None)
    # weight-only quantization (moekit compress --method quantize): {"bits": 8 | 4, "group_size":
    # int, "attention": bool}; None = full-precision weights. Set by quantize, not by a recipe.
    quant: dict | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            check_int(_OWN, name, getattr(self, name))
        check_real(_OWN, "rope_theta", self.rope_theta, 0, low_open=True, fix="use e.g. 10000.0")
        check_real(_OWN, "norm_eps", self.norm_eps, 0, low_open=True, fix="use e.g. 1e-5")
        check_real(_OWN, "dropout", self.dropout, 0, 1, high_open=True,
                   fix="use 0 to disable or e.g. 0.1 for fine-tuning (Switch)")
        check_bool(_OWN, "tie_embeddings", self.tie_embeddings)
        check_bool(_OWN, "qkv_bias", self.qkv_bias)
        check_choice(_OWN, "qk_norm", self.qk_norm, QK_NORMS)
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise bad(_OWN, "n_heads", self.n_heads, f"must divide d_model={self.d_model}",
                          "pick a divisor of d_model, or set head_dim")
            if (self.d_model // self.n_heads) % 2:
                raise bad(_OWN, "n_heads", self.n_heads, f"head dim {self.d_model // self.n_heads} must be "
                          "even for RoPE", "pick n_heads so that d_model / n_heads is even")
            self.head_dim = self.d_model // self.n_heads
        elif not is_int(self.head_dim) or self.head_dim < 2 or self.head_dim % 2:
            raise bad(_OWN, "head_dim", self.head_dim, "must be an even integer >= 2 (RoPE rotates pairs)",
                      "use an even head width, or leave it unset for d_model // n_heads")
        kv = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        if not is_int(kv) or kv <= 0 or self.n_heads % kv:
            raise bad(_OWN, "n_kv_heads", self.n_kv_heads, f"must divide n_heads={self.n_heads}",
                      "use a divisor of n_heads, or leave it unset (= n_heads)")
        if isinstance(self.moe_layers, str):
            if self.moe_layers not in ("all", "alternate"):
                raise bad(_OWN, "moe_layers", self.moe_layers, "is not 'all', 'alternate' or a list",
                          "use one of those or a list of layer indices (a dense model: moe = false)")
        elif (not isinstance(self.moe_layers, list)
              or any(not is_int(i) or not 0 <= i < self.n_layers for i in self.moe_layers)):
            raise bad(_OWN, "moe_layers", self.moe_layers, f"indices must be in [0, {self.n_layers})",
                      "list existing layer indices")
        elif self.moe is not None and (not self.moe_layers
                                       or len(set(self.moe_layers)) != len(self.moe_layers)):
            raise bad(_OWN, "moe_layers", self.moe_layers, "must list distinct layer indices, at least one",
                      "list each MoE layer once (a dense model: moe = false)")
        if self.quant is not None:
            check_quant(self.quant)
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            raise bad(_OWN, "moe", self.moe, "must be an MoEConfig or None", "pass MoEConfig(...) or None")
        if self.moe is not None and self.moe.d_model != self.d_model:
            raise bad(_OWN, "moe.d_model", self.moe.d_model, f"differs from d_model={self.d_model}",
                      "set them equal")

    @property
    def dense(self) -> bool:
        return self.moe is None

    @property
    def routes_by_tag(self) -> bool:
        """True when the MoE routers read each sequence's tag (``moe.router_input`` != "token"):
        the model's forward then needs ``tags``."""
        return self.moe is not None and self.moe.router_input != "token"

    def moe_layer_ids(self) -> list[int]:
        """Indices of the MoE layers (none for a dense model)."""
        if self.moe is None:
            return []
        if self.moe_layers == "all":
            return list(range(self.n_layers))
        if self.moe_layers == "alternate":
            return list(range(1, self.n_layers, 2))
        return sorted(set(self.moe_layers))

    def dense_baseline(self) -> ModelConfig:
        """The dense model with the same active parameters per token: every MoE layer becomes
        a dense FFN of width k * d_ff_expert + the shared FFN's width (the FLOPs a token sees;
        k = ``MoEConfig.nominal_k``: top_k, or a dynamic k's target, rounded); router and
        shared-gate parameters are not counted (E * D and D per layer, small)."""
        if self.moe is None:
            return self
        m = self.moe
        active_ff = round(m.d_ff * m.nominal_k) + m.shared_width
        if len(self.moe_layer_ids()) == self.n_layers:
            return dataclasses.replace(self, d_ff=active_ff, moe=None, moe_layers="all")
        if active_ff != self.d_ff:
            raise ValueError(f"dense_baseline: MoE layers are active-width {active_ff} but dense layers "
                             f"are d_ff={self.d_ff}; one dense width cannot match both, set d_ff={active_ff}")
        return dataclasses.replace(self, moe=None, moe_layers="all")


QUANT_BITS = (8, 4)


def check_quant(spec) -> None:
    """``ModelConfig.quant``: {"bits": 8 | 4, "group_size": int >= 2 (even for 4 bits), "attention": bool}."""
    if not isinstance(spec, dict) or set(spec) != {"bits", "group_size", "attention"}:
        raise bad(_OWN, "quant", spec, "must be a dict with exactly bits, group_size and attention",
                  "let moekit compress --method quantize write it, or set quant = None")
    check_choice(_OWN, "quant.bits", spec["bits"], QUANT_BITS)
    check_int(_OWN, "quant.group_size", spec["group_size"])
    if spec["group_size"] < 2 or spec["group_size"] % 2:
        raise bad(_OWN, "quant.group_size", spec["group_size"], "must be an even integer >= 2",
                  "use e.g. 32, 64 or 128")
    check_bool(_OWN, "quant.attention", spec["attention"])
