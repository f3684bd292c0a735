"""moekit: train Mixture-of-Experts models in PyTorch.

Example:
    >>> import torch
    >>> from moekit import MoEConfig, MoELayer
    >>> layer = MoELayer(MoEConfig(d_model=64, d_ff=128, num_experts=8, top_k=2))
    >>> y, aux = layer(torch.randn(4, 16, 64))
    >>> y.shape
    torch.Size([4, 16, 64])
"""

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
from moekit.moe.config import MoEConfig

__version__ = "0.1.0"


def load_model(path):
    """(model in eval mode, tokenizer) of a run directory or a ``moekit export`` directory:
    whatever ``moekit train`` (or a command that makes a model) wrote.

    Example:
        >>> model, tok = moekit.load_model("runs/e16")   # doctest: +SKIP
    """
    from moekit.store.run_dir import load_model as _load
    return _load(path)


__all__ = [
    "DenseFFN", "ExpertChoiceRouter", "GroupedExperts", "LocalDispatcher", "MoEAux",
    "MoEConfig", "MoELayer", "RouterOutput", "TopKRouter", "load_model", "reference_moe",
]
