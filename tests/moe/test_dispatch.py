"""LocalDispatcher: the combine's numerics (the routing it plans is held to the reference in
test_fast_vs_reference.py)."""

import torch

from moekit.moe.dispatch import DispatchPlan, LocalDispatcher


def test_combine_multiplies_and_sums_in_float32():
    torch.manual_seed(0)
    T, K, D = 64, 2, 16
    y_RD = (torch.randn(T * K, D) * torch.logspace(-3, 3, D)).to(torch.bfloat16)
    weights_TK = torch.softmax(torch.randn(T, K), -1)
    order_R = torch.randperm(T * K)
    inverse_A = torch.empty_like(order_R)
    inverse_A[order_R] = torch.arange(T * K)
    plan = DispatchPlan(token_R=order_R // K, weight_R=weights_TK.reshape(-1)[order_R],
                        counts_E=torch.tensor([T * K]), num_tokens=T, num_assignments=T * K,
                        inverse_A=inverse_A, weights_TK=weights_TK)
    out = LocalDispatcher(1, K).combine(y_RD, plan)
    y_TKD = y_RD[inverse_A].view(T, K, D).float()
    exact = (y_TKD * weights_TK.unsqueeze(-1)).sum(1)       # float32 products and sum
    assert torch.equal(out, exact.to(torch.bfloat16))      # rounded once, at the end
