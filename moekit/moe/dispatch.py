"""Local dispatch: group token->expert assignments by expert, and combine the results.

Shape legend: T tokens, D model dim, E experts, K experts per token,
A assignments before dropping (T*K for token choice, E*C for expert choice),
R dispatched rows (A minus the dropped ones), grouped by expert in expert order.

Dropless token choice (the default) takes a fast path: the sort by expert is a
permutation of the T*K assignments, so both the dispatch gather and the combine are
row permutations whose backward is the inverse permutation (a gather again, never a
scatter-add), and the combine multiplies and sums in float32 without a separate cast pass.
With capacity (dropped rows) or expert choice (a token has any number of experts) the
combine is a float32 ``index_add`` over the kept rows; a dropped assignment contributes
zero and the layer's residual carries the token (Switch, section 2.2).

The custom backwards are once-differentiable: double backward (gradient penalties,
create_graph=True) raises instead of returning wrong second derivatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from moekit.moe.router import RouterOutput, slots


@dataclass
class DispatchPlan:
    """How rows were grouped; everything :meth:`LocalDispatcher.combine` needs."""

    token_R: Tensor            # token id of each dispatched row (int64)
    weight_R: Tensor           # combine weight of each row (float32, differentiable)
    counts_E: Tensor           # rows per expert (int64); sum == R
    num_tokens: int
    num_assignments: int       # A
    inverse_A: Tensor | None = None  # dropless top-k only: row of each assignment a = t*K + k
    weights_TK: Tensor | None = None  # fast path: the router's combine weights

    @property
    def dropped_fraction(self) -> float:
        return 1.0 - self.token_R.shape[0] / max(self.num_assignments, 1)


def _sum_over_k(x_TKD: Tensor) -> Tensor:
    """x_TKD.sum(1) as K-1 adds of contiguous [T, D] slices: a reduction over the middle dim
    strides through memory (measured slower, docs/benchmarks.md)."""
    out = x_TKD[:, 0]
    for k in range(1, x_TKD.shape[1]):
        out = out + x_TKD[:, k]
    return out


class _GatherTokens(torch.autograd.Function):
    """x_RD = x_TD[token_R] for dropless top-k: each token appears exactly K times.

    backward: grad_x_TD[t] = sum_k grad_RD[inverse_A[t*K + k]], a gather and K-1 adds
    (parallel and deterministic, unlike the scatter-add autograd would use).
    """

    @staticmethod
    def forward(ctx, x_TD: Tensor, token_R: Tensor, inverse_A: Tensor, top_k: int) -> Tensor:
        ctx.save_for_backward(inverse_A)
        ctx.top_k = top_k
        return x_TD.index_select(0, token_R)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_RD: Tensor):
        (inverse_A,) = ctx.saved_tensors
        grad_TKD = grad_RD.index_select(0, inverse_A).view(-1, ctx.top_k, grad_RD.shape[-1])
        return _sum_over_k(grad_TKD), None, None, None


class _CombineTopK(torch.autograd.Function):
    """y_TD[t] = sum_k weights_TK[t, k] * y_RD[inverse_A[t*K + k]], products and sum in float32.

    One gather, one cast to float32 (kept for the backward) and one batched [1, K] x [K, D]
    product; the result is rounded once, to the rows' dtype. backward: the weight
    gradient is a float32 dot product per (t, k); the row gradient is built directly in
    expert order, w_r * grad_y[token_r], by one gather and one multiply in the rows' dtype
    (for bf16 the weight is rounded to bf16 first: one extra rounding of a value that is
    stored in bf16 anyway, for a pass less over [R, D] than a float32 product).
    """

    @staticmethod
    def forward(ctx, y_RD: Tensor, weights_TK: Tensor, inverse_A: Tensor, token_R: Tensor,
                weight_R: Tensor) -> Tensor:
        T, K = weights_TK.shape
        y_TKD = y_RD.index_select(0, inverse_A).view(T, K, y_RD.shape[-1]).float()
        out_TD = y_TKD.new_empty(T, y_RD.shape[-1])   # not a view: the caller may modify it in place
        torch.bmm(weights_TK.unsqueeze(1), y_TKD, out=out_TD.unsqueeze(1))   # [T, 1, K] @ [T, K, D]
        ctx.save_for_backward(y_TKD, token_R, weight_R)
        return out_TD.to(y_RD.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_TD: Tensor):
        y_TKD, token_R, weight_R = ctx.saved_tensors
        grad_w_TK = grad_y_RD = None
        if ctx.needs_input_grad[1]:
            # [T, 1, D] @ [T, D, K]: a batched dot product in float32, in the operand layout
            # that measured fastest (docs/benchmarks.md) of it, [T, K, D] @ [T, D, 1] and a
            # multiply-and-sum
            grad_w_TK = torch.bmm(grad_TD.float().unsqueeze(1), y_TKD.transpose(1, 2)).squeeze(1)
        if ctx.needs_input_grad[0]:
            grad_y_RD = grad_TD.index_select(0, token_R) * weight_R.to(grad_TD.dtype).unsqueeze(1)
        return grad_y_RD, grad_w_TK, None, None, None


class LocalDispatcher:
    """Sort assignments by expert; apply capacity and the drop policy; combine.

    Capacity (Switch / GShard): C = ceil(capacity_factor * T * K / E) rows per expert.
    ``drop_policy="position"``: first choices of all tokens win over second choices, and
    within a choice rank the earlier token wins (GShard's priority). ``"probability"``:
    each expert keeps the C assignments with the highest combine weight.
    """

    def __init__(self, num_experts: int, top_k: int, capacity_factor: float | None = None,
                 drop_policy: str = "position"):
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor, self.drop_policy = capacity_factor, drop_policy

    def plan(self, routing: RouterOutput) -> DispatchPlan:
        E, T = self.num_experts, routing.num_tokens
        if routing.tokens_EC is not None:  # expert choice: already grouped by expert
            C = routing.tokens_EC.shape[1]
            return DispatchPlan(token_R=routing.tokens_EC.reshape(-1),
                                weight_R=routing.weights_EC.reshape(-1),
                                counts_E=torch.full((E,), C, dtype=torch.long,
                                                    device=routing.tokens_EC.device),
                                num_tokens=T, num_assignments=E * C)
        experts_TK, weights_TK = routing.experts_TK, routing.weights_TK
        K = experts_TK.shape[1]
        experts_A = experts_TK.reshape(-1)               # assignment a = t*K + k
        # a dynamic number of experts per token: slots holding expert id E (no expert) count in
        # the last bin, sort last and are never dispatched
        counts_X = torch.bincount(experts_A, minlength=E + 1)
        counts_E = counts_X[:E]
        # the assignments made: T * K, or T * mean k (one host sync, as capacity's)
        made = int(counts_E.sum()) if routing.dynamic else T * K
        if self.capacity_factor is None:
            order_R = torch.sort(experts_A, stable=True).indices
            if routing.dynamic:
                order_R = order_R[:made]
                return DispatchPlan(token_R=order_R // K, weight_R=weights_TK.reshape(-1)[order_R],
                                    counts_E=counts_E, num_tokens=T, num_assignments=made)
            inverse_A = torch.empty_like(order_R)
            inverse_A[order_R] = torch.arange(order_R.numel(), device=order_R.device)
            return DispatchPlan(token_R=order_R // K, weight_R=weights_TK.reshape(-1)[order_R],
                                counts_E=counts_E, num_tokens=T, num_assignments=T * K,
                                inverse_A=inverse_A, weights_TK=weights_TK)
        order_A = self._priority_order(experts_TK, weights_TK)
        starts_X = torch.cumsum(counts_X, 0) - counts_X
        expert_O = experts_A[order_A]
        rank_A = torch.arange(order_A.numel(), device=order_A.device) - starts_X[expert_O]
        C = slots(self.capacity_factor, made, E)   # = capacity(cf, T, K, E) for a fixed k
        order_R = order_A[(rank_A < C) & (expert_O < E)]
        return DispatchPlan(token_R=order_R // K, weight_R=weights_TK.reshape(-1)[order_R],
                            counts_E=counts_E.clamp(max=C), num_tokens=T, num_assignments=made)

    def _priority_order(self, experts_TK: Tensor, weights_TK: Tensor) -> Tensor:
        """Assignments (a = t*K + k) sorted by expert, most deserving of a slot first."""
        T, K = experts_TK.shape
        # k-major order: all first choices (in token order), then all second choices, ...
        kmajor_A = torch.arange(T * K, device=experts_TK.device).view(T, K).t().reshape(-1)
        if self.drop_policy == "probability":   # highest weight first; ties keep k-major order
            by_weight = torch.sort(weights_TK.detach().reshape(-1)[kmajor_A], descending=True, stable=True)
            kmajor_A = kmajor_A[by_weight.indices]
        by_expert = torch.sort(experts_TK.reshape(-1)[kmajor_A], stable=True).indices
        return kmajor_A[by_expert]

    def dispatch(self, x_TD: Tensor, routing: RouterOutput) -> tuple[Tensor, Tensor, DispatchPlan]:
        """x_TD [T, D] -> (x_RD [R, D] grouped by expert, counts_E [E], plan)."""
        plan = self.plan(routing)
        if plan.inverse_A is not None:
            x_RD = _GatherTokens.apply(x_TD, plan.token_R, plan.inverse_A, self.top_k)
        else:
            x_RD = x_TD.index_select(0, plan.token_R)
        return x_RD, plan.counts_E, plan

    def combine(self, y_RD: Tensor, plan: DispatchPlan) -> Tensor:
        """y_RD [R, D] -> y_TD [T, D]: sum over a token's rows of weight * y, in float32."""
        T, D = plan.num_tokens, y_RD.shape[-1]
        if plan.inverse_A is not None:
            return _CombineTopK.apply(y_RD, plan.weights_TK, plan.inverse_A, plan.token_R,
                                      plan.weight_R.detach())
        else:
            y_TD = torch.zeros(T, D, dtype=torch.float32, device=y_RD.device)
            y_TD = y_TD.index_add(0, plan.token_R, y_RD.float() * plan.weight_R.unsqueeze(1))
        return y_TD.to(y_RD.dtype)
