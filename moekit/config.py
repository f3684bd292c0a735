"""Typed, validated configuration.

Every field is checked where it is defined (``__post_init__``): a bad value raises
``ValueError`` naming the field, the value, the constraint and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

ROUTERS = ("softmax", "sigmoid", "expert_choice")
DROP_POLICIES = ("position", "probability")
ACTIVATIONS = ("swiglu", "gelu")
BACKENDS = ("auto", "segment_mm", "grouped_mm", "reference")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _bad(field: str, value, constraint: str, fix: str) -> ValueError:
    return ValueError(f"MoEConfig.{field}={value!r}: {constraint}; {fix}")


def as_dtype(value) -> torch.dtype:
    """'bfloat16' | torch.bfloat16 -> torch.bfloat16 (configs come from TOML as strings)."""
    if isinstance(value, torch.dtype):
        return value
    if value in _DTYPES:
        return _DTYPES[value]
    raise ValueError(f"dtype {value!r} is not one of {sorted(_DTYPES)}")


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

    # capacity: None = dropless (every assignment is computed)
    capacity_factor: float | None = None
    drop_policy: str = "position"      # "position" | "probability"

    # experts
    num_shared_experts: int = 0        # always-on experts (DeepSeek-MoE), each of width d_ff
    activation: str = "swiglu"         # "swiglu" | "gelu"
    backend: str = "auto"              # "auto" | "segment_mm" | "grouped_mm" | "reference"
    dtype: torch.dtype | str = torch.float32   # parameter dtype

    def __post_init__(self) -> None:
        self.router_dtype = as_dtype(self.router_dtype)
        self.dtype = as_dtype(self.dtype)
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
        if self.activation not in ACTIVATIONS:
            raise _bad("activation", self.activation, f"is not one of {ACTIVATIONS}",
                       "pick one of those names")
        if self.backend not in BACKENDS:
            raise _bad("backend", self.backend, f"is not one of {BACKENDS}", "pick one of those names")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise _bad("capacity_factor", self.capacity_factor, "must be > 0",
                       "use a value such as 1.25, or None for dropless routing")
        if self.jitter_eps < 0 or self.jitter_eps >= 1:
            raise _bad("jitter_eps", self.jitter_eps, "must be in [0, 1)", "use 0 to disable or e.g. 0.01")
        if self.num_shared_experts < 0:
            raise _bad("num_shared_experts", self.num_shared_experts, "must be >= 0", "use 0 for none")
        if self.bias_update_rate < 0:
            raise _bad("bias_update_rate", self.bias_update_rate, "must be >= 0", "use e.g. 1e-3")
        if self.aux_loss_free and self.router != "sigmoid":
            raise _bad("aux_loss_free", True, f"needs router='sigmoid', got router={self.router!r}",
                       "set router='sigmoid' or aux_loss_free=False")
        if self.router_dtype not in (torch.float32, torch.float64):
            raise _bad("router_dtype", self.router_dtype, "router math must be float32 or float64",
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
