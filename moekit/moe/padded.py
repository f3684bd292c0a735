"""The ``padded_mm`` expert backend: every expert's rows padded to the largest count C, so
that each projection is one batched GEMM over [E, C, ...] instead of one GEMM per expert.

Why: a GEMM per expert is a parallel region per expert (9 per expert per training step). On
a machine whose cores are shared with another job, every region waits for its slowest
thread, which the other job keeps descheduling: measured at 64 experts in float32 on 2 busy
cores, the per-expert loop ran 6.4x slower than on idle cores and the batched one 2x
(docs/benchmarks.md). The price is the padding, E*C - R rows of wasted GEMM work (~16% at 64
experts with 256 rows each on average), so :class:`moekit.moe.experts.GroupedExperts` picks
it under ``auto`` only where the waste is small (:func:`padding_waste`).

Layout: row r of expert e (its rank j within e's block) goes to slot e*C + j of a zeroed
[E*C, D] buffer; pads stay zero in the forward (finite activations) and get zero gradient
in the backward (so the weight gradients are exact). All buffers come from
:data:`moekit.moe.workspace.WORKSPACE`; the backward is once-differentiable.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from moekit.moe.workspace import WORKSPACE


def padding_waste(counts: list[int]) -> float:
    """E * max(counts) / sum(counts): the padded rows computed per real row (1 = no waste)."""
    total = sum(counts)
    return len(counts) * max(counts) / total if total else float("inf")


def pad_slots(counts_E: Tensor, capacity: int) -> Tensor:
    """slot_R: e*C + (rank of row r within expert e's block), for rows grouped by expert."""
    E = counts_E.shape[0]
    expert_R = torch.repeat_interleave(torch.arange(E, device=counts_E.device), counts_E)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_R = torch.arange(expert_R.shape[0], device=counts_E.device) - starts_E[expert_R]
    return expert_R * capacity + rank_R


def _ws(shape, like: Tensor) -> Tensor:
    return WORKSPACE.empty(tuple(shape), like.dtype, like.device)


def _pad(x_RI: Tensor, slot_R: Tensor, E: int, C: int) -> Tensor:
    """x_RI rows into slots of a zeroed [E, C, I] buffer."""
    x_SI = _ws((E * C, x_RI.shape[1]), x_RI).zero_()
    return x_SI.index_copy_(0, slot_R, x_RI).view(E, C, -1)


def _unpad(x_ECI: Tensor, slot_R: Tensor) -> Tensor:
    out_RI = _ws((slot_R.shape[0], x_ECI.shape[2]), x_ECI)
    return torch.index_select(x_ECI.view(-1, x_ECI.shape[2]), 0, slot_R, out=out_RI)


def _bmm(a: Tensor, b: Tensor) -> Tensor:
    return torch.bmm(a, b, out=_ws((a.shape[0], a.shape[1], b.shape[2]), a))


class PaddedFFN(torch.autograd.Function):
    """y_RD = act(x w_gate[e], x w_up[e]) w_down[e] per expert, on the padded layout.

    ``w_gate_EDF`` None: GELU experts. ``mask_RF``: expert dropout (0 or 1/(1-p)), or None.
    """

    @staticmethod
    def forward(ctx, x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, slot_R, capacity: int, mask_RF=None):
        E, C = w_up_EDF.shape[0], capacity
        x_ECD = _pad(x_RD, slot_R, E, C)
        up_ECF = _bmm(x_ECD, w_up_EDF)
        if w_gate_EDF is not None:
            gate_ECF = _bmm(x_ECD, w_gate_EDF)
            silu_ECF = torch.ops.aten.silu.out(gate_ECF, out=_ws(gate_ECF.shape, gate_ECF))
            a_ECF = torch.mul(silu_ECF, up_ECF, out=_ws(up_ECF.shape, up_ECF))
        else:
            gate_ECF = silu_ECF = None
            a_ECF = torch.ops.aten.gelu.out(up_ECF, out=_ws(up_ECF.shape, up_ECF))
        mask_ECF = _pad(mask_RF, slot_R, E, C) if mask_RF is not None else None
        if mask_ECF is not None:
            a_ECF.mul_(mask_ECF)
        y_RD = _unpad(_bmm(a_ECF, w_down_EFD), slot_R)
        ctx.save_for_backward(x_ECD, w_gate_EDF, w_up_EDF, w_down_EFD, gate_ECF, up_ECF, silu_ECF,
                              a_ECF, mask_ECF, slot_R)
        return y_RD

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_RD):
        x_ECD, w_gate, w_up, w_down, gate_ECF, up_ECF, silu_ECF, a_ECF, mask_ECF, slot_R = ctx.saved_tensors
        need = ctx.needs_input_grad
        E, C = x_ECD.shape[:2]
        grad_ECD = _pad(grad_RD.contiguous(), slot_R, E, C)   # pads: zero gradient
        grad_down = _bmm(a_ECF.transpose(1, 2), grad_ECD) if need[3] else None
        grad_a_ECF = _bmm(grad_ECD, w_down.transpose(1, 2))
        if mask_ECF is not None:
            grad_a_ECF.mul_(mask_ECF)
        if w_gate is not None:
            grad_up_ECF = torch.mul(grad_a_ECF, silu_ECF, out=_ws(up_ECF.shape, up_ECF))
            grad_silu = torch.mul(grad_a_ECF, up_ECF, out=_ws(up_ECF.shape, up_ECF))
            grad_gate_ECF = torch.ops.aten.silu_backward.grad_input(
                grad_silu, gate_ECF, grad_input=_ws(up_ECF.shape, up_ECF))
            del grad_silu, grad_a_ECF
            grad_gate = _bmm(x_ECD.transpose(1, 2), grad_gate_ECF) if need[1] else None
            grad_x_ECD = _bmm(grad_gate_ECF, w_gate.transpose(1, 2))
            grad_x_ECD.baddbmm_(grad_up_ECF, w_up.transpose(1, 2))
        else:
            grad_up_ECF = torch.ops.aten.gelu_backward.grad_input(grad_a_ECF, up_ECF,
                                                                  grad_input=_ws(up_ECF.shape, up_ECF))
            grad_gate = None
            grad_x_ECD = _bmm(grad_up_ECF, w_up.transpose(1, 2))
        grad_up = _bmm(x_ECD.transpose(1, 2), grad_up_ECF) if need[2] else None
        grad_x_RD = _unpad(grad_x_ECD, slot_R) if need[0] else None
        return grad_x_RD, grad_gate, grad_up, grad_down, None, None, None


def padded_ffn(x_RD: Tensor, counts: list[int], counts_E: Tensor, w_gate_EDF: Tensor | None,
               w_up_EDF: Tensor, w_down_EFD: Tensor, mask_RF: Tensor | None = None) -> Tensor:
    """The ``padded_mm`` backend (rows grouped by expert, ``counts`` = counts_E.tolist())."""
    capacity = max(counts)
    assert capacity > 0, "padded_ffn needs at least one row (GroupedExperts sends none here)"
    slot_R = pad_slots(counts_E, capacity)
    return PaddedFFN.apply(x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, slot_R, capacity, mask_RF)
