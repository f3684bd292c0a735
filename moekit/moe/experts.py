"""Experts: E feed-forward networks run over rows grouped by expert.

Shape legend: R rows grouped by expert (counts_E of them per expert, in expert order),
D model dim, F expert hidden dim, H = 2F for SwiGLU (gate and up fused) or F for GELU,
E experts.

Weights are stacked: ``w_up_EDH`` [E, D, H] and ``w_down_EFD`` [E, F, D] (input dim first,
so a row block times ``w[e]`` needs no transpose). Backends, all computing the same thing:

- ``grouped_mm``: ``torch._grouped_mm`` (one kernel for all experts; the fast path on
  CUDA). Its CPU implementation in torch 2.9-2.13 is about 3x slower than MKL/oneDNN GEMMs
  on the same rows, so ``auto`` does not pick it on CPU.
- ``segment_mm``: one GEMM per expert over its contiguous rows, written into
  preallocated outputs inside a single autograd Function, whose backward writes every
  expert's weight gradient into one [E, ...] buffer. (Indexing ``w[e]`` under autograd
  instead would make the backward build a full-size [E, ...] gradient per expert.)
- ``reference``: the plain autograd loop over experts; slow, for tests only.

``auto`` picks ``grouped_mm`` on CUDA and ``segment_mm`` elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import MoEConfig

HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def activate(h_RH: Tensor, activation: str) -> Tensor:
    """SwiGLU (silu(gate) * up on the two halves of H) or GELU; same dtype as the input."""
    if activation == "swiglu":
        gate_RF, up_RF = h_RH.chunk(2, dim=-1)
        return F.silu(gate_RF) * up_RF
    return F.gelu(h_RH)


class _SegmentFFN(torch.autograd.Function):
    """y_RD = act(x_RD @ w_up[e]) @ w_down[e] for each expert's row block, one GEMM each."""

    @staticmethod
    def forward(ctx, x_RD, w_up_EDH, w_down_EFD, counts: list[int], activation: str):
        R, H = x_RD.shape[0], w_up_EDH.shape[2]
        h_RH = x_RD.new_empty(R, H)
        _segment_mm(x_RD, w_up_EDH, counts, h_RH)
        if activation == "swiglu":
            F_ = H // 2
            silu_RF = F.silu(h_RH[:, :F_])
            a_RF = silu_RF * h_RH[:, F_:]
        else:
            silu_RF = None
            a_RF = F.gelu(h_RH)
        y_RD = x_RD.new_empty(R, w_down_EFD.shape[2])
        _segment_mm(a_RF, w_down_EFD, counts, y_RD)
        ctx.save_for_backward(x_RD, w_up_EDH, w_down_EFD, h_RH, a_RF, silu_RF)
        ctx.counts, ctx.activation = counts, activation
        return y_RD

    @staticmethod
    def backward(ctx, grad_RD):
        x_RD, w_up_EDH, w_down_EFD, h_RH, a_RF, silu_RF = ctx.saved_tensors
        counts = ctx.counts
        grad_RD = grad_RD.contiguous()
        grad_down = torch.empty_like(w_down_EFD) if ctx.needs_input_grad[2] else None
        grad_a_RF = _segment_mm_bwd(grad_RD, a_RF, w_down_EFD, counts, grad_down)
        if ctx.activation == "swiglu":
            F_ = h_RH.shape[1] // 2
            grad_h_RH = torch.empty_like(h_RH)
            torch.mul(grad_a_RF, h_RH[:, F_:], out=grad_h_RH[:, :F_])
            torch.ops.aten.silu_backward.grad_input(grad_h_RH[:, :F_], h_RH[:, :F_],
                                                   grad_input=grad_h_RH[:, :F_])
            torch.mul(grad_a_RF, silu_RF, out=grad_h_RH[:, F_:])
        else:
            grad_h_RH = torch.ops.aten.gelu_backward(grad_a_RF, h_RH)
        grad_up = torch.empty_like(w_up_EDH) if ctx.needs_input_grad[1] else None
        grad_x_RD = _segment_mm_bwd(grad_h_RH, x_RD, w_up_EDH, counts, grad_up,
                                    need_input_grad=ctx.needs_input_grad[0])
        return grad_x_RD, grad_up, grad_down, None, None


def _segment_mm(x_RI: Tensor, w_EIO: Tensor, counts: list[int], out_RO: Tensor) -> None:
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(x_RI[start:start + n], w_EIO[e], out=out_RO[start:start + n])
            start += n


def _segment_mm_bwd(grad_RO: Tensor, x_RI: Tensor, w_EIO: Tensor, counts: list[int],
                    grad_w_EIO: Tensor | None, need_input_grad: bool = True) -> Tensor | None:
    """For y = x @ w[e] per row block: fills grad_w_EIO (zeros for empty experts) and
    returns grad_x_RI."""
    grad_x_RI = x_RI.new_empty(x_RI.shape) if need_input_grad else None
    start = 0
    for e, n in enumerate(counts):
        rows = slice(start, start + n)
        if n and grad_x_RI is not None:
            torch.mm(grad_RO[rows], w_EIO[e].t(), out=grad_x_RI[rows])
        if grad_w_EIO is not None:
            if n:
                torch.mm(x_RI[rows].t(), grad_RO[rows], out=grad_w_EIO[e])
            else:
                grad_w_EIO[e].zero_()
        start += n
    return grad_x_RI


class GroupedExperts(nn.Module):
    """E experts (SwiGLU or GELU) over rows grouped by expert.

    Example:
        >>> cfg = MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2)
        >>> experts = GroupedExperts(cfg)
        >>> experts(torch.randn(10, 16), torch.tensor([3, 0, 7, 0])).shape
        torch.Size([10, 16])
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.activation, self.backend = cfg.activation, cfg.backend
        H = 2 * cfg.d_ff if cfg.activation == "swiglu" else cfg.d_ff
        self.w_up_EDH = nn.Parameter(torch.empty(cfg.num_experts, cfg.d_model, H, dtype=cfg.dtype))
        self.w_down_EFD = nn.Parameter(torch.empty(cfg.num_experts, cfg.d_ff, cfg.d_model,
                                                   dtype=cfg.dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # fan-in scaled normal, as nn.Linear's variance (1/fan_in) without the uniform
        nn.init.normal_(self.w_up_EDH, std=self.w_up_EDH.shape[1] ** -0.5)
        nn.init.normal_(self.w_down_EFD, std=self.w_down_EFD.shape[1] ** -0.5)

    def resolve_backend(self, device: torch.device) -> str:
        if self.backend != "auto":
            return self.backend
        return "grouped_mm" if device.type == "cuda" and HAS_GROUPED_MM else "segment_mm"

    def forward(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        """x_RD [R, D] grouped by expert with counts_E [E] rows each -> y_RD [R, D]."""
        # mixed precision: compute in the activations' dtype, gradients flow to the params
        w_up, w_down = self.w_up_EDH.to(x_RD.dtype), self.w_down_EFD.to(x_RD.dtype)
        backend = self.resolve_backend(x_RD.device)
        if backend == "segment_mm":
            return _SegmentFFN.apply(x_RD, w_up, w_down, counts_E.tolist(), self.activation)
        if backend == "grouped_mm":
            if not HAS_GROUPED_MM:
                raise ValueError(f"backend='grouped_mm': torch {torch.__version__} has no "
                                 "torch._grouped_mm; use backend='segment_mm' or torch >= 2.9")
            offs = torch.cumsum(counts_E, 0, dtype=torch.int32)
            h_RH = torch._grouped_mm(x_RD, w_up, offs=offs)
            return torch._grouped_mm(activate(h_RH, self.activation), w_down, offs=offs)
        return expert_loop(x_RD, counts_E, w_up, w_down, self.activation)


def expert_loop(x_RD: Tensor, counts_E: Tensor, w_up_EDH: Tensor, w_down_EFD: Tensor,
                activation: str) -> Tensor:
    """The slow twin: a plain autograd loop over experts."""
    outs, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        x = x_RD[start:start + n]
        outs.append(activate(x @ w_up_EDH[e], activation) @ w_down_EFD[e])
        start += n
    return torch.cat(outs) if outs else x_RD.new_zeros(0, w_down_EFD.shape[2])


class DenseFFN(nn.Module):
    """A dense SwiGLU / GELU FFN: the shared experts, and the dense baseline."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "swiglu",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.activation = activation
        H = 2 * d_ff if activation == "swiglu" else d_ff
        self.w_up = nn.Linear(d_model, H, bias=False, dtype=dtype)
        self.w_down = nn.Linear(d_ff, d_model, bias=False, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        # like the experts: compute in the activations' dtype (mixed precision)
        h = F.linear(x, self.w_up.weight.to(x.dtype))
        return F.linear(activate(h, self.activation), self.w_down.weight.to(x.dtype))
