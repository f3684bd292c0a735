"""One MoE layer on one device: router -> dispatch -> experts -> combine."""

from moekit.moe.balance import StatsReducer, load_balancing_loss, tokens_per_expert, z_loss
from moekit.moe.dispatch import DispatchPlan, LocalDispatcher
from moekit.moe.experts import DenseFFN, GroupedExperts
from moekit.moe.layer import MoEAux, MoELayer, moe_layers
from moekit.moe.reference import reference_moe
from moekit.moe.router import ExpertChoiceRouter, RouterOutput, TopKRouter

__all__ = [
    "DenseFFN", "DispatchPlan", "ExpertChoiceRouter", "GroupedExperts", "LocalDispatcher",
    "MoEAux", "MoELayer", "RouterOutput", "StatsReducer", "TopKRouter", "load_balancing_loss",
    "moe_layers", "reference_moe", "tokens_per_expert", "z_loss",
]
