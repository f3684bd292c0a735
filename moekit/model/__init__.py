"""The decoder-only MoE language model (single device; parallelized from outside)."""

from moekit.model.config import ModelConfig
from moekit.model.transformer import ModelOutput, MoETransformer, model_flops

__all__ = ["ModelConfig", "ModelOutput", "MoETransformer", "model_flops"]
