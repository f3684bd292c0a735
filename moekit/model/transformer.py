"""Decoder-only language model with a dense or MoE FFN per layer.

Shape legend: B batch, S sequence, D model dim, H query heads, G key/value heads,
Dh head dim, V vocabulary, E experts.

    tokens_BS -> embed -> [RMSNorm -> causal self-attention (RoPE, SDPA, GQA) -> +residual
                           RMSNorm -> dense SwiGLU FFN or MoELayer -> +residual] x n_layers
              -> RMSNorm -> lm_head -> logits_BSV

Attention options (ModelConfig): q/k/v biases, q/k RMSNorm per head or over the whole
projection, and a head_dim of its own (the Qwen2, Qwen3 and OLMoE layouts).

Dropout (``ModelConfig.dropout``, training only; 0 adds no op): on the embeddings and on the
attention and FFN/MoE outputs before each residual add (T5 / Switch Transformer); dropout
inside the experts is ``MoEConfig.expert_dropout``.

The model returns its aux losses and per-layer routing statistics as values
(:class:`ModelOutput`); nothing is kept in globals. It never imports torch.distributed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moekit.model.config import ModelConfig
from moekit.model.kv_cache import KVCache
from moekit.moe.config import MoEConfig  # noqa: F401  (MoEConfig: the doctests)
from moekit.moe.experts import DenseFFN, GroupedExperts
from moekit.moe.layer import MoEAux, MoELayer, moe_layers


@dataclass
class ModelOutput:
    logits: Tensor                     # [B, S, V]
    aux_loss: Tensor                   # sum over MoE layers of the load-balancing loss
    z_loss: Tensor                     # sum over MoE layers of the router z-loss
    moe: dict[int, MoEAux]             # per MoE layer: statistics (layer index -> aux)
    sparsity_loss: Tensor | None = None   # relu routing: sum over layers of coef x L1 (added as is)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()   # the norm statistic in float32 whatever the activation dtype
        normed = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight.to(x.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[Tensor, Tensor]:
    """cos, sin [S, Dh/2] for rotary embeddings (Su et al. 2021), in float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles_SF = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles_SF.cos(), angles_SF.sin()


def apply_rope(x_BHSD: Tensor, cos_SF: Tensor, sin_SF: Tensor) -> Tensor:
    """Rotate pairs (first half, second half) of each head's dims (the Llama/NeoX layout).
    ``cos_SF``/``sin_SF``: the tables from position 0 ([S', F], S' >= S), or each row's own
    positions already gathered ([B, 1, S, F], cached generation)."""
    x1, x2 = x_BHSD.float().chunk(2, dim=-1)
    if cos_SF.dim() == 2:
        cos, sin = cos_SF[: x_BHSD.shape[2]], sin_SF[: x_BHSD.shape[2]]
    else:
        cos, sin = cos_SF, sin_SF
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x_BHSD.dtype)


class Attention(nn.Module):
    """Causal self-attention with RoPE and grouped-query heads. Options (ModelConfig):
    ``qkv_bias`` (Qwen2); ``qk_norm`` "head" normalises each head's q and k over Dh (Qwen3),
    "full" the whole q and k projections (OLMoE), both before RoPE, as Hugging Face does."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.qk_norm = cfg.qk_norm
        Dh = cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * Dh, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, self.n_kv_heads * Dh, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, self.n_kv_heads * Dh, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * Dh, cfg.d_model, bias=False)
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(Dh, cfg.norm_eps), RMSNorm(Dh, cfg.norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(cfg.n_heads * Dh, cfg.norm_eps)
            self.k_norm = RMSNorm(self.n_kv_heads * Dh, cfg.norm_eps)

    def forward(self, x_BSD: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None,
                layer: int = 0, mask: Tensor | None = None) -> Tensor:
        """With ``cache``: x holds the next S slots of every row; their keys and values are
        written to the cache's ``layer`` and the queries attend to all filled slots under
        ``mask`` (:meth:`KVCache.mask`)."""
        B, S, _ = x_BSD.shape
        q, k, v = self.wq(x_BSD), self.wk(x_BSD), self.wv(x_BSD)   # [B, S, H*Dh], [B, S, G*Dh] x 2
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q_BSHD = q.view(B, S, self.n_heads, -1)
        k_BSGD = k.view(B, S, self.n_kv_heads, -1)
        if self.qk_norm == "head":
            q_BSHD, k_BSGD = self.q_norm(q_BSHD), self.k_norm(k_BSGD)
        q_BHSD, k_BGSD = q_BSHD.transpose(1, 2), k_BSGD.transpose(1, 2)
        v_BGSD = v.view(B, S, self.n_kv_heads, -1).transpose(1, 2)
        q_BHSD, k_BGSD = apply_rope(q_BHSD, cos, sin), apply_rope(k_BGSD, cos, sin)
        gqa = self.n_kv_heads != self.n_heads
        if cache is None:
            out_BHSD = F.scaled_dot_product_attention(q_BHSD, k_BGSD, v_BGSD, is_causal=True, enable_gqa=gqa)
        else:
            end = cache.length + S
            cache.k[layer][:, :, cache.length:end] = k_BGSD
            cache.v[layer][:, :, cache.length:end] = v_BGSD
            out_BHSD = F.scaled_dot_product_attention(q_BHSD, cache.k[layer][:, :, :end],
                                                      cache.v[layer][:, :, :end], attn_mask=mask,
                                                      enable_gqa=gqa)
        return self.wo(out_BHSD.transpose(1, 2).reshape(B, S, -1))

    def reset_parameters(self, std: float, out_std: float) -> None:
        """q, k, v N(0, std), biases zero, q/k norms one; the output projection N(0, out_std)."""
        for lin in (self.wq, self.wk, self.wv):
            if isinstance(lin, nn.Linear):      # quantized projections are loaded, not drawn
                nn.init.normal_(lin.weight, std=std)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        if isinstance(self.wo, nn.Linear):
            nn.init.normal_(self.wo.weight, std=out_std)
        if self.qk_norm != "none":
            self.q_norm.reset_parameters()
            self.k_norm.reset_parameters()


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """F.dropout in training mode with p > 0; otherwise ``x`` itself (no extra op)."""
    return F.dropout(x, p, training=True) if training and p > 0 else x


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.dropout_p = cfg.dropout
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoELayer(cfg.moe) if moe else DenseFFN(cfg.d_model, cfg.d_ff)

    def forward(self, x_BSD: Tensor, cos: Tensor, sin: Tensor, tags_T: Tensor | None = None,
                cache: KVCache | None = None, layer: int = 0,
                mask: Tensor | None = None) -> tuple[Tensor, MoEAux | None]:
        """``tags_T`` [B*S]: each token's route tag, for an MoE layer that routes by tag;
        ``cache``, ``layer``, ``mask``: cached generation (:class:`KVCache`)."""
        p, training = self.dropout_p, self.training
        x_BSD = x_BSD + dropout(self.attn(self.attn_norm(x_BSD), cos, sin, cache, layer, mask), p, training)
        h = self.ffn_norm(x_BSD)
        if isinstance(self.ffn, MoELayer):   # generation (a cache) needs no routing statistics
            h = self.ffn(h, tags_T, stats=cache is None)
        else:
            h = self.ffn(h)
        h, aux = h if isinstance(h, tuple) else (h, None)
        return x_BSD + dropout(h, p, training), aux


class MoETransformer(nn.Module):
    """Example:
        >>> cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=2, d_ff=64,
        ...                   moe_layers="alternate", moe=MoEConfig(d_model=32, d_ff=32, num_experts=4))
        >>> model = MoETransformer(cfg)
        >>> out = model(torch.randint(0, 97, (2, 10)))
        >>> out.logits.shape, sorted(out.moe), sorted(model.moe_layers())
        (torch.Size([2, 10, 97]), [1], [1])
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = False   # set by the trainer (TrainConfig.activation_checkpointing)
        moe_ids = set(cfg.moe_layer_ids())
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i in moe_ids) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta,
                               device=self.embed.weight.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if self.embed.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialize every parameter and buffer in place (also after ``to_empty`` from meta).

        Embeddings N(0, 0.02); linear layers N(0, 0.02) (the shared-expert gate too), with
        the residual output projections (attention out, FFN down) scaled by 1/sqrt(2 * n_layers)
        (GPT-2); q/k/v biases zero, norms one; experts and routers use their own fan-in init."""
        std = 0.02
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.embed.weight, std=std)
        for block in self.blocks:
            block.attn_norm.reset_parameters()
            block.ffn_norm.reset_parameters()
            block.attn.reset_parameters(std, out_std)
            if isinstance(block.ffn, MoELayer):
                block.ffn.router.reset_parameters()
                if isinstance(block.ffn.experts, GroupedExperts):   # quantized experts are loaded, not drawn
                    block.ffn.experts.reset_parameters()
                    nn.init.normal_(block.ffn.experts.w_down_EFD, std=out_std)
                if block.ffn.shared_gate is not None:
                    nn.init.normal_(block.ffn.shared_gate.weight, std=std)
                shared = block.ffn.shared
            else:
                shared = block.ffn
            if shared is not None:
                for lin in (shared.w_gate, shared.w_up):
                    if lin is not None:
                        nn.init.normal_(lin.weight, std=std)
                nn.init.normal_(shared.w_down.weight, std=out_std)
        self.norm.reset_parameters()
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        cos, sin = rope_tables(self.cfg.max_seq_len, self.cfg.head_dim, self.cfg.rope_theta,
                               device=self.embed.weight.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def moe_layers(self) -> dict[int, MoELayer]:
        """{block index: MoE layer}, the keys of :attr:`ModelOutput.moe`."""
        return {int(name.split(".")[0]): layer for name, layer in moe_layers(self.blocks).items()}

    def _apply(self, fn, recurse=True):
        # .to(torch.bfloat16) would round the rotary tables: recompute them in float32 instead
        # (a dtype-preserving move, including to_empty, keeps what it got)
        super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32:
            cos, sin = rope_tables(self.cfg.max_seq_len, self.cfg.head_dim, self.cfg.rope_theta,
                                   device=self.rope_cos.device)
            self.rope_cos, self.rope_sin = cos, sin
        return self

    @classmethod
    def build(cls, cfg: ModelConfig, device: torch.device | str = "cpu",
              structure: Callable[[MoETransformer], object] | None = None) -> MoETransformer:
        """Create on the meta device, then allocate once on ``device`` and initialize:
        a large model never exists twice in memory. ``structure`` changes the empty model's
        modules before they are allocated (a quantized model's: moekit.store.build_model);
        the model itself knows no transformation."""
        if cfg.quant is not None and structure is None:
            raise ValueError(f"model.quant={cfg.quant}: a quantized model is built with its structure; "
                             "use moekit.store.run_dir.build_model(cfg) (or load it with moekit.load_model)")
        with torch.device("meta"):
            model = cls(cfg)
            if structure is not None:
                structure(model)
        model.to_empty(device=device)
        if cfg.tie_embeddings:   # to_empty gives tied parameters separate storage: tie again
            model.lm_head.weight = model.embed.weight
        model.init_weights()
        return model

    def _tags(self, tokens_BS: Tensor, tags: Tensor | None) -> Tensor | None:
        """tags [B] (one per sequence) or [B, S] -> tags_T [B*S], for routers that read them;
        None for a model that routes by token only (any ``tags`` are then ignored)."""
        if not self.cfg.routes_by_tag:
            return None
        if tags is None:
            raise ValueError(f"this model routes by tag (model.moe.router_input="
                             f"{self.cfg.moe.router_input!r}): pass tags, e.g. moekit generate --tag NAME")
        tags = torch.as_tensor(tags, device=tokens_BS.device)
        B, S = tokens_BS.shape
        integer = not (tags.dtype.is_floating_point or tags.dtype.is_complex or tags.dtype == torch.bool)
        if not integer or tuple(tags.shape) not in ((B,), (B, S)):
            raise ValueError(f"tags: got {tags.dtype} of shape {tuple(tags.shape)}, expected integer indices "
                             f"into model.moe.route_tags of shape [B]=[{B}] or [B, S]=[{B}, {S}]")
        return (tags[:, None] if tags.dim() == 1 else tags).expand(B, S).reshape(-1).long()

    def forward(self, tokens_BS: Tensor, tags: Tensor | None = None,
                cache: KVCache | None = None) -> ModelOutput:
        """``tags``: [B] or [B, S] indices into ``cfg.moe.route_tags`` (each sequence's language
        or source), needed when the model routes by tag (:attr:`ModelConfig.routes_by_tag`).
        ``cache``: the tokens are the next slots of the sequences held in a :class:`KVCache`
        (cached generation), which this call fills and advances; such a forward computes no
        routing statistics or aux losses (``out.moe`` is empty, the losses are 0)."""
        S = tokens_BS.shape[1]
        if S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds ModelConfig.max_seq_len="
                             f"{self.cfg.max_seq_len}; raise max_seq_len or feed shorter sequences")
        tags_T = self._tags(tokens_BS, tags)
        cos, sin, mask = self.rope_cos, self.rope_sin, None
        if cache is not None:
            if cache.length + S > cache.capacity or tokens_BS.shape[0] != cache.pad_B.shape[0]:
                raise ValueError(f"KVCache: {tokens_BS.shape[0]} rows of {S} tokens after {cache.length} "
                                 "do not "
                                 f"fit a cache of {cache.pad_B.shape[0]} rows and {cache.capacity} slots; "
                                 "make a larger cache")
            pos_BS = cache.positions(S)
            cos, sin, mask = self.rope_cos[pos_BS][:, None], self.rope_sin[pos_BS][:, None], cache.mask(S)
        x_BSD = dropout(self.embed(tokens_BS), self.cfg.dropout, self.training)
        zero = x_BSD.new_zeros((), dtype=torch.float32)
        aux_loss, z_loss, sparsity, stats = zero, zero, zero, {}
        for i, block in enumerate(self.blocks):
            if cache is not None:
                x_BSD, aux = block(x_BSD, cos, sin, tags_T, cache, i, mask)
            elif self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # keep only the block's input; recompute its activations in backward (the RNG
                # state is replayed, so jitter, noise and dropout recompute identically)
                x_BSD, aux = checkpoint(block, x_BSD, self.rope_cos, self.rope_sin, tags_T,
                                        use_reentrant=False)
            else:
                x_BSD, aux = block(x_BSD, self.rope_cos, self.rope_sin, tags_T)
            if aux is not None:
                aux_loss = aux_loss + aux.load_balancing_loss
                z_loss = z_loss + aux.z_loss
                sparsity = sparsity + aux.sparsity_loss
                stats[i] = aux
        if cache is not None:
            cache.length += S
        logits_BSV = self.lm_head(self.norm(x_BSD))
        return ModelOutput(logits=logits_BSV, aux_loss=aux_loss, z_loss=z_loss, moe=stats,
                           sparsity_loss=sparsity)


def route_tag_ids(cfg: ModelConfig, names: list[str], tags: Tensor) -> Tensor:
    """A split's tag indices (into its own tag ``names``) as indices into the router's
    ``cfg.moe.route_tags``, matched by name: a mixture source's split knows only its own tag.

    Example:
        >>> moe = MoEConfig(d_model=8, d_ff=8, router_input="tag", route_tags=["de", "en"])
        >>> cfg = ModelConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=2, d_ff=8, moe=moe)
        >>> route_tag_ids(cfg, ["en"], torch.tensor([0, 0])).tolist()
        [1, 1]
    """
    known = cfg.moe.route_tags
    lookup = torch.tensor([known.index(n) if n in known else -1 for n in names], dtype=torch.long)
    ids = lookup[torch.as_tensor(tags, dtype=torch.long).cpu()]
    if bool((ids < 0).any()):
        unknown = sorted({names[int(i)] for i, n in zip(torch.as_tensor(tags).cpu().reshape(-1),
                                                         ids.reshape(-1)) if n < 0})
        raise ValueError(f"the data's tag {unknown[0]!r} is not one the model routes by "
                         f"(model.moe.route_tags={known}); use data with those tags")
    return ids


def tag_kwargs(cfg: ModelConfig, names: list[str], tags: Tensor, device=None) -> dict:
    """The forward's ``tags=`` for a batch of a split whose tag indices point into ``names``:
    ``{"tags": ...}`` (:func:`route_tag_ids`, on ``device``) for a model that routes by tag,
    else ``{}``."""
    if not cfg.routes_by_tag:
        return {}
    return {"tags": route_tag_ids(cfg, names, tags).to(device)}


def count_params(model) -> int:
    """Every parameter of ``model`` (quantized weights are buffers: not counted)."""
    return sum(p.numel() for p in model.parameters())


def model_flops(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
    """Parameters (total and active per token) and training FLOPs per token.

    Active parameters = total minus the experts a token does not use ((E - k) experts per
    MoE layer, k = ``MoEConfig.nominal_k``: top_k, or with a dynamic k the budget's target_k,
    else its most experts per token, an upper bound; the measured mean is in the telemetry):
    embeddings, norms, biases and routers count in both, so a dense model's active
    count is its total (OLMoE, DeepSeek-MoE and Mixtral count the same way).
    FLOPs per token = 6 * (active matmul parameters) + 12 * n_layers * n_heads * head_dim * seq_len
    (attention scores and values, forward + backward; PaLM appendix B / nanoGPT's MFU; n_heads *
    head_dim is d_model unless head_dim is set).
    Embedding lookups cost no FLOPs; the LM head is a matmul and counts.
    """
    S = seq_len or cfg.max_seq_len
    D, L = cfg.d_model, cfg.n_layers
    kv = cfg.n_kv_heads or cfg.n_heads
    q_width, kv_width = cfg.n_heads * cfg.head_dim, kv * cfg.head_dim
    attn = 2 * D * q_width + 2 * D * kv_width               # wq, wo, wk, wv
    # not matmuls (no FLOPs counted, like the RMSNorm weights): q/k/v biases, q/k norms
    attn_extra = (q_width + 2 * kv_width) * cfg.qkv_bias
    attn_extra += {"none": 0, "head": 2 * cfg.head_dim, "full": q_width + kv_width}[cfg.qk_norm]
    n_ffn_mats = 3                                          # SwiGLU: gate, up, down
    dense_ffn = n_ffn_mats * D * cfg.d_ff
    moe_ids = set(cfg.moe_layer_ids())
    total = matmul = unused = 0
    for i in range(L):
        total += attn + attn_extra + 2 * D
        matmul += attn
        if i in moe_ids:
            m = cfg.moe
            mats = 3 if m.activation == "swiglu" else 2
            expert = mats * D * m.d_ff
            # "tag": a table lookup, no matmul; null experts (dynamic_k="null") have router rows too
            router_mm = m.num_experts * D * (m.router_input != "tag") + m.num_null_experts * D
            N = len(m.route_tags or ())                               # tag tables (task-level routing)
            tags = N * (m.num_experts if m.router_input == "tag" else D) * (m.router_input != "token")
            router = router_mm + m.num_experts * D * m.noisy_gating + tags
            shared = mats * D * m.shared_width + D * m.shared_gate
            total += m.num_experts * expert + router + shared
            matmul += m.nominal_k * expert + shared + router_mm
            unused += (m.num_experts - min(m.nominal_k, m.num_experts)) * expert
        else:
            total += dense_ffn
            matmul += dense_ffn
    head = cfg.vocab_size * D
    embed = 0 if cfg.tie_embeddings else cfg.vocab_size * D
    total += head + embed + D
    matmul += head
    flops_per_token = 6 * matmul + 12 * L * q_width * S
    return {"params_total": float(total), "params_active": float(total - unused),
            "params_matmul_active": float(matmul), "flops_per_token": float(flops_per_token)}
