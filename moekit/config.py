"""Typed, validated configuration.

Every field is checked where it is defined (``__post_init__``): a bad value raises
``ValueError`` naming the field, the value, the constraint and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROUTERS = ("softmax", "sigmoid", "expert_choice")
DROP_POLICIES = ("position", "probability")
ACTIVATIONS = ("swiglu", "gelu")
BACKENDS = ("auto", "segment_mm", "grouped_mm", "reference")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _bad(field: str, value, constraint: str, fix: str) -> ValueError:
    return ValueError(f"MoEConfig.{field}={value!r}: {constraint}; {fix}")


def as_dtype(value, field_: str = "dtype") -> torch.dtype:
    """'bfloat16' | torch.bfloat16 -> torch.bfloat16 (configs come from TOML as strings)."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value in _DTYPES:
        return _DTYPES[value]
    raise ValueError(f"MoEConfig.{field_}={value!r}: is not one of {sorted(_DTYPES)}; pick one of those")


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class MoEConfig:
    """One MoE layer: router, experts, dispatch and balancing.

    Example:
        >>> cfg = MoEConfig(d_model=512, d_ff=1024, num_experts=8, top_k=2)
        >>> cfg.capacity_factor is None   # dropless by default
        True
    """

    d_model: int
    d_ff: int
    num_experts: int = 8
    top_k: int = 2

    # routing
    router: str = "softmax"            # "softmax" | "sigmoid" | "expert_choice"
    normalize_topk: bool = True        # renormalize the k chosen weights to sum to 1 (k > 1;
                                       # k = 1 keeps the Switch weight, the probability)
    noisy_gating: bool = False         # learned noise std (Shazeer et al. 2017), training only
    jitter_eps: float = 0.0            # multiplicative router-input jitter (Switch), training only
    router_dtype: torch.dtype | str = torch.float32
    # aux-loss-free balancing (DeepSeek-V3): a per-expert selection bias, sigmoid router only
    aux_loss_free: bool = False
    bias_update_rate: float = 1e-3
    # load-balancing statistics in a parallel run: "local" = each rank's own tokens (what one
    # process computes on that rank's batch); "global" = the expert fractions of all ranks'
    # tokens (one all-reduce per layer), so the loss equals one process's on the global batch
    aux_loss_scope: str = "local"

    # capacity: None = dropless (every assignment is computed)
    capacity_factor: float | None = None
    drop_policy: str = "position"      # "position" | "probability"

    # experts
    num_shared_experts: int = 0        # always-on experts (DeepSeek-MoE), each of width d_ff
    activation: str = "swiglu"         # "swiglu" | "gelu"
    backend: str = "auto"              # "auto" | "segment_mm" | "grouped_mm" | "reference"
    dtype: torch.dtype | str = torch.float32   # parameter dtype

    def __post_init__(self) -> None:
        self.router_dtype = as_dtype(self.router_dtype, "router_dtype")
        self.dtype = as_dtype(self.dtype, "dtype")
        for name in ("d_model", "d_ff", "num_experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise _bad(name, value, "must be a positive integer", f"set {name} to an integer >= 1")
        if self.top_k > self.num_experts:
            raise _bad("top_k", self.top_k, f"exceeds num_experts={self.num_experts}",
                       f"use top_k <= {self.num_experts} or add experts")
        if self.router not in ROUTERS:
            raise _bad("router", self.router, f"is not one of {ROUTERS}", "pick one of those names")
        if self.drop_policy not in DROP_POLICIES:
            raise _bad("drop_policy", self.drop_policy, f"is not one of {DROP_POLICIES}",
                       "pick one of those names")
        if self.aux_loss_scope not in ("local", "global"):
            raise _bad("aux_loss_scope", self.aux_loss_scope, "is not 'local' or 'global'",
                       "pick one of those")
        if self.activation not in ACTIVATIONS:
            raise _bad("activation", self.activation, f"is not one of {ACTIVATIONS}",
                       "pick one of those names")
        if self.backend not in BACKENDS:
            raise _bad("backend", self.backend, f"is not one of {BACKENDS}", "pick one of those names")
        cf = self.capacity_factor
        if cf is not None and not (_real(cf) and cf > 0):
            raise _bad("capacity_factor", cf, "must be a finite number > 0",
                       "use a value such as 1.25, or None for dropless routing")
        if not (_real(self.jitter_eps) and 0 <= self.jitter_eps < 1):
            raise _bad("jitter_eps", self.jitter_eps, "must be a number in [0, 1)",
                       "use 0 to disable or e.g. 0.01")
        shared = self.num_shared_experts
        if not isinstance(shared, int) or isinstance(shared, bool) or shared < 0:
            raise _bad("num_shared_experts", shared, "must be an integer >= 0", "use 0 for none")
        if not (_real(self.bias_update_rate) and self.bias_update_rate >= 0):
            raise _bad("bias_update_rate", self.bias_update_rate, "must be a finite number >= 0",
                       "use e.g. 1e-3")
        if self.noisy_gating and self.router == "expert_choice":
            raise _bad("noisy_gating", True, "is a token-choice option; expert choice has no noise",
                       "set noisy_gating=False or use router='softmax'")
        if self.aux_loss_free and self.router != "sigmoid":
            raise _bad("aux_loss_free", True, f"needs router='sigmoid', got router={self.router!r}",
                       "set router='sigmoid' or aux_loss_free=False")
        if self.router_dtype != torch.float32:
            raise _bad("router_dtype", self.router_dtype, "router math is float32 (ST-MoE)",
                       "use torch.float32")
        if self.dtype in (torch.bfloat16, torch.float16):
            # torch._grouped_mm needs 16-byte aligned row strides: 8 elements of 2 bytes.
            for name in ("d_model", "d_ff"):
                value = getattr(self, name)
                if value % 8:
                    raise _bad(name, value, f"must be a multiple of 8 for {self.dtype} grouped GEMM",
                               f"use {value + (-value) % 8} or dtype=torch.float32")

    def with_granularity(self, m: int) -> MoEConfig:
        """Fine-grained experts (DeepSeek-MoE): split each expert into ``m`` experts of width
        ``d_ff // m`` and route to ``m * top_k`` of them, keeping parameters and active FLOPs.

        Example:
            >>> MoEConfig(d_model=64, d_ff=256, num_experts=8, top_k=2).with_granularity(4).num_experts
            32
        """
        if not isinstance(m, int) or m < 1 or self.d_ff % m:
            raise ValueError(f"granularity m={m!r}: must be a positive integer dividing d_ff={self.d_ff}; "
                             f"pick a divisor of {self.d_ff}")
        return dataclasses.replace(self, d_ff=self.d_ff // m, num_experts=self.num_experts * m,
                                   top_k=self.top_k * m)


def _bad_model(field_: str, value, constraint: str, fix: str) -> ValueError:
    return ValueError(f"ModelConfig.{field_}={value!r}: {constraint}; {fix}")


@dataclass
class ModelConfig:
    """A decoder-only LM. ``moe`` configures the MoE layers (its d_model is the model's);
    ``moe_layers`` says which layers get one: "all", "alternate" (GShard: every other
    layer, starting with the second), "none", or an explicit list of layer indices.
    Without ``moe`` the model is dense.

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
    d_ff: int = 1024                    # width of the dense FFN layers
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    moe_layers: str | list[int] = "all"
    moe: MoEConfig | None = field(default=None)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise _bad_model(name, value, "must be a positive integer", f"set {name} to an integer >= 1")
        if self.d_model % self.n_heads:
            raise _bad_model("n_heads", self.n_heads, f"must divide d_model={self.d_model}",
                       "pick a divisor of d_model")
        if (self.d_model // self.n_heads) % 2:
            raise _bad_model("n_heads", self.n_heads, f"head dim {self.d_model // self.n_heads} must be even "
                       "for RoPE", "pick n_heads so that d_model / n_heads is even")
        kv = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        if not isinstance(kv, int) or kv <= 0 or self.n_heads % kv:
            raise _bad_model("n_kv_heads", self.n_kv_heads, f"must divide n_heads={self.n_heads}",
                       "use a divisor of n_heads, or None")
        if isinstance(self.moe_layers, str):
            if self.moe_layers not in ("all", "alternate", "none"):
                raise _bad_model("moe_layers", self.moe_layers, "is not 'all', 'alternate', 'none' or a list",
                           "use one of those or a list of layer indices")
        elif any(not isinstance(i, int) or not 0 <= i < self.n_layers for i in self.moe_layers):
            raise _bad_model("moe_layers", self.moe_layers, f"indices must be in [0, {self.n_layers})",
                       "list existing layer indices")
        if self.moe is not None and self.moe.d_model != self.d_model:
            raise _bad_model("moe.d_model", self.moe.d_model, f"differs from d_model={self.d_model}",
                       "set them equal")

    def moe_layer_ids(self) -> list[int]:
        """Indices of the MoE layers (none without an ``moe`` config: a dense model)."""
        if self.moe is None:
            return []
        if self.moe_layers == "all":
            ids = list(range(self.n_layers))
        elif self.moe_layers == "alternate":
            ids = list(range(1, self.n_layers, 2))
        elif self.moe_layers == "none":
            ids = []
        else:
            ids = sorted(set(self.moe_layers))
        return ids

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def dense_baseline(self) -> ModelConfig:
        """The dense model with the same active parameters per token: every MoE layer becomes
        a dense FFN of width top_k * d_ff_expert + shared experts' width (the FLOPs a token
        sees); router parameters are not counted (E * D per layer, small)."""
        if self.moe is None:
            return self
        m = self.moe
        active_ff = m.d_ff * (m.top_k + m.num_shared_experts)
        if len(self.moe_layer_ids()) == self.n_layers:
            return dataclasses.replace(self, d_ff=active_ff, moe=None, moe_layers="none")
        if active_ff != self.d_ff:
            raise ValueError(f"dense_baseline: MoE layers are active-width {active_ff} but dense layers "
                             f"are d_ff={self.d_ff}; one dense width cannot match both, set d_ff={active_ff}")
        return dataclasses.replace(self, moe=None, moe_layers="none")


def default_moe(d_model: int) -> MoEConfig:
    """The recipes' MoE: 8 experts of width d_model, top-2 (fine-grained relative to a
    4 x d_model dense FFN: active FFN width 2 * d_model)."""
    return MoEConfig(d_model=d_model, d_ff=d_model, num_experts=8, top_k=2)


@dataclass
class DataConfig:
    corpus: str = "parlspeech"        # a catalog name (moekit data list) or a path to your text
    vocab_size: int = 8192            # BPE vocabulary trained on the training split
    seq_len: int = 128
    val_fraction: float = 0.05
    max_docs: int | None = None       # use only the first N documents (quick runs, tests)

    def __post_init__(self) -> None:
        if self.vocab_size < 257:
            raise ValueError(f"DataConfig.vocab_size={self.vocab_size}: byte-level BPE needs >= 257; "
                             "use e.g. 8192")
        if self.seq_len < 2:
            raise ValueError(f"DataConfig.seq_len={self.seq_len}: must be >= 2; use e.g. 128")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"DataConfig.val_fraction={self.val_fraction}: must be in (0, 1); use e.g. 0.05")


@dataclass
class TrainConfig:
    batch_size: int = 16               # sequences per micro-batch
    grad_accum: int = 1                # micro-batches per optimizer step
    max_steps: int = 750
    lr: float = 3e-3
    min_lr_ratio: float = 0.1          # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 40
    weight_decay: float = 0.1          # not on norms, biases, embeddings' gains or routers
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01        # x load-balancing loss (k at perfect balance)
    z_loss_coef: float = 1e-3          # x router z-loss
    eval_every: int = 100
    eval_batches: int = 16
    save_every: int = 200
    log_every: int = 10
    seed: int = 0
    precision: str = "auto"            # "bf16" autocast, "fp32", or "auto": bf16 on CUDA, fp32 on CPU
                                       # (tiny recipe on the 2-core CPU: 5,600 tok/s fp32, 4,100 bf16)
    device: str = "auto"               # "auto" | "cpu" | "cuda"
    compile: bool = False
    activation_checkpointing: bool = False
    telemetry: bool = True             # per-layer routing statistics every log_every steps

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches", "save_every",
                     "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name}={value!r}: must be an integer >= 1; fix the value")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr={self.lr!r}: must be > 0; use e.g. 3e-3")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"TrainConfig.precision={self.precision!r}: is not 'auto', 'bf16' or 'fp32'; "
                             "pick one")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"TrainConfig.device={self.device!r}: is not 'auto', 'cpu' or 'cuda'; pick one")


@dataclass
class ParallelConfig:
    """dp x ep ranks (checked against the world size when the mesh is built).

    ``sharding``: "none" = DDP for the non-expert parameters; "fsdp" = FSDP2 ``fully_shard``
    of the non-expert parameters over all ranks and of the experts along "dp". Expert
    parameters are split by ep; their gradients are reduced over the data-parallel ranks
    that hold the same experts only."""

    dp: int = 1
    ep: int = 1
    sharding: str = "none"

    def __post_init__(self) -> None:
        for name in ("dp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ParallelConfig.{name}={value!r}: must be an integer >= 1; fix the value")
        if self.sharding not in ("none", "fsdp"):
            raise ValueError(f"ParallelConfig.sharding={self.sharding!r}: is not 'none' or 'fsdp'; pick one")

    @property
    def world_size(self) -> int:
        return self.dp * self.ep


@dataclass
class RunConfig:
    """Everything a training run needs; loaded from TOML, overridden with ``--set a.b=c``.

    Example:
        >>> cfg = RunConfig.from_dict({"train": {"max_steps": 5}, "model": {"moe": {"num_experts": 4}}})
        >>> cfg.train.max_steps, cfg.model.moe.num_experts, cfg.model.moe.d_model == cfg.model.d_model
        (5, 4, True)
    """

    model: ModelConfig = field(default_factory=lambda: ModelConfig(moe=default_moe(ModelConfig.d_model)))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        check_layout(self.parallel, self.model)

    @classmethod
    def from_dict(cls, raw: dict) -> RunConfig:
        return _build(cls, raw, "")

    @classmethod
    def from_toml(cls, path: str | Path, overrides: list[str] = ()) -> RunConfig:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {str(path)!r} not found; give an existing .toml "
                                    "(see configs/)")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {str(path)!r} is not valid TOML: {err}; fix the syntax") from None
        return cls.from_dict(apply_overrides(raw, overrides))

    def to_dict(self) -> dict:
        def plain(v):
            if isinstance(v, torch.dtype):
                return str(v).replace("torch.", "")
            if dataclasses.is_dataclass(v):
                return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
            if isinstance(v, list):
                return [plain(x) for x in v]
            return v
        return plain(self)


def check_layout(parallel: ParallelConfig, model: ModelConfig) -> None:
    """What a layout needs from the model, checked before any data is prepared."""
    moe = model.moe
    if parallel.ep > 1:
        if moe is None:
            raise ValueError(f"parallel.ep={parallel.ep} needs an MoE model (model.moe is unset); "
                             "use parallel.dp for a dense model")
        if moe.num_experts % parallel.ep:
            raise ValueError(f"parallel.ep={parallel.ep} does not divide model.moe.num_experts="
                             f"{moe.num_experts}; pick ep among the divisors of the number of experts")
        if moe.router == "expert_choice":
            raise ValueError("parallel.ep > 1 with model.moe.router='expert_choice': expert choice needs "
                             "every token on every rank; use a token-choice router or ep=1")
        if parallel.sharding == "fsdp" and (model.d_model % parallel.dp or moe.d_ff % parallel.dp):
            raise ValueError(f"parallel.dp={parallel.dp} with sharding='fsdp' and ep={parallel.ep} shards "
                             f"the experts' d_model={model.d_model} and d_ff={moe.d_ff} evenly; make both "
                             "multiples of dp or use sharding='none'")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``["train.max_steps=200", "model.moe.num_experts=16"]`` onto a nested dict; values are
    parsed as TOML (numbers, booleans, strings, lists), else kept as strings."""
    raw = json.loads(json.dumps(raw))   # a deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. train.max_steps=200")
        key, text = item.split("=", 1)
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {p!r} is a value, not a section")
        node[parts[-1]] = value
    return raw


def _build(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or '(top)'} must be a table, got {raw!r}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ValueError(f"unknown config key {prefix + unknown[0]!r}; known keys in "
                         f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in raw.items():
        sub = {RunConfig: {"model": ModelConfig, "data": DataConfig, "train": TrainConfig,
                           "parallel": ParallelConfig},
               ModelConfig: {"moe": MoEConfig}}.get(cls, {}).get(key)
        if sub is MoEConfig:
            if value is None or value is False:
                kwargs[key] = None
                continue
            defaults = dataclasses.asdict(default_moe(raw.get("d_model", names["d_model"].default)))
            value = {k: defaults[k] for k in ("d_model", "d_ff", "num_experts", "top_k")} | value
        kwargs[key] = _build(sub, value, f"{prefix}{key}.") if sub else value
    if cls is ModelConfig and "moe" not in raw:   # the recipe default is an MoE model
        kwargs["moe"] = default_moe(raw.get("d_model", names["d_model"].default))
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"config section {prefix.rstrip('.') or '(top)'}: {err}") from None
