"""Weight-only quantization of a trained model: int8 or packed int4 experts (and attention).

Shape legend: R rows grouped by expert, D model dim, F expert hidden dim, E experts,
I / O a weight's input (reduction) and output dims, P stored input rows (I for int8, I/2 for
int4: two 4-bit values per byte), G groups along the input dim (I / group_size).

Scheme, decided here once:

- symmetric, group-wise along the input dim: each run of ``group_size`` consecutive input-dim
  weights of one output column (of one expert) shares one float32 scale
  ``s = max|w| / ((qmax - qmin) / 2)`` and ``q = clamp(round(w / s), qmin, qmax)``, with
  [qmin, qmax] = [-128, 127] (int8) or [-8, 7] (int4); ``w ~ q * s`` and ``|w - q s| <= s/2``.
  Symmetric because trained weights are centred on zero group by group: no zero point to store,
  and dequantization is one multiply. This is torchao's ``MappingType.SYMMETRIC``
  (``choose_qparams_affine`` / ``quantize_affine``), bit for bit; the tests hold it to torchao.
- int4 packs two values per uint8 (q + 8 in each nibble, input rows 2i low and 2i+1 high).
- scales in float32: 4 / group_size bytes per weight (1/16 at 64), against 1/32 for bfloat16
  scales that would round each scale by up to 0.4%.
  Bytes per weight at group 64: int8 1 + 1/16 (0.266x of float32), int4 1/2 + 1/16 (0.141x).
- weights are stored input dim first like the float experts (``w_up_EDF``), attention too
  (``weight_q_PO`` is ``nn.Linear.weight.t()``); the rest of the model (embeddings, norms,
  routers, dense FFNs, shared experts, LM head) stays float: ``init_weights`` draws the dense
  FFNs' ``nn.Linear`` weights after a build, so they must stay ``nn.Linear``.

Inference only: every tensor of a quantized module is a buffer (nothing to train); a forward
with ``x`` requiring grad works and gives input gradients, the weights being constants.

torchao 0.18 on this CPU (torch 2.13): ``quantize_(Int8WeightOnlyConfig())`` and
``IntxWeightOnlyConfig(torch.int4, PerGroup(32))`` work on an ``nn.Linear``, but their weights
are tensor subclasses (``Int8Tensor``, ``IntxUnpackedToInt8Tensor``: int4 held unpacked, one
int8 each) that ``safetensors.save_file`` refuses ("Attempted to access the data pointer on an
invalid python storage"); ``Int4WeightOnlyConfig`` raises "ImportError: Requires mslk >= 1.0.0".
On a 3-D expert weight ``IntxWeightOnlyConfig`` raises "ValueError: IntxWeightOnlyConfig only
works for 2-d and 4-d Tensors, got: 3"; ``Int8WeightOnlyConfig`` quantizes it, but
``torch._grouped_mm`` and per-expert ``mm`` both raise "NotImplementedError: Int8Tensor
dispatch: attempting to run unimplemented operator/function: func=aten.transpose.int"
(``aten.t.default`` for ``w[e].t()``). Its primitives (``choose_qparams_affine``,
``quantize_affine``, ``dequantize_affine``) work on 3-D weights, but torchao is not a moekit
dependency and costs ~1.5 s and .so-load warnings at import, so the few lines they compute are
written here in torch and the tests compare them with torchao where it is installed.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from moekit.checks import bad
from moekit.model.config import ModelConfig, check_quant  # noqa: F401  (ModelConfig: the doctests)
from moekit.model.transformer import Attention, MoETransformer
from moekit.moe.config import MoEConfig
from moekit.moe.experts import (
    HAS_GROUPED_MM,
    GroupedExperts,
    _grouped_ffn,
    _SegmentFFN,
    auto_backend,
    expert_loop,
)
from moekit.moe.layer import moe_layers

# experts dequantized at once in a forward: at most this many float32 bytes of their weights
DEQUANT_BUDGET_BYTES = 256 * 2**20
_OWN = "quantize_model"
_PROJECTIONS = ("wq", "wk", "wv", "wo")


def qrange(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def quantize_weight(w_XIO: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor]:
    """w [..., I, O] float -> (q [..., P, O] int8 or packed uint8, scale [..., G, O] float32).

    Example:
        >>> q, s = quantize_weight(torch.randn(2, 8, 3), bits=4, group_size=4)
        >>> q.dtype, tuple(q.shape), tuple(s.shape)
        (torch.uint8, (2, 4, 3), (2, 2, 3))
    """
    *lead, I, O = w_XIO.shape
    qmin, qmax = qrange(bits)
    w_XGgO = w_XIO.float().reshape(*lead, I // group_size, group_size, O)
    scale_XGO = w_XGgO.abs().amax(dim=-2) / ((qmax - qmin) / 2)
    scale_XGO = scale_XGO.clamp_min(torch.finfo(torch.float32).smallest_normal)
    q_XGgO = torch.clamp(torch.round(w_XGgO * (1.0 / scale_XGO.unsqueeze(-2))), qmin, qmax)
    q_XIO = q_XGgO.to(torch.int8).reshape(*lead, I, O)
    return (pack_int4(q_XIO) if bits == 4 else q_XIO), scale_XGO


def dequantize_weight(q_XPO: Tensor, scale_XGO: Tensor, bits: int,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """The inverse of :func:`quantize_weight`: w [..., I, O] = q * scale, computed in float32."""
    q_XIO = unpack_int4(q_XPO) if bits == 4 else q_XPO
    *lead, I, O = q_XIO.shape
    G = scale_XGO.shape[-2]
    w_XGgO = q_XIO.reshape(*lead, G, I // G, O).to(torch.float32).mul_(scale_XGO.unsqueeze(-2))
    return w_XGgO.reshape(*lead, I, O).to(dtype)


def pack_int4(q_XIO: Tensor) -> Tensor:
    """int8 values in [-8, 7], I even -> uint8 [..., I/2, O]: row 2i in the low nibble, 2i+1 high."""
    u_XIO = (q_XIO + 8).to(torch.uint8)
    return u_XIO[..., 0::2, :] | (u_XIO[..., 1::2, :] << 4)


def unpack_int4(p_XPO: Tensor) -> Tensor:
    """uint8 [..., I/2, O] -> int8 [..., I, O] in [-8, 7]."""
    lo, hi = p_XPO & 0xF, p_XPO >> 4
    *lead, P, O = p_XPO.shape
    return (torch.stack((lo, hi), dim=-2).reshape(*lead, 2 * P, O).to(torch.int8) - 8)


def _register(module: nn.Module, name: str, shape: tuple[int, ...], bits: int, group_size: int) -> None:
    """Empty buffers ``{name}_q`` [..., P, O] and ``{name}_scale`` [..., G, O] for a weight of
    ``shape`` [..., I, O] (on the current default device: meta under a build)."""
    *lead, I, O = shape
    qdtype, rows = (torch.uint8, I // 2) if bits == 4 else (torch.int8, I)
    module.register_buffer(f"{name}_q", torch.empty(*lead, rows, O, dtype=qdtype))
    module.register_buffer(f"{name}_scale", torch.empty(*lead, I // group_size, O, dtype=torch.float32))


class QuantizedExperts(nn.Module):
    """:class:`GroupedExperts` with int8 / int4 weights (buffers ``w_{gate,up}_q`` [E, P, F],
    ``w_{gate,up}_scale`` [E, G, F] over D, ``w_down_q`` [E, P, D], ``w_down_scale`` [E, G, D]
    over F); same forward and attributes (``activation``, ``backend``, ``expert_dropout``,
    :meth:`weights`), and ``num_experts``, ``d_model``, ``d_ff`` for the shapes. There is no
    ``w_up_EDF``: code that reads or writes the float parameters fails loudly here instead of
    writing into a dequantized copy (use ``weights(dtype)``).

    The forward reads counts_E on the host (one sync, as ``segment_mm`` does) and dequantizes
    the experts that got rows, ``chunk_experts`` (C) at a time, C * mats * D * F * 4 <=
    DEQUANT_BUDGET_BYTES (mats = 3 SwiGLU, 2 GELU), running the backend on each chunk's rows.
    Peak transient float memory: the chunk's weights in x's dtype, C * mats * D * F *
    x.element_size(), plus one float32 [C, D, F] being scaled (and for int4 about 4 bytes per
    weight of one [C, D, F] of unpacking temporaries). ``.to(torch.bfloat16)`` on the module
    rounds its float32 scales too: move it with ``.to(device)`` only.

    Example:
        >>> cfg = MoEConfig(d_model=16, d_ff=32, num_experts=4)
        >>> q = QuantizedExperts.from_float(GroupedExperts(cfg), bits=4, group_size=8)
        >>> q(torch.randn(10, 16), torch.tensor([3, 0, 7, 0])).shape
        torch.Size([10, 16])
    """

    def __init__(self, cfg: MoEConfig, bits: int, group_size: int):
        super().__init__()
        self.activation, self.backend = cfg.activation, cfg.backend
        self.expert_dropout = cfg.expert_dropout
        self.bits, self.group_size, self.dtype = bits, group_size, cfg.dtype
        self.num_experts, self.d_model, self.d_ff = E, D, F_ = cfg.num_experts, cfg.d_model, cfg.d_ff
        self.names = (("w_gate",) if cfg.activation == "swiglu" else ()) + ("w_up", "w_down")
        for name in self.names:
            _register(self, name, (E, F_, D) if name == "w_down" else (E, D, F_), bits, group_size)
        self.chunk_experts = max(1, DEQUANT_BUDGET_BYTES // (len(self.names) * D * F_ * 4))

    @classmethod
    @torch.no_grad()
    def from_float(cls, experts: GroupedExperts, bits: int, group_size: int) -> QuantizedExperts:
        E, D, F_ = experts.w_up_EDF.shape
        cfg = MoEConfig(d_model=D, d_ff=F_, num_experts=E, top_k=1, activation=experts.activation,
                        backend=experts.backend, expert_dropout=experts.expert_dropout,
                        dtype=experts.w_up_EDF.dtype)
        with torch.device(experts.w_up_EDF.device):
            q = cls(cfg, bits, group_size)
        for name, w in zip(("w_gate", "w_up", "w_down"), experts.weights(torch.float32)):
            if w is not None:
                q_EPO, scale_EGO = quantize_weight(w, bits, group_size)
                getattr(q, f"{name}_q").copy_(q_EPO)
                getattr(q, f"{name}_scale").copy_(scale_EGO)
        return q

    def weights(self, dtype: torch.dtype, experts: slice | Tensor = slice(None)) -> tuple[Tensor | None, ...]:
        """(w_gate, w_up, w_down) of ``experts`` (all by default), dequantized to ``dtype``."""
        out = {n: dequantize_weight(getattr(self, f"{n}_q")[experts], getattr(self, f"{n}_scale")[experts],
                                    self.bits, dtype) for n in self.names}
        return out.get("w_gate"), out["w_up"], out["w_down"]

    def resolve_backend(self, x_RD: Tensor) -> str:
        if self.backend != "auto":
            return self.backend
        align = max(1, 16 // x_RD.element_size())
        aligned = self.d_model % align == 0 and self.d_ff % align == 0
        if x_RD.device.type == "cuda":          # as GroupedExperts: the grouped kernel's GPUs and dtype
            return auto_backend("cuda", torch.cuda.get_device_capability(x_RD.device), x_RD.dtype, aligned)
        compiling = torch.compiler.is_compiling()   # as GroupedExperts: traced _grouped_mm is bf16-only
        return "grouped_mm" if HAS_GROUPED_MM and aligned and not compiling else "segment_mm"

    def _check(self, x_RD: Tensor, counts: list[int]) -> None:
        if sum(counts) != x_RD.shape[0]:
            raise ValueError(f"QuantizedExperts: counts_E sums to {sum(counts)} but x_RD has "
                             f"{x_RD.shape[0]} rows; counts must cover every row exactly")
        if self.training and self.expert_dropout > 0:
            raise ValueError(f"QuantizedExperts is inference-only (expert_dropout={self.expert_dropout} "
                             "needs training mode); call model.eval(), or train the float model")
        if any(getattr(self, f"{n}_scale").requires_grad for n in self.names):
            raise ValueError("QuantizedExperts: its weights are quantized constants and take no gradient; "
                             "fine-tune the float model (dequantize_model) instead")

    def forward(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        """x_RD [R, D] grouped by expert with counts_E [E] rows each -> y_RD [R, D]."""
        counts = counts_E.tolist()
        self._check(x_RD, counts)
        backend = self.resolve_backend(x_RD)
        used = [e for e, n in enumerate(counts) if n]
        outs, start = [], 0
        for i in range(0, len(used), self.chunk_experts):
            ids = used[i:i + self.chunk_experts]
            sub = [counts[e] for e in ids]
            x_rD = x_RD[start:start + sum(sub)]
            w = self.weights(x_RD.dtype, torch.tensor(ids, device=x_RD.device))
            if backend == "grouped_mm":
                outs.append(_grouped_ffn(x_rD, torch.tensor(sub, device=x_RD.device), *w))
            elif backend in ("segment_mm", "padded_mm"):   # inference: no padding needed
                outs.append(_SegmentFFN.apply(x_rD, *w, sub, None))
            else:
                outs.append(expert_loop(x_rD, torch.tensor(sub), *w))
            start += sum(sub)
        return torch.cat(outs) if outs else x_RD.new_zeros(0, self.d_model)


class QuantizedLinear(nn.Module):
    """An ``nn.Linear`` with int8 / int4 weights: buffers ``weight_q`` [P, O], ``weight_scale``
    [G, O] over in_features (the weight stored input dim first, ``weight.t()``), float ``bias``
    [O] or None. y = x @ dequant(W_IO) + bias, in x's dtype; each forward dequantizes the whole
    weight (O * I elements in x's dtype, transient)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        _register(self, "weight", (in_features, out_features), bits, group_size)
        self.register_buffer("bias", torch.empty(out_features) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_float(cls, lin: nn.Linear, bits: int, group_size: int) -> QuantizedLinear:
        with torch.device(lin.weight.device):
            q = cls(lin.in_features, lin.out_features, lin.bias is not None, bits, group_size)
        q_PO, scale_GO = quantize_weight(lin.weight.t(), bits, group_size)
        q.weight_q.copy_(q_PO)
        q.weight_scale.copy_(scale_GO)
        if lin.bias is not None:
            q.bias.copy_(lin.bias)
        return q

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight [O, I] as ``nn.Linear`` holds it."""
        return dequantize_weight(self.weight_q, self.weight_scale, self.bits, dtype).t()

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return nn.functional.linear(x, self.dequantized(x.dtype), bias)


def _check_spec(model: MoETransformer, spec: dict) -> None:
    """The refusals, each one line naming the field, the value and the fix."""
    if spec["bits"] not in (8, 4):
        raise bad(_OWN, "bits", spec["bits"], "must be 8 or 4", "pass bits=8 (int8) or bits=4 (packed int4)")
    check_quant(spec)
    cfg = model.cfg
    if cfg.moe is None and not spec["attention"]:
        raise bad(_OWN, "attention", False, "a dense model (cfg.moe=None) has no experts to quantize",
                  "pass attention=True, or quantize an MoE model")
    dims = {"d_model": cfg.d_model}
    if cfg.moe is not None:
        dims["moe.d_ff"] = cfg.moe.d_ff
    if spec["attention"]:
        dims["n_heads * head_dim"] = cfg.n_heads * cfg.head_dim
    for name, dim in dims.items():
        if dim % spec["group_size"]:
            raise bad(_OWN, "group_size", spec["group_size"], f"does not divide {name}={dim} (an input dim "
                      "it groups)", f"pass a group_size that divides {sorted(set(dims.values()))}")


def quantize_structure(model: MoETransformer, spec: dict) -> MoETransformer:
    """Replace, in place, each MoE layer's experts (and with ``spec["attention"]`` each attention
    projection) by an empty quantized module of the same shapes; works on the meta device (the
    loader builds this, then ``load_state_dict`` fills it). Returns ``model``."""
    _check_spec(model, spec)
    bits, gs = spec["bits"], spec["group_size"]
    for layer in moe_layers(model).values():
        layer.experts = QuantizedExperts(layer.cfg, bits, gs)
    if spec["attention"]:
        for attn in _attentions(model).values():
            for name in _PROJECTIONS:
                lin = getattr(attn, name)
                with torch.device(lin.weight.device):
                    q = QuantizedLinear(lin.in_features, lin.out_features, lin.bias is not None, bits, gs)
                setattr(attn, name, q)
    return model


def _attentions(model: nn.Module) -> dict[str, Attention]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Attention)}


def _quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantizedExperts, QuantizedLinear))}


def _without(state: dict, prefixes) -> dict:
    return {k: v for k, v in state.items() if not any(k.startswith(p + ".") for p in prefixes)}


@torch.no_grad()
def quantize_model(model: MoETransformer, bits: int, group_size: int = 64,
                   attention: bool = False) -> MoETransformer:
    """A new model (``model`` is not changed) whose MoE experts (and, with ``attention``, the
    attention projections wq, wk, wv, wo) hold int8 or int4 weights; ``cfg.quant`` records it, so
    ``moekit.store.run_dir.build_model(q.cfg)`` + ``load_state_dict(q.state_dict())`` rebuilds it. The float
    rest is built in the config's dtype (float32) and copied.

    Example:
        >>> cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64,
        ...                   moe=MoEConfig(d_model=32, d_ff=32, num_experts=4))
        >>> q = quantize_model(MoETransformer(cfg), bits=4, group_size=32)
        >>> type(q.blocks[0].ffn.experts).__name__, q.cfg.quant["bits"]
        ('QuantizedExperts', 4)
    """
    spec = {"bits": bits, "group_size": group_size, "attention": attention}
    if model.cfg.quant is not None:
        raise bad(_OWN, "model.cfg.quant", model.cfg.quant, "the model is already quantized",
                  "quantize the float model, or dequantize_model(model) first")
    _check_spec(model, spec)
    for name, layer in moe_layers(model).items():
        if not isinstance(layer.experts, GroupedExperts) or layer.experts_sharded:
            raise ValueError(f"quantize_model: the experts of {name} are sharded or not GroupedExperts "
                             "(LoRA adapters?); quantize the full model, after merge_lora")
    new = MoETransformer.build(dataclasses.replace(model.cfg, quant=spec), device=model.embed.weight.device,
                               structure=lambda m: quantize_structure(m, spec))
    quantized = {f"{name}.experts": QuantizedExperts.from_float(layer.experts, bits, group_size)
                 for name, layer in moe_layers(model).items()}
    for name, attn in (_attentions(model).items() if attention else ()):
        for proj in _PROJECTIONS:
            quantized[f"{name}.{proj}"] = QuantizedLinear.from_float(getattr(attn, proj), bits, group_size)
    state = _without(model.state_dict(), quantized)
    for name, m in quantized.items():
        state.update({f"{name}.{k}": v for k, v in m.state_dict().items()})
    new.load_state_dict(state)
    return new.train(model.training)


@torch.no_grad()
def dequantize_model(model: MoETransformer) -> MoETransformer:
    """A new float model (``cfg.quant = None``) holding the dequantized weights: the reference a
    quantized model equals, and what ``moekit export --format hf`` writes."""
    if model.cfg.quant is None:
        raise bad("dequantize_model", "model.cfg.quant", None, "the model is not quantized",
                  "pass a model from quantize_model or one loaded with cfg.quant set")
    cfg = dataclasses.replace(model.cfg, quant=None)
    new = MoETransformer.build(cfg, device=model.embed.weight.device)
    qmods = _quantized_modules(model)
    state = _without(model.state_dict(), qmods)
    for name, m in qmods.items():
        if isinstance(m, QuantizedExperts):
            gate, up, down = m.weights(m.dtype)
            state.update({f"{name}.w_up_EDF": up, f"{name}.w_down_EFD": down})
            if gate is not None:
                state[f"{name}.w_gate_EDF"] = gate
        else:
            state[f"{name}.weight"] = m.dequantized()
            if m.bias is not None:
                state[f"{name}.bias"] = m.bias
    new.load_state_dict(state)
    return new.train(model.training)


def quantized_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's state by kind: "quantized" (int8 / packed int4 values), "scales",
    "float" (every other tensor: embeddings, norms, routers, dense FFNs...) and "total"; a tensor
    tied to another (the LM head) counts once.

    Example:
        >>> q = QuantizedExperts(MoEConfig(d_model=64, d_ff=64, num_experts=2), bits=8, group_size=64)
        >>> quantized_bytes(q)
        {'quantized': 24576, 'scales': 1536, 'float': 0, 'total': 26112}
    """
    out = {"quantized": 0, "scales": 0, "float": 0}
    seen = set()
    qnames = {f"{p}.{k}" if p else k for p, m in _quantized_modules(model).items()
              for k, _ in m.named_buffers(recurse=False)}
    for name, t in model.state_dict(keep_vars=True).items():
        if t is None or (t.data_ptr(), t.shape) in seen:
            continue
        seen.add((t.data_ptr(), t.shape))
        kind = "float"
        if name in qnames:
            kind = "scales" if name.endswith("_scale") else "quantized" if name.endswith("_q") else "float"
        out[kind] += t.numel() * t.element_size()
    out["total"] = sum(out.values())
    return out
