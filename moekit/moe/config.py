"""MoEConfig: one MoE layer's router, experts, dispatch and balancing, checked when built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from moekit.checks import bad, check_bool, check_choice, check_int, check_real

ROUTERS = ("softmax", "sigmoid", "expert_choice")
DROP_POLICIES = ("position", "probability")
ACTIVATIONS = ("swiglu", "gelu")
BACKENDS = ("auto", "segment_mm", "padded_mm", "grouped_mm", "reference")
SCOPES = ("local", "global")
TOP1_WEIGHTS = ("prob", "one")
ROUTER_INPUTS = ("token", "token+tag", "tag")
DYNAMIC_K = ("none", "top_p", "null", "relu")
# the compute-budget controller's step when MoEConfig.budget_rate is None (docs/dynamic_routing.md):
# top_p moves p, null moves the null experts' logit bias, relu multiplies the L1 coefficient by 1 + rate
BUDGET_RATES = {"top_p": 0.005, "null": 0.05, "relu": 0.2}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def as_dtype(value, owner: str = "MoEConfig", name: str = "dtype") -> torch.dtype:
    """'bfloat16' | torch.bfloat16 -> torch.bfloat16 (configs come from TOML as strings)."""
    if isinstance(value, torch.dtype) and value in _DTYPES.values():
        return value
    if isinstance(value, str) and value in _DTYPES:
        return _DTYPES[value]
    raise bad(owner, name, value, f"is not one of {sorted(_DTYPES)}", "pick one of those")


@dataclass
class MoEConfig:
    """One MoE layer: router, experts, dispatch and balancing. Router math is always float32
    (ST-MoE), so it has no dtype of its own.

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
    top1_weight: str = "prob"          # top_k = 1 only: "prob" (Switch) or "one": p / stop_grad(p),
                                       # 1 in value with p's gradient (a top-1 upcycle keeps the
                                       # dense function and its router still learns)
    noisy_gating: bool = False         # learned noise std (Shazeer et al. 2017), training only
    jitter_eps: float = 0.0            # multiplicative router-input jitter (Switch), training only
    router_init_std: float | None = None   # N(0, std) router weights; None = d_model ** -0.5
    # task-level routing (Kudugunta et al. 2021): what the router reads. "token": the token's
    # hidden state; "token+tag": the hidden state plus a learned embedding of the sequence's tag
    # (its language or source; zero at init); "tag": the tag alone, a learned [tags, E] logit
    # table, so every token of a tag goes to the same experts (`moekit extract` keeps just those)
    router_input: str = "token"
    route_tags: list[str] | None = None    # the tag names the router knows; the trainer fills it
                                           # from the data's tags (config.json records it)
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
    shared_d_ff: int | None = None     # total width of the shared FFN; None = d_ff * num_shared_experts
    shared_gate: bool = False          # Qwen2-MoE: the shared output times sigmoid(x . w), w [1, D]
    activation: str = "swiglu"         # "swiglu" | "gelu"
    expert_dropout: float = 0.0        # dropout on each expert's hidden activation, training only;
                                       # Switch fine-tunes best with 0.4 here (0.1 elsewhere:
                                       # ModelConfig.dropout); 0 = pretraining, no extra op
    backend: str = "auto"              # "auto" | "segment_mm" | "padded_mm" | "grouped_mm" | "reference"
    dtype: torch.dtype | str = torch.float32   # parameter dtype

    # a dynamic number of experts per token (docs/dynamic_routing.md). "none": top_k each.
    # "top_p" (Huang et al. 2024): experts in order of probability until their mass reaches
    # top_p, between min_k and max_k. "null" (AdaMoE, Zeng et al. 2024): top_k of the experts
    # and num_null_experts zero-compute ones. "relu" (ReMoE, Wang et al. 2024): gates
    # relu(logits), every positive gate up to max_k, sparsity from an L1 penalty.
    dynamic_k: str = "none"            # "none" | "top_p" | "null" | "relu"
    top_p: float = 0.5                 # top_p: the probability mass a token's experts reach
    min_k: int | None = None           # top_p: fewest experts a token gets (None: 1); relu: 0
    max_k: int | None = None           # top_p / relu: most experts a token gets (None: num_experts)
    num_null_experts: int = 0          # null: how many zero-compute experts the router may pick
    relu_l1: float = 1e-3              # relu: the L1 coefficient to start from (fixed without target_k)
    # the compute budget: the mean number of real experts per token a controller holds, moving
    # p (top_p), the null experts' logit bias (null) or the L1 coefficient (relu) after each
    # optimizer step, outside the backward pass; None: no controller
    target_k: float | None = None
    budget_rate: float | None = None   # the controller's step; None: BUDGET_RATES[dynamic_k]

    def __post_init__(self) -> None:
        own = "MoEConfig"
        self.dtype = as_dtype(self.dtype)
        for name in ("d_model", "d_ff", "num_experts", "top_k"):
            check_int(own, name, getattr(self, name))
        check_int(own, "num_shared_experts", self.num_shared_experts, 0, "use 0 for none")
        if self.top_k > self.num_experts:
            raise bad(own, "top_k", self.top_k, f"exceeds num_experts={self.num_experts}",
                      f"use top_k <= {self.num_experts} or add experts")
        for name, choices in (("router", ROUTERS), ("drop_policy", DROP_POLICIES),
                              ("aux_loss_scope", SCOPES), ("activation", ACTIVATIONS),
                              ("backend", BACKENDS), ("top1_weight", TOP1_WEIGHTS),
                              ("router_input", ROUTER_INPUTS)):
            check_choice(own, name, getattr(self, name), choices)
        for name in ("normalize_topk", "noisy_gating", "aux_loss_free", "shared_gate"):
            check_bool(own, name, getattr(self, name))
        if self.shared_d_ff is not None:
            check_int(own, "shared_d_ff", self.shared_d_ff, 1, "use a positive width, or leave it unset for "
                      "d_ff * num_shared_experts")
        for name in ("shared_d_ff", "shared_gate"):
            if getattr(self, name) not in (None, False) and not self.num_shared_experts:
                raise bad(own, name, getattr(self, name), "configures the shared experts, but "
                          "num_shared_experts=0", f"set num_shared_experts >= 1 or leave {name} unset")
        if self.capacity_factor is not None:
            check_real(own, "capacity_factor", self.capacity_factor, 0, low_open=True,
                       fix="use a value such as 1.25, or leave it unset for dropless routing")
        check_real(own, "jitter_eps", self.jitter_eps, 0, 1, high_open=True,
                   fix="use 0 to disable or e.g. 0.01")
        check_real(own, "expert_dropout", self.expert_dropout, 0, 1, high_open=True,
                   fix="use 0 to disable or e.g. 0.4 for fine-tuning (Switch)")
        check_real(own, "bias_update_rate", self.bias_update_rate, 0, fix="use e.g. 1e-3")
        if self.router_init_std is not None:
            check_real(own, "router_init_std", self.router_init_std, 0, low_open=True,
                       fix="use e.g. 0.02, or leave it unset for d_model ** -0.5")
        if self.noisy_gating and self.router == "expert_choice":
            raise bad(own, "noisy_gating", True, "is a token-choice option; expert choice has no noise",
                      "set noisy_gating=False or use router='softmax'")
        if self.top1_weight == "one" and (self.top_k != 1 or self.router == "expert_choice"):
            raise bad(own, "top1_weight", "one", f"applies to token-choice top_k=1, got top_k={self.top_k}, "
                      f"router={self.router!r}", "set top1_weight='prob' (k > 1 renormalises instead)")
        if self.aux_loss_free and self.router != "sigmoid":
            raise bad(own, "aux_loss_free", True, f"needs router='sigmoid', got router={self.router!r}",
                      "set router='sigmoid' or aux_loss_free=False")
        self._check_tags()
        self._check_dynamic()
        if self.dtype in (torch.bfloat16, torch.float16):
            # torch._grouped_mm needs 16-byte aligned row strides: 8 elements of 2 bytes.
            for name in ("d_model", "d_ff"):
                value = getattr(self, name)
                if value % 8:
                    raise bad(own, name, value, f"must be a multiple of 8 for {self.dtype} grouped GEMM",
                              f"use {value + (-value) % 8} or dtype=torch.float32")

    def _check_tags(self) -> None:
        own = "MoEConfig"
        if self.router_input != "token" and self.router == "expert_choice":
            raise bad(own, "router_input", self.router_input, "routes by tag, which needs token choice, got "
                      "router='expert_choice'", "use router='softmax' or 'sigmoid', or router_input='token'")
        tags = self.route_tags
        if tags is None:
            return
        if (not isinstance(tags, (list, tuple)) or not tags
                or any(not isinstance(t, str) or not t for t in tags)):
            raise bad(own, "route_tags", tags, "must be a non-empty list of tag names",
                      "give the data's tags, e.g. ['de', 'en'], or leave it unset (the trainer fills it)")
        if len(set(tags)) != len(tags):
            raise bad(own, "route_tags", tags, "names a tag twice", "give every tag once")
        if self.router_input == "token":
            raise bad(own, "route_tags", tags, "is set, but router_input='token' does not route by tag",
                      "set router_input='token+tag' or 'tag', or drop route_tags")
        self.route_tags = list(tags)

    def _check_dynamic(self) -> None:
        own, mode = "MoEConfig", self.dynamic_k
        check_choice(own, "dynamic_k", mode, DYNAMIC_K)
        check_int(own, "num_null_experts", self.num_null_experts, 0, "use 0 for none")
        check_real(own, "relu_l1", self.relu_l1, 0, fix="use e.g. 1e-3")
        check_real(own, "top_p", self.top_p, 0, 1, low_open=True,
                   fix="use a probability mass in (0, 1], e.g. 0.5")
        self._check_unused()
        if mode == "none":
            return
        if self.router == "expert_choice":
            raise bad(own, "dynamic_k", mode, "gives each token its own number of experts, which needs token "
                      "choice, got router='expert_choice' (whose experts pick tokens)",
                      "use router='softmax' or set dynamic_k='none'")
        if self.top1_weight == "one":
            raise bad(own, "top1_weight", "one", f"is for a fixed top_k=1, got dynamic_k={mode!r}",
                      "set top1_weight='prob'")
        if mode == "null":   # (null experts under another mode: _check_unused)
            check_int(own, "num_null_experts", self.num_null_experts, 1,
                      "give the router at least one zero-compute expert, e.g. num_null_experts=4")
        if mode == "relu" and (self.router != "softmax" or self.aux_loss_free):
            raise bad(own, "dynamic_k", "relu", f"scores experts by relu(logits), so it takes no "
                      f"router={self.router!r} / aux_loss_free={self.aux_loss_free}",
                      "leave router='softmax' and aux_loss_free=False")
        self._check_k_range()

    def _check_unused(self) -> None:
        """A dynamic-k field set where it does nothing is refused: ``--set top_p=0.9`` without
        ``dynamic_k='top_p'`` would otherwise train a different model than the one asked for."""
        own, mode = "MoEConfig", self.dynamic_k
        for name, default, modes in (("top_p", 0.5, ("top_p",)), ("relu_l1", 1e-3, ("relu",)),
                                     ("min_k", None, ("top_p", "relu")), ("max_k", None, ("top_p", "relu")),
                                     ("num_null_experts", 0, ("null",)), ("target_k", None, DYNAMIC_K[1:])):
            value = getattr(self, name)
            if value != default and mode not in modes:
                want = " or ".join(repr(m) for m in modes)
                raise bad(own, name, value, f"configures dynamic_k={want}, but dynamic_k={mode!r}",
                          f"set dynamic_k={want}, or leave {name} unset")
        if self.budget_rate is not None and self.target_k is None:
            raise bad(own, "budget_rate", self.budget_rate, "is the budget controller's step, but "
                      "target_k is unset (no controller)",
                      "set target_k (the mean experts per token to hold) or leave budget_rate unset")

    def _check_k_range(self) -> None:
        own, mode, E = "MoEConfig", self.dynamic_k, self.num_experts
        for name in ("min_k", "max_k"):
            if getattr(self, name) is not None:
                check_int(own, name, getattr(self, name), 0 if name == "min_k" else 1)
        if self.max_k is not None and self.max_k > E:
            raise bad(own, "max_k", self.max_k, f"exceeds num_experts={E}",
                      f"use max_k <= {E} or add experts")
        if mode == "relu" and self.min_k not in (None, 0):
            raise bad(own, "min_k", self.min_k,
                      "relu routing gives no expert to a token whose gates are all 0",
                      "leave min_k unset (0), or use dynamic_k='top_p'")
        if mode == "top_p" and self.min_k == 0:
            raise bad(own, "min_k", 0, "top_p routing always takes the most probable expert (the mass before "
                      "it is 0 < p)", "use min_k >= 1, or dynamic_k='relu' or 'null' for tokens with none")
        lo, hi = self.k_range
        if lo > hi:
            raise bad(own, "min_k", self.min_k, f"exceeds max_k={hi}", f"use min_k <= {hi}")
        if self.target_k is not None:
            check_real(own, "target_k", self.target_k, lo, hi, fix=f"use a mean number of experts per token "
                       f"in [{lo}, {hi}] (min_k .. max_k), or leave it unset for no budget controller")
        if self.budget_rate is not None:
            high = 1 if mode == "top_p" else None      # a step of p as wide as its whole range
            check_real(own, "budget_rate", self.budget_rate, 0, high, low_open=True, high_open=True,
                       fix=f"use a small positive step, e.g. {BUDGET_RATES[mode]}")
        if mode == "relu" and self.target_k is not None and self.relu_l1 <= 0:
            raise bad(own, "relu_l1", self.relu_l1, "is the L1 coefficient the controller multiplies; from 0 "
                      "it never moves", "start from a positive coefficient, e.g. relu_l1=1e-3")

    @property
    def dynamic(self) -> bool:
        """True when tokens get a varying number of experts (``dynamic_k`` is not "none")."""
        return self.dynamic_k != "none"

    @property
    def k_range(self) -> tuple[int, int]:
        """(fewest, most) real experts a token is routed to (before capacity drops)."""
        if self.router == "expert_choice":   # experts pick tokens: a token gets any number
            return (0, self.num_experts)
        if self.dynamic_k == "none":
            return (self.top_k, self.top_k)
        if self.dynamic_k == "null":
            return (0, self.top_k)
        hi = self.num_experts if self.max_k is None else self.max_k
        lo = (1 if self.dynamic_k == "top_p" else 0) if self.min_k is None else self.min_k
        return (lo, hi)

    @property
    def nominal_k(self) -> float:
        """Experts per token for FLOP counts: top_k, or with a dynamic k the target_k the budget
        controller holds, else the most a token can get (an upper bound)."""
        if not self.dynamic:
            return self.top_k
        return self.k_range[1] if self.target_k is None else self.target_k

    @property
    def rate(self) -> float:
        """The budget controller's step (``budget_rate`` or the mode's default)."""
        return BUDGET_RATES.get(self.dynamic_k, 0.0) if self.budget_rate is None else self.budget_rate

    @property
    def num_route_tags(self) -> int:
        """How many tags the router knows; one line if it routes by tag and has none yet."""
        if self.route_tags is None:
            raise bad("MoEConfig", "route_tags", None, f"router_input={self.router_input!r} needs the tag "
                      "names to size its tag table", "the trainer fills it from the data's tags "
                      "(data.mixture or the corpus); outside a run, pass route_tags=[...]")
        return len(self.route_tags)

    @property
    def shared_width(self) -> int:
        """Width of the shared FFN (0 without shared experts)."""
        if not self.num_shared_experts:
            return 0
        return self.d_ff * self.num_shared_experts if self.shared_d_ff is None else self.shared_d_ff

    def with_granularity(self, m: int) -> MoEConfig:
        """Fine-grained experts (DeepSeek-MoE): split each expert into ``m`` experts of width
        ``d_ff // m`` and route to ``m * top_k`` of them, keeping parameters and active FLOPs.

        Example:
            >>> MoEConfig(d_model=64, d_ff=256, num_experts=8, top_k=2).with_granularity(4).num_experts
            32
        """
        if not isinstance(m, int) or isinstance(m, bool) or m < 1 or self.d_ff % m:
            raise ValueError(f"granularity m={m!r}: must be a positive integer dividing d_ff={self.d_ff}; "
                             f"pick a divisor of {self.d_ff}")
        scaled = {name: getattr(self, name) * m for name in ("min_k", "max_k", "target_k")
                  if getattr(self, name) is not None}
        return dataclasses.replace(self, d_ff=self.d_ff // m, num_experts=self.num_experts * m,
                                   top_k=self.top_k * m, num_null_experts=self.num_null_experts * m, **scaled)


def default_moe(d_model: int) -> MoEConfig:
    """The recipes' MoE: 8 experts of width d_model, top-2 (fine-grained relative to a
    4 x d_model dense FFN: active FFN width 2 * d_model)."""
    return MoEConfig(d_model=d_model, d_ff=d_model, num_experts=8, top_k=2)
