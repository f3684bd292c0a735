"""Experts: E feed-forward networks run over rows grouped by expert.

Shape legend: R rows grouped by expert (counts_E of them per expert, in expert order),
D model dim, F expert hidden dim, E experts.

Weights are stacked, input dim first so a row block times ``w[e]`` needs no transpose:
``w_gate_EDF`` and ``w_up_EDF`` [E, D, F] (SwiGLU: silu(x w_gate) * (x w_up); GELU experts
have no gate), ``w_down_EFD`` [E, F, D]. Backends, all computing the same thing:

- ``grouped_mm``: ``torch._grouped_mm``, one call for all experts (torch >= 2.9, CPU and
  CUDA). Rows must be 16-byte aligned (d_model, d_ff divisible by 8 in bf16, 4 in f32).
- ``segment_mm``: one GEMM per expert over its contiguous rows, written into
  preallocated outputs inside a single autograd Function, whose backward writes every
  expert's weight gradient into one [E, ...] buffer. (Indexing ``w[e]`` under autograd
  instead would make the backward build a full-size [E, ...] gradient per expert.)
- ``padded_mm``: every expert's rows padded to the largest count, one batched GEMM per
  projection (:mod:`moekit.moe.padded`): fewer, larger parallel regions, for shared cores.
- ``reference``: the plain autograd loop over experts; slow, for tests only.

``auto`` (:func:`auto_backend`) picks ``segment_mm`` on CPU: its temporaries, weight gradients
included, come from :mod:`moekit.moe.workspace`'s reused buffers, where CPU ``_grouped_mm``
allocates fresh ones each step (page faults: ~1 GiB a step at 64 experts in float32) and runs
a GEMM for every expert, empty or not (measured, docs/benchmarks.md). On CUDA it picks
``grouped_mm`` where torch has its grouped-GEMM kernel, bf16 on capability 9.0 (Hopper) and
10.0 (Blackwell), and the dims allow; anywhere else ``_grouped_mm`` falls back to a loop of
GEMMs with fresh buffers, so ``segment_mm`` (the same loop into reused buffers, no padding,
any dtype) is the next best. Parameters may be in any
floating dtype (``layer.to(torch.bfloat16)``): every backend computes in the input's dtype.

``segment_mm``'s backward is once-differentiable: double backward raises.

Expert dropout (``MoEConfig.expert_dropout``, Switch Transformer fine-tuning): in training
mode :class:`GroupedExperts` draws one scaled mask ``mask_RF`` (0 or 1/(1-p)) per forward and
hands it to whichever backend runs, which multiplies the hidden activation a_RF by it before
the down projection; with the same seed every backend gives the same output. The per-token
:func:`moekit.moe.reference.reference_moe` draws no mask: compare with it in eval mode or at
``expert_dropout=0``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from moekit.moe.config import MoEConfig
from moekit.moe.padded import padded_ffn
from moekit.moe.workspace import WORKSPACE

HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
# CUDA capabilities where torch._grouped_mm runs its grouped-GEMM kernel (bf16 only)
GROUPED_MM_FAST = ((9, 0), (10, 0))


def auto_backend(device_type: str, capability: tuple[int, int] | None, dtype: torch.dtype,
                 aligned: bool = True, has_grouped_mm: bool = HAS_GROUPED_MM) -> str:
    """What backend="auto" runs for inputs of ``dtype`` on a ``device_type`` device of CUDA
    ``capability`` (None off CUDA); ``aligned``: the dims meet _grouped_mm's 16-byte rows. A
    pure function (tests pass a table of devices).

    Example:
        >>> auto_backend("cuda", (9, 0), torch.bfloat16), auto_backend("cuda", (7, 0), torch.float16)
        ('grouped_mm', 'segment_mm')
    """
    fast = (device_type == "cuda" and capability in GROUPED_MM_FAST and dtype == torch.bfloat16
            and has_grouped_mm and aligned)
    return "grouped_mm" if fast else "segment_mm"


def empty_grads_need_zeroing(device_type: str, capability: tuple[int, int] | None) -> bool:
    """True where torch._grouped_mm's backward gives experts with no rows a non-zero weight
    gradient: Blackwell, capability 10.x (pytorch issue 172439)."""
    return device_type == "cuda" and capability is not None and capability[0] == 10


def _capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


class _ZeroEmptyExperts(torch.autograd.Function):
    """Identity on w_E... [E, ...] whose backward zeroes the gradient of the experts with no rows
    (``counts_E`` == 0): the exact gradient there is 0, whatever the kernel wrote."""

    @staticmethod
    def forward(ctx, w_E: Tensor, counts_E: Tensor) -> Tensor:
        ctx.save_for_backward(counts_E)
        return w_E.view_as(w_E)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_E: Tensor):
        (counts_E,) = ctx.saved_tensors
        empty_E = (counts_E == 0).view(-1, *([1] * (grad_E.dim() - 1)))
        return grad_E.masked_fill(empty_E, 0), None


class _SegmentFFN(torch.autograd.Function):
    """y_RD = act(x_RD @ w_gate[e], x_RD @ w_up[e]) @ w_down[e] over each expert's row block.

    Gate and up are separate GEMMs into separate contiguous buffers: elementwise kernels
    on the strided halves of one fused [R, 2F] output measured slower (docs/benchmarks.md).
    ``w_gate_EDF`` is None for GELU experts. ``mask_RF`` (expert dropout, values 0 or
    1/(1-p)) multiplies a_RF before the down projection; None = no dropout.

    Every [R, F], [R, D] and [E, ...] temporary, the weight gradients included, comes from
    :data:`moekit.moe.workspace.WORKSPACE` and is written by an ``out=`` kernel: no fresh
    pages to fault in per step.
    """

    @staticmethod
    def forward(ctx, x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, counts: list[int], mask_RF=None):
        up_RF = _segment_mm(x_RD, w_up_EDF, counts)
        if w_gate_EDF is not None:
            gate_RF = _segment_mm(x_RD, w_gate_EDF, counts)
            silu_RF = torch.ops.aten.silu.out(gate_RF, out=_ws(up_RF))
            a_RF = torch.mul(silu_RF, up_RF, out=_ws(up_RF))
        else:
            gate_RF = silu_RF = None
            a_RF = torch.ops.aten.gelu.out(up_RF, out=_ws(up_RF))
        if mask_RF is not None:
            a_RF.mul_(mask_RF)   # the dropped a_RF is what w_down's gradient needs
        y_RD = _segment_mm(a_RF, w_down_EFD, counts)
        ctx.save_for_backward(x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, gate_RF, up_RF, silu_RF, a_RF,
                              mask_RF)
        ctx.counts = counts
        return y_RD

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_RD):
        x_RD, w_gate, w_up, w_down, gate_RF, up_RF, silu_RF, a_RF, mask_RF = ctx.saved_tensors
        counts, need = ctx.counts, ctx.needs_input_grad
        grad_RD = grad_RD.contiguous()   # a stride-0 grad (from .sum()) would break the GEMMs
        grad_a_RF, grad_down = _segment_mm_backward(grad_RD, a_RF, w_down, counts, need[3])
        if mask_RF is not None:
            grad_a_RF.mul_(mask_RF)
        if w_gate is not None:
            grad_up_RF = torch.mul(grad_a_RF, silu_RF, out=_ws(up_RF))
            grad_silu_RF = torch.mul(grad_a_RF, up_RF, out=_ws(up_RF))
            grad_gate_RF = torch.ops.aten.silu_backward.grad_input(grad_silu_RF, gate_RF,
                                                                  grad_input=_ws(up_RF))
            del grad_silu_RF, grad_a_RF
            grad_x_RD, grad_gate = _segment_mm_backward(grad_gate_RF, x_RD, w_gate, counts, need[1])
        else:
            grad_up_RF = torch.ops.aten.gelu_backward.grad_input(grad_a_RF, up_RF, grad_input=_ws(up_RF))
            grad_x_RD, grad_gate = None, None
        grad_x_RD, grad_up = _segment_mm_backward(grad_up_RF, x_RD, w_up, counts, need[2],
                                                  accumulate_into=grad_x_RD)
        return grad_x_RD, grad_gate, grad_up, grad_down, None, None


def _ws(like: Tensor) -> Tensor:
    return WORKSPACE.empty_like(like)


def _segment_mm(x_RI: Tensor, w_EIO: Tensor, counts: list[int]) -> Tensor:
    """out[rows of e] = x[rows of e] @ w[e]: one GEMM per non-empty expert, no copies."""
    out_RO = WORKSPACE.empty((x_RI.shape[0], w_EIO.shape[2]), x_RI.dtype, x_RI.device)
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(x_RI[start:start + n], w_EIO[e], out=out_RO[start:start + n])
            start += n
    return out_RO


def _segment_mm_backward(grad_RO: Tensor, x_RI: Tensor, w_EIO: Tensor, counts: list[int],
                         need_weight_grad: bool, accumulate_into: Tensor | None = None):
    """Backward of :func:`_segment_mm`: (grad_x_RI, grad_w_EIO).

    grad_x is added to ``accumulate_into`` when given; grad_w is one [E, I, O] buffer,
    zero for experts with no rows.
    """
    grad_x_RI = _ws(x_RI) if accumulate_into is None else accumulate_into
    grad_w_EIO = _ws(w_EIO) if need_weight_grad else None
    start = 0
    for e, n in enumerate(counts):
        rows = slice(start, start + n)
        if n:
            if accumulate_into is None:
                torch.mm(grad_RO[rows], w_EIO[e].t(), out=grad_x_RI[rows])
            else:
                grad_x_RI[rows].addmm_(grad_RO[rows], w_EIO[e].t())
            if grad_w_EIO is not None:
                torch.mm(x_RI[rows].t(), grad_RO[rows], out=grad_w_EIO[e])
        elif grad_w_EIO is not None:
            grad_w_EIO[e].zero_()
        start += n
    return grad_x_RI, grad_w_EIO


class GroupedExperts(nn.Module):
    """E experts (SwiGLU or GELU) over rows grouped by expert.

    Parameters: ``w_gate_EDF`` (SwiGLU only), ``w_up_EDF`` [E, D, F], ``w_down_EFD`` [E, F, D].
    ``expert_dropout`` (a plain attribute, from the config) drops the hidden activation in
    training mode (:meth:`dropout_mask`).

    Example:
        >>> cfg = MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2)
        >>> experts = GroupedExperts(cfg)
        >>> experts(torch.randn(10, 16), torch.tensor([3, 0, 7, 0])).shape
        torch.Size([10, 16])
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.activation, self.backend = cfg.activation, cfg.backend
        self.expert_dropout = cfg.expert_dropout
        E, D, F_ = cfg.num_experts, cfg.d_model, cfg.d_ff
        self.w_gate_EDF = (nn.Parameter(torch.empty(E, D, F_, dtype=cfg.dtype))
                           if cfg.activation == "swiglu" else None)
        self.w_up_EDF = nn.Parameter(torch.empty(E, D, F_, dtype=cfg.dtype))
        self.w_down_EFD = nn.Parameter(torch.empty(E, F_, D, dtype=cfg.dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # variance 1/fan_in, as nn.Linear's default, drawn from a normal
        for w in (self.w_gate_EDF, self.w_up_EDF, self.w_down_EFD):
            if w is not None:
                nn.init.normal_(w, std=w.shape[1] ** -0.5)

    def _grouped_mm_aligned(self, x_RD: Tensor) -> bool:
        """torch._grouped_mm needs 16-byte row strides: dims divisible by 16 / element size."""
        align = max(1, 16 // x_RD.element_size())
        return x_RD.shape[1] % align == 0 and self.w_up_EDF.shape[2] % align == 0

    def resolve_backend(self, x_RD: Tensor) -> str:
        if self.backend != "auto":
            return self.backend
        # bf16 only, so also what torch.compile can trace (_grouped_mm: bf16-only, torch 2.13)
        return auto_backend(x_RD.device.type, _capability(x_RD.device), x_RD.dtype,
                            self._grouped_mm_aligned(x_RD))

    def weights(self, dtype: torch.dtype) -> tuple[Tensor | None, Tensor, Tensor]:
        """(w_gate, w_up, w_down) in ``dtype``: mixed precision computes in the activations'
        dtype and the gradients flow back to the (e.g. float32) parameters."""
        gate = self.w_gate_EDF.to(dtype) if self.w_gate_EDF is not None else None
        return gate, self.w_up_EDF.to(dtype), self.w_down_EFD.to(dtype)

    def dropout_mask(self, x_RD: Tensor) -> Tensor | None:
        """The expert-dropout mask [R, F] in x's dtype, 0 (dropped, probability p) or 1/(1-p)
        (Switch Transformer: 0.4 inside the experts fine-tunes best); None in eval mode or at
        p = 0. Drawn once per forward so that every backend sees the same mask."""
        p = self.expert_dropout
        if not self.training or p == 0:
            return None
        u_RF = torch.rand(x_RD.shape[0], self.w_up_EDF.shape[2], dtype=x_RD.dtype, device=x_RD.device)
        return (u_RF >= p).to(x_RD.dtype) / (1 - p)

    def forward(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        """x_RD [R, D] grouped by expert with counts_E [E] rows each -> y_RD [R, D]."""
        if x_RD.device.type == "cpu" and int(counts_E.sum()) != x_RD.shape[0]:
            raise ValueError(f"GroupedExperts: counts_E sums to {int(counts_E.sum())} but x_RD has "
                             f"{x_RD.shape[0]} rows; counts must cover every row exactly")
        w_gate, w_up, w_down = self.weights(x_RD.dtype)
        mask_RF = self.dropout_mask(x_RD)
        backend = self.resolve_backend(x_RD)
        if backend == "padded_mm" and x_RD.shape[0]:
            return padded_ffn(x_RD, counts_E.tolist(), counts_E, w_gate, w_up, w_down, mask_RF)
        if backend in ("segment_mm", "padded_mm"):
            return _SegmentFFN.apply(x_RD, w_gate, w_up, w_down, counts_E.tolist(), mask_RF)
        if backend == "grouped_mm":
            self._check_grouped_mm(x_RD)
            return _grouped_ffn(x_RD, counts_E, w_gate, w_up, w_down, mask_RF)
        return expert_loop(x_RD, counts_E, w_gate, w_up, w_down, mask_RF)

    def _check_grouped_mm(self, x_RD: Tensor) -> None:
        if not HAS_GROUPED_MM:
            raise ValueError(f"backend='grouped_mm': torch {torch.__version__} has no "
                             "torch._grouped_mm; use backend='segment_mm' or torch >= 2.9")
        if not self._grouped_mm_aligned(x_RD):
            align = 16 // x_RD.element_size()
            raise ValueError(f"backend='grouped_mm' in {x_RD.dtype} needs d_model and d_ff divisible "
                             f"by {align} (16-byte rows), got d_model={x_RD.shape[1]}, "
                             f"d_ff={self.w_up_EDF.shape[2]}; pad the dims or use backend='segment_mm'")


def _grouped_ffn(x_RD: Tensor, counts_E: Tensor, w_gate_EDF: Tensor | None, w_up_EDF: Tensor,
                 w_down_EFD: Tensor, mask_RF: Tensor | None = None, zero_empty: bool | None = None) -> Tensor:
    """The ``grouped_mm`` backend: one torch._grouped_mm per projection for all experts.
    ``zero_empty``: zero the weight gradients of experts with no rows after the backward (None:
    where the kernel needs it, :func:`empty_grads_need_zeroing`)."""
    if zero_empty is None:
        zero_empty = empty_grads_need_zeroing(x_RD.device.type, _capability(x_RD.device))
    offs = torch.cumsum(counts_E, 0, dtype=torch.int32)
    if zero_empty:
        w_gate_EDF, w_up_EDF, w_down_EFD = (None if w is None else _ZeroEmptyExperts.apply(w, counts_E)
                                            for w in (w_gate_EDF, w_up_EDF, w_down_EFD))
    up_RF = torch._grouped_mm(x_RD, w_up_EDF, offs=offs)
    if w_gate_EDF is not None:
        a_RF = F.silu(torch._grouped_mm(x_RD, w_gate_EDF, offs=offs)) * up_RF
    else:
        a_RF = F.gelu(up_RF)
    if mask_RF is not None:
        a_RF = a_RF * mask_RF
    y_RD = torch._grouped_mm(a_RF, w_down_EFD, offs=offs)
    if y_RD.requires_grad:   # its backward rejects the stride-0 grad of y.sum().backward()
        y_RD.register_hook(lambda grad: grad.contiguous())
    return y_RD


def expert_ffn(x_ND: Tensor, w_gate_DF: Tensor | None, w_up_DF: Tensor, w_down_FD: Tensor,
               mask_NF: Tensor | None = None) -> Tensor:
    """One expert: SwiGLU when it has a gate, else GELU; ``mask_NF`` scales its hidden
    activation (expert dropout) when given."""
    up = x_ND @ w_up_DF
    a = F.silu(x_ND @ w_gate_DF) * up if w_gate_DF is not None else F.gelu(up)
    if mask_NF is not None:
        a = a * mask_NF
    return a @ w_down_FD


def expert_loop(x_RD: Tensor, counts_E: Tensor, w_gate_EDF: Tensor | None, w_up_EDF: Tensor,
                w_down_EFD: Tensor, mask_RF: Tensor | None = None) -> Tensor:
    """The slow twin: a plain autograd loop over experts (``mask_RF``: expert dropout)."""
    outs, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        gate = w_gate_EDF[e] if w_gate_EDF is not None else None
        mask = mask_RF[start:start + n] if mask_RF is not None else None
        outs.append(expert_ffn(x_RD[start:start + n], gate, w_up_EDF[e], w_down_EFD[e], mask))
        start += n
    return torch.cat(outs) if outs else x_RD.new_zeros(0, w_down_EFD.shape[2])


class DenseFFN(nn.Module):
    """A dense FFN in the Llama layout (gate, up, down; GELU has no gate): the shared
    experts, the dense layers of the model and the benchmark's dense baseline."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "swiglu",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.w_gate = (nn.Linear(d_model, d_ff, bias=False, dtype=dtype)
                       if activation == "swiglu" else None)
        self.w_up = nn.Linear(d_model, d_ff, bias=False, dtype=dtype)
        self.w_down = nn.Linear(d_ff, d_model, bias=False, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        # like the experts: compute in the activations' dtype (mixed precision)
        gate = self.w_gate.weight.t().to(x.dtype) if self.w_gate is not None else None
        return expert_ffn(x, gate, self.w_up.weight.t().to(x.dtype), self.w_down.weight.t().to(x.dtype))
