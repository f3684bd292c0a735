"""One MoE layer on one device: router -> dispatch -> experts -> combine."""

from moekit.moe.balance import load_balancing_loss, tokens_per_expert, z_loss
from moekit.moe.dispatch import DispatchPlan, LocalDispatcher
from moekit.moe.experts import DenseFFN, GroupedExperts
from moekit.moe.layer import MoEAux, MoELayer
from moekit.moe.reference import reference_moe
from moekit.moe.router import ExpertChoiceRouter, RouterOutput, TopKRouter

__all__ = [
    "DenseFFN", "DispatchPlan", "ExpertChoiceRouter", "GroupedExperts", "LocalDispatcher",
    "MoEAux", "MoELayer", "RouterOutput", "TopKRouter", "load_balancing_loss",
    "reference_moe", "tokens_per_expert", "z_loss",
]
