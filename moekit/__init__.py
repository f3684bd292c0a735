"""moekit: train Mixture-of-Experts models in PyTorch.

Example:
    >>> import torch
    >>> from moekit import MoEConfig, MoELayer
    >>> layer = MoELayer(MoEConfig(d_model=64, d_ff=128, num_experts=8, top_k=2))
    >>> y, aux = layer(torch.randn(4, 16, 64))
    >>> y.shape
    torch.Size([4, 16, 64])
"""

from moekit.config import MoEConfig
from moekit.moe import (
    DenseFFN,
    ExpertChoiceRouter,
    GroupedExperts,
    LocalDispatcher,
    MoEAux,
    MoELayer,
    RouterOutput,
    TopKRouter,
    reference_moe,
)

__version__ = "0.1.0"

__all__ = [
    "DenseFFN", "ExpertChoiceRouter", "GroupedExperts", "LocalDispatcher", "MoEAux",
    "MoEConfig", "MoELayer", "RouterOutput", "TopKRouter", "reference_moe",
]
