"""The key/value cache of cached generation (:mod:`moekit.serve.generate`).

Shape legend: B rows (sequences), G key/value heads, L slots (capacity), Dh head dim, S new slots.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.model.config import ModelConfig


class KVCache:
    """Every layer's keys and values for B sequences, with room for ``capacity`` positions
    (cached generation: :mod:`moekit.serve.generate`).

    Rows are left-padded to a common length: row b's first ``pad_B[b]`` slots are padding, its
    tokens sit at positions 0, 1, ... from slot ``pad_B[b]`` on (RoPE sees each row's own
    positions) and no query attends to a padding slot (a padding slot attends to itself only,
    so nothing is NaN). ``length``: the slots filled so far, the same for every row.

    Example:
        >>> from moekit.model.transformer import MoETransformer
        >>> cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=2, d_ff=64)
        >>> model = MoETransformer(cfg).eval()
        >>> x = torch.randint(0, 97, (1, 6))
        >>> cache = KVCache.empty(cfg, 1, 8)
        >>> a = model(x[:, :4], cache=cache).logits; b = model(x[:, 4:], cache=cache).logits
        >>> torch.allclose(torch.cat([a, b], 1), model(x).logits, atol=1e-5), cache.length
        (True, 6)
    """

    def __init__(self, k: list[Tensor], v: list[Tensor], pad_B: Tensor):
        self.k, self.v, self.pad_B = k, v, pad_B
        self.length = 0

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, capacity: int, pad_B: Tensor | None = None,
              dtype: torch.dtype = torch.float32, device=None) -> KVCache:
        if capacity > cfg.max_seq_len:
            raise ValueError(f"KVCache capacity {capacity} exceeds ModelConfig.max_seq_len="
                             f"{cfg.max_seq_len}; "
                             "the model has no rotary positions past it")
        G = cfg.n_kv_heads or cfg.n_heads
        shape = (batch, G, capacity, cfg.head_dim)
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        pad = torch.zeros(batch, dtype=torch.long, device=device) if pad_B is None else pad_B.to(device)
        return cls(k, v, pad)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def positions(self, S: int) -> Tensor:
        """[B, S] rotary positions of the next S slots (0 on a padding slot)."""
        slots = torch.arange(self.length, self.length + S, device=self.pad_B.device)
        return (slots[None, :] - self.pad_B[:, None]).clamp(min=0)

    def mask(self, S: int) -> Tensor:
        """[B, 1, S, length + S]: query slot i may see key slot j <= i that is not padding."""
        q = torch.arange(self.length, self.length + S, device=self.pad_B.device)[:, None]
        k = torch.arange(self.length + S, device=self.pad_B.device)[None, :]
        real = k[None] >= self.pad_B[:, None, None]
        return ((k <= q)[None] & (real | (k == q)[None]))[:, None]
