"""Expert parallelism: each of ``ep`` ranks holds E / ep experts; tokens travel to their
experts' rank and back with two all-to-alls.

Shape legend: T this rank's tokens, D model dim, E experts in all, L = E / ep local experts,
P = ep ranks in the expert-parallel group, R rows this rank sends (its dispatched
assignments), Q rows this rank receives (assignments to its local experts, from all ranks).

    dispatch: route locally -> sort rows by global expert (LocalDispatcher.plan)
              -> all-to-all of counts [P, L] -> all-to-all of rows (uneven splits)
              -> regroup received rows by local expert (they arrive grouped by source rank)
    experts:  the local GroupedExperts over [Q, D], counts [L]
    combine:  undo the regroup -> all-to-all back -> LocalDispatcher.combine

Autograd flows through both exchanges (``torch.distributed.nn.functional.all_to_all_single``).
A rank with no tokens, or experts with no rows, send and receive empty splits: no rank
waits on a message that never comes. Capacity, when set, is computed per source rank from
its own T (GShard's per-group capacity). The aux losses use, by default
(``MoEConfig.aux_loss_scope="local"``), each rank's own routing statistics: exactly what the
single-process layer computes on that rank's tokens. With ``aux_loss_scope="global"`` the
expert fractions f_i are all-reduced over every rank (parallelize gives each layer a
``StatsReducer``), so the mean of the ranks' load-balancing losses is what one process computes
on the global batch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.nn.functional import all_to_all_single as _all_to_all_single

from moekit.moe.dispatch import DispatchPlan, LocalDispatcher
from moekit.moe.layer import MoELayer
from moekit.moe.router import RouterOutput


def all_to_all_single(output: Tensor, input: Tensor, output_split_sizes: list[int],
                      input_split_sizes: list[int], group) -> Tensor:
    """The differentiable uneven all-to-all of ``torch.distributed.nn.functional`` (public;
    torch 2.13 marks it deprecated in favour of a private module, so the warning is muted)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return _all_to_all_single(output, input, output_split_sizes=output_split_sizes,
                                  input_split_sizes=input_split_sizes, group=group)


@dataclass
class ExpertParallelPlan:
    local: DispatchPlan          # this rank's tokens, sorted by global expert
    send_splits: list[int]       # rows to each rank
    recv_splits: list[int]       # rows from each rank
    regroup_Q: Tensor            # received row order -> grouped by local expert
    counts_L: Tensor             # rows per local expert

    @property
    def counts_E(self) -> Tensor:   # this rank's routing counts over all experts (for stats)
        return self.local.counts_E

    @property
    def dropped_fraction(self) -> float:
        return self.local.dropped_fraction

    @property
    def inverse_A(self):
        return self.local.inverse_A

    @property
    def token_R(self) -> Tensor:
        return self.local.token_R


class AllToAllDispatcher(LocalDispatcher):
    """The local dispatcher with an all-to-all in the middle; same interface."""

    def __init__(self, num_experts: int, top_k: int, capacity_factor: float | None, drop_policy: str,
                 group: dist.ProcessGroup | None = None):
        super().__init__(num_experts, top_k, capacity_factor, drop_policy)
        self.group = group
        self.ep = dist.get_world_size(group)
        if num_experts % self.ep:
            raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel degree "
                             f"ep={self.ep}; pick ep dividing the number of experts")
        self.num_local = num_experts // self.ep

    def dispatch(self, x_TD: Tensor, routing: RouterOutput) -> tuple[Tensor, Tensor, ExpertParallelPlan]:
        x_RD, counts_E, local = super().dispatch(x_TD, routing)
        P, L = self.ep, self.num_local
        send_PL = counts_E.view(P, L)
        recv_PL = torch.empty_like(send_PL)
        dist.all_to_all_single(recv_PL, send_PL.contiguous(), group=self.group)
        send_splits = send_PL.sum(1).tolist()
        recv_splits = recv_PL.sum(1).tolist()
        x_QD = all_to_all_single(x_RD.new_empty(sum(recv_splits), x_RD.shape[1]), x_RD,
                                 output_split_sizes=recv_splits, input_split_sizes=send_splits,
                                 group=self.group)
        # received rows: source rank major, local expert minor -> local expert major. A stable
        # sort by local expert keeps the source-rank order within each expert.
        expert_of_row = torch.arange(L, device=recv_PL.device).repeat(P).repeat_interleave(recv_PL.flatten())
        regroup_Q = torch.sort(expert_of_row, stable=True).indices
        plan = ExpertParallelPlan(local=local, send_splits=send_splits, recv_splits=recv_splits,
                                  regroup_Q=regroup_Q.to(x_TD.device), counts_L=recv_PL.sum(0))
        return x_QD.index_select(0, plan.regroup_Q), plan.counts_L, plan

    def combine(self, y_QD: Tensor, plan: ExpertParallelPlan) -> Tensor:
        ungrouped = torch.empty_like(y_QD).index_copy(0, plan.regroup_Q, y_QD)
        y_RD = all_to_all_single(y_QD.new_empty(sum(plan.send_splits), y_QD.shape[1]), ungrouped,
                                 output_split_sizes=plan.send_splits, input_split_sizes=plan.recv_splits,
                                 group=self.group)
        return super().combine(y_RD, plan.local)


def shard_experts(layer: MoELayer, group: dist.ProcessGroup | None = None) -> None:
    """Keep this rank's E / ep experts in ``layer`` and give it the all-to-all dispatcher
    (:meth:`MoELayer.keep_experts`; ``layer.expert_range`` then says which experts)."""
    cfg = layer.cfg
    if cfg.router == "expert_choice":      # also checked by check_layout; this is for direct callers
        raise ValueError("expert parallelism supports token-choice routers; router='expert_choice' "
                         "needs every token on every rank (use ep=1)")
    dispatcher = AllToAllDispatcher(cfg.num_experts, cfg.top_k, cfg.capacity_factor, cfg.drop_policy, group)
    lo = dist.get_rank(group) * dispatcher.num_local
    layer.keep_experts(lo, lo + dispatcher.num_local, dispatcher)
