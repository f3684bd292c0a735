"""Scale-Up: a model becomes a wider and deeper one (EfficientScale; Net2Net, bert2BERT, G_stack).

    big = grow(model, d_ff=2048, n_heads=16)                  # FPI: the same function at step 0
    big = grow(model, d_model=1024)                           # 512 -> 1024, channels copied (fpi)
    big = grow(model, d_model=768, width_mode="zero")         # new residual channels start at zero
    big = grow(model, n_layers=32)                            # identity blocks inserted (depth zero)
    big = grow(model, n_layers=48, depth_mode="stack")        # the block sequence repeated (G_stack)

Every weight axis is, for the dimension that grows along it, the units' *own* (an FFN unit's
gate/up row, a head's q/k/v rows, a residual channel's embedding column, wo row, FFN/expert
down row) or a *reader* of them (down columns, wo columns, every matrix reading the residual
stream: wq/wk/wv, gate/up, routers, the shared gate, an untied LM head). ``_LAYOUT`` says which.

Width, ``width_mode="fpi"`` (function-preserving initialisation: Net2Net, Chen et al. 2016;
bert2BERT, Chen et al. 2022). A new unit copies a source unit in its own axes; the readers'
entries of a unit and its copies are split by random positive fractions (U(0.5, 1.5),
normalised, seeded) that sum to one: the function is the source's, and the copies get
different gradients, so they diverge. SwiGLU and GELU act per unit, so this is exact for FFN
units (dense, every expert alike, and the shared experts when their width follows d_ff).
Heads keep head_dim (RoPE unchanged): a new query head copies a head of its own kv group;
new kv groups copy old groups with their query heads (GQA grouping kept exact). d_model:
every channel gets k = d_model' / d_model copies, which keeps each RMSNorm statistic, so it
must be a multiple; tied embeddings would scale the logits by k, so the final norm gain is
divided by k.

``width_mode="zero"`` grows d_model by any amount: new residual channels are zero at step 0
(their embedding columns and writer rows zero), readers' new columns are small random
(N(0, 0.02): they read zeros, yet learn). The RMS over D' channels is sqrt(D/D') of the RMS
over D, and the norms' eps breaks a plain gain rescale, so the old channels are scaled by
c = sqrt(D'/D) (embedding and writers) which keeps every RMS statistic, eps included, and
the old gains by 1/c (new gains 1); tied embeddings divide the final gain by c once more.
FFN units and heads grow by FPI in this mode.

``width_mode="aki"`` (bert2BERT's advanced knowledge initialisation): the old weights stay
as they are; the new units' and channels' weights come from the next block's corresponding
weights (the next block that has that parameter: attention from block i + 1, experts from
the next MoE layer), the top one's from itself; embedding, final norm and LM head copy their
own. Not function-preserving.

Depth, after width: ``depth_mode="zero"`` inserts new blocks between the old ones, spread
evenly over the L - 1 gaps (:func:`block_plan`; first and last blocks stay first and last),
each a copy of the old block below it with its residual outputs (wo, FFN/expert/shared down)
zero: the identity at step 0. ``depth_mode="stack"`` (G_stack, Du et al. 2024) repeats the
whole block sequence (n_layers' a multiple); not function-preserving.

A dynamic number of experts per token (``MoEConfig.dynamic_k``) grows like any router: the
null experts' rows (``null_ND``) read the residual stream as the expert rows do, and the budget
controller's ``k_control`` is carried as it is, so fpi and zero keep the function there too.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.checks import is_int, require_float
from moekit.model.config import ModelConfig
from moekit.model.transformer import MoETransformer

WIDTH_MODES = ("fpi", "zero", "aki")
DEPTH_MODES = ("zero", "stack")
NEW_READER_STD = 0.02   # width_mode="zero": the readers' new input columns

# Per parameter (block parameters without "blocks.i."), per axis: None (never grows) or
# (dimension, role). Dimensions: D residual channels, F dense FFN units, X expert units,
# S shared-expert units, Q query heads, K kv heads. Roles: own (copied), read (split), gain.
OWN, READ, GAIN = "own", "read", "gain"
_LAYOUT = {
    "embed.weight": (None, ("D", OWN)),
    "norm.weight": (("D", GAIN),),
    "lm_head.weight": (None, ("D", READ)),
    "attn_norm.weight": (("D", GAIN),),
    "ffn_norm.weight": (("D", GAIN),),
    "attn.wq.weight": (("Q", OWN), ("D", READ)),
    "attn.wq.bias": (("Q", OWN),),
    "attn.wk.weight": (("K", OWN), ("D", READ)),
    "attn.wk.bias": (("K", OWN),),
    "attn.wv.weight": (("K", OWN), ("D", READ)),
    "attn.wv.bias": (("K", OWN),),
    "attn.wo.weight": (("D", OWN), ("Q", READ)),
    "attn.q_norm.weight": (None,),           # "head": over head_dim, which stays ("full": refused)
    "attn.k_norm.weight": (None,),
    "ffn.w_gate.weight": (("F", OWN), ("D", READ)),
    "ffn.w_up.weight": (("F", OWN), ("D", READ)),
    "ffn.w_down.weight": (("D", OWN), ("F", READ)),
    "ffn.router.weight_ED": (None, ("D", READ)),
    "ffn.router.noise_ED": (None, ("D", READ)),
    "ffn.router.expert_bias_E": (None,),     # the aux-loss-free bias: carried as it is
    "ffn.router.null_ND": (None, ("D", READ)),   # dynamic_k="null": the null experts' router rows
    "ffn.router.k_control": (),              # the budget controller's knob (a scalar): carried
    "ffn.experts.w_gate_EDF": (None, ("D", READ), ("X", OWN)),
    "ffn.experts.w_up_EDF": (None, ("D", READ), ("X", OWN)),
    "ffn.experts.w_down_EFD": (None, ("X", READ), ("D", OWN)),
    "ffn.shared.w_gate.weight": (("S", OWN), ("D", READ)),
    "ffn.shared.w_up.weight": (("S", OWN), ("D", READ)),
    "ffn.shared.w_down.weight": (("D", OWN), ("S", READ)),
    "ffn.shared_gate.weight": (None, ("D", READ)),
}
# the residual-branch outputs: zero in a new block makes it the identity (depth_mode="zero")
BRANCH_OUTPUTS = ("attn.wo.weight", "ffn.w_down.weight", "ffn.experts.w_down_EFD", "ffn.shared.w_down.weight")


def grow(model: MoETransformer, *, d_model: int | None = None, d_ff: int | None = None,
         expert_d_ff: int | None = None, n_heads: int | None = None, n_kv_heads: int | None = None,
         n_layers: int | None = None, width_mode: str = "fpi", depth_mode: str = "zero",
         seed: int = 0, _moments: bool = False) -> MoETransformer:
    """A new, larger MoETransformer made from ``model``: width first, then depth. The defaults
    (fpi, zero) compute the source's function at step 0; ``aki`` and ``stack`` do not.

    Example:
        >>> cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32)
        >>> small = MoETransformer.build(cfg).eval()
        >>> big = grow(small, d_model=32, d_ff=64, n_heads=4, n_layers=3).eval()
        >>> x = torch.randint(0, 64, (1, 8))
        >>> torch.allclose(big(x).logits, small(x).logits, atol=1e-5), big.cfg.d_model
        (True, 32)
    """
    require_float(model, "grow")
    wide, L2 = grown_config(model, d_model=d_model, d_ff=d_ff, expert_d_ff=expert_d_ff, n_heads=n_heads,
                            n_kv_heads=n_kv_heads, n_layers=n_layers, width_mode=width_mode,
                            depth_mode=depth_mode, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    out = _grow_width(model, wide, width_mode, gen, _moments) if wide != model.cfg else model
    if L2 > model.cfg.n_layers:
        out = _grow_depth(out, L2, depth_mode, _moments)
    return out


def grown_optimizer_state(optim: dict, model: MoETransformer, **grow_args) -> dict:
    """The AdamW state of ``model`` ({parameter name: {"step", "exp_avg", "exp_avg_sq"}}, a
    checkpoint's ``"optim"``) for ``grow(model, **grow_args)``, the same arguments and seed:
    moments mapped by the same index maps as the weights (a copied unit, head or channel gets
    its source's moments, split readers their unsplit source's), without the weights' scale
    factors; new entries (width_mode="zero"'s new channels and gains, a new block of
    depth_mode="zero") start at zero, and a parameter that is new as a whole has no state
    (AdamW starts it fresh). ``stack`` copies each block's state with the block; ``aki`` takes
    the donor block's moments where it takes its weights. Step counts are kept.

    At step 0 ``depth_mode="zero"`` leaves every old parameter's gradient as it was (a new
    block is the identity and passes the gradient through), so with this state the old
    parameters' next AdamW step is the small model's step (tests/transform/test_optimizer_state.py)."""
    from moekit.transform.moments import carry_moments
    return carry_moments(optim, model, lambda m: grow(m, _moments=True, **grow_args))


def grown_config(model: MoETransformer, *, d_model=None, d_ff=None, expert_d_ff=None, n_heads=None,
                 n_kv_heads=None, n_layers=None, width_mode="fpi", depth_mode="zero",
                 seed=0) -> tuple[ModelConfig, int]:
    """(the width-grown config, the new n_layers) :func:`grow` builds, after checking every
    argument (one line each)."""
    if not isinstance(model, MoETransformer):
        raise ValueError(f"grow: got a {type(model).__name__}, expected an MoETransformer; load one with "
                         "moekit.load_model")
    cfg, m = model.cfg, model.cfg.moe
    if width_mode not in WIDTH_MODES:
        raise ValueError(f"grow: width_mode={width_mode!r} is not one of {WIDTH_MODES}")
    if depth_mode not in DEPTH_MODES:
        raise ValueError(f"grow: depth_mode={depth_mode!r} is not one of {DEPTH_MODES}")
    if not is_int(seed):
        raise ValueError(f"grow: seed={seed!r} must be an integer")
    G = cfg.n_kv_heads or cfg.n_heads
    H2 = cfg.n_heads if n_heads is None else n_heads
    if n_kv_heads is None:   # a model without GQA stays without it
        n_kv_heads = H2 if cfg.n_kv_heads is None and is_int(H2) else G
    dims = {"d_model": (cfg.d_model, d_model), "d_ff": (cfg.d_ff, d_ff),
            "expert_d_ff": (m.d_ff if m else None, expert_d_ff), "n_heads": (cfg.n_heads, n_heads),
            "n_kv_heads": (G, n_kv_heads), "n_layers": (cfg.n_layers, n_layers)}
    new = {}
    for name, (now, want) in dims.items():
        if want is None:
            new[name] = now
            continue
        if now is None:
            raise ValueError(f"grow: expert_d_ff={want!r}, but the model is dense (no experts); grow "
                             "d_ff, or upcycle it first (moekit upcycle)")
        if not is_int(want) or want < now:
            raise ValueError(f"grow: {name}={want!r} must be an integer >= the model's {now}; grow only "
                             "grows (for a smaller model, train or distill one)")
        new[name] = want
    if all(new[k] == now for k, (now, _) in dims.items()):
        raise ValueError("grow: nothing to grow: every dimension given equals the model's; pass a larger "
                         "d_model, d_ff, expert_d_ff, n_heads, n_kv_heads or n_layers")
    _check_growth(model, cfg, new, width_mode, depth_mode)
    kv = None if cfg.n_kv_heads is None and new["n_kv_heads"] == new["n_heads"] else new["n_kv_heads"]
    wide = dataclasses.replace(
        cfg, d_model=new["d_model"], d_ff=new["d_ff"], n_heads=new["n_heads"], head_dim=cfg.head_dim,
        n_kv_heads=kv,
        moe=dataclasses.replace(m, d_model=new["d_model"], d_ff=new["expert_d_ff"]) if m else None)
    return wide, new["n_layers"]


def _check_growth(model: MoETransformer, cfg: ModelConfig, new: dict, width_mode: str,
                  depth_mode: str) -> None:
    """The refusals that depend on the model: each growth must be one :func:`grow` can make."""
    D, D2, L, L2 = cfg.d_model, new["d_model"], cfg.n_layers, new["n_layers"]
    H, G, H2, G2 = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, new["n_heads"], new["n_kv_heads"]
    if width_mode == "fpi" and D2 % D:
        raise ValueError(f"grow: d_model={D2} is not a multiple of {D}: width_mode='fpi' copies every "
                         "channel equally (RMSNorm's statistic); use a multiple, or width_mode='zero'")
    if new["d_ff"] != cfg.d_ff and len(cfg.moe_layer_ids()) == L:
        raise ValueError(f"grow: d_ff={new['d_ff']}, but every layer is MoE (no dense FFN); grow the "
                         "experts with expert_d_ff")
    if H2 % G2:
        raise ValueError(f"grow: n_heads={H2} is not a multiple of n_kv_heads={G2} (grouped-query "
                         "attention); pick n_heads a multiple of n_kv_heads")
    if (G2 // G) * (H2 // G2) < H // G:
        raise ValueError(f"grow: n_heads={H2}, n_kv_heads={G2} leave a kv group {H2 // G2} query heads, "
                         f"too few for the {H // G} of an old group copied once; use n_kv_heads a multiple "
                         f"of {G} or more query heads per group")
    if (H2, G2) != (H, G) and cfg.qk_norm == "full":
        raise ValueError("grow: qk_norm='full' normalises the whole q/k projection, so new heads change "
                         "its statistic; grow heads of a model with qk_norm 'head' or 'none'")
    if depth_mode == "stack" and L2 % L:
        raise ValueError(f"grow: n_layers={L2} is not a multiple of {L}: depth_mode='stack' repeats the "
                         "block sequence; use a multiple, or depth_mode='zero'")
    if any(layer.experts_sharded for layer in model.moe_layers().values()):
        raise ValueError("grow: the model's experts are sharded (expert parallelism); grow the full "
                         "model on one process")


def grow_is_exact(model: MoETransformer, grown: MoETransformer, width_mode: str,
                       depth_mode: str) -> bool:
    """True when ``grow(model, ...)`` with these modes computes ``model``'s function at step 0."""
    a, b = model.cfg, grown.cfg
    wider = dataclasses.replace(b, n_layers=a.n_layers, moe_layers=a.moe_layers) != a
    return not (wider and width_mode == "aki" or b.n_layers > a.n_layers and depth_mode == "stack")


def block_plan(n_layers: int, new_layers: int, depth_mode: str) -> list[tuple[int, bool]]:
    """(source block, whether new) for each block of the deeper model.

    ``zero``: the new blocks are spread over the L - 1 gaps between old blocks (rounded to the
    nearest, so they sit evenly and symmetrically); each copies the old block below it. A
    one-block model gets them on top. ``stack``: the block sequence repeated.

    Example:
        >>> block_plan(4, 5, "zero")
        [(0, False), (1, False), (1, True), (2, False), (3, False)]
        >>> block_plan(2, 4, "stack")
        [(0, False), (1, False), (0, True), (1, True)]
    """
    L, N = n_layers, new_layers - n_layers
    if depth_mode == "stack":
        return [(i, r > 0) for r in range(new_layers // L) for i in range(L)]
    gaps = max(L - 1, 1)
    before = [(2 * g * N + gaps) // (2 * gaps) for g in range(gaps + 1)]   # round(g * N / gaps)
    plan = []
    for i in range(L):
        plan.append((i, False))
        if i < gaps:
            plan += [(i, True)] * (before[i + 1] - before[i])
    return plan


@dataclass
class _Map:
    """How one dimension grows: new unit j copies source unit ``src[j]``; ``first[j]`` marks a
    source unit's own (original) place; ``size`` elements per unit (head_dim for heads)."""

    src: Tensor      # [n'] int64
    first: Tensor    # [n'] bool
    n_old: int
    size: int = 1

    @property
    def identity(self) -> bool:
        return len(self.src) == self.n_old and bool((self.src == torch.arange(self.n_old)).all())

    def _along(self, v_n: Tensor, axis: int, t: Tensor) -> Tensor:
        shape = [-1 if d == axis else 1 for d in range(t.dim())]
        return v_n.repeat_interleave(self.size).to(t.device).view(shape)

    def copy(self, t: Tensor, axis: int) -> Tensor:
        idx = (self.src[:, None] * self.size + torch.arange(self.size)).reshape(-1)
        return t.index_select(axis, idx.to(t.device))

    def split(self, t: Tensor, axis: int, gen: torch.Generator) -> Tensor:
        """Copies scaled by fresh positive fractions that sum to one over each unit's copies
        (a unit without copies keeps fraction 1 exactly)."""
        u = 0.5 + torch.rand(len(self.src), generator=gen, dtype=torch.float64)
        total = torch.zeros(self.n_old, dtype=torch.float64).index_add_(0, self.src, u)
        frac = (u / total[self.src]).to(t.dtype)
        return self.copy(t, axis) * self._along(frac, axis, t)


def _unit_map(n: int, n_new: int, gen: torch.Generator, cyclic: bool = False) -> _Map:
    """Units 0..n-1 stay; new ones copy random units (Net2Net), or j mod n when ``cyclic``."""
    if n_new == n:
        extra = torch.zeros(0, dtype=torch.long)
    else:
        extra = torch.arange(n, n_new) % n if cyclic else torch.randint(n, (n_new - n,), generator=gen)
    return _Map(torch.cat([torch.arange(n), extra]), torch.arange(n_new) < n, n)


def _head_maps(H: int, G: int, H2: int, G2: int, Dh: int, gen: torch.Generator) -> tuple[_Map, _Map]:
    """Query and kv head maps. New kv group g2 copies old group g2 mod G; an old group's query
    heads fill the first slots of its copies, in order, and the other slots copy random heads
    of that group, so every query head reads a copy of its own kv head."""
    r, r2 = H // G, H2 // G2
    group_src = torch.arange(G2) % G
    q_src, q_first = torch.empty(H2, dtype=torch.long), torch.zeros(H2, dtype=torch.bool)
    for g in range(G):
        slots = torch.tensor([g2 * r2 + j for g2 in range(g, G2, G) for j in range(r2)])
        assert len(slots) >= r, "checked in _check_growth"
        extra = torch.randint(r, (len(slots) - r,), generator=gen)
        q_src[slots] = g * r + torch.cat([torch.arange(r), extra])
        q_first[slots[:r]] = True
    return _Map(q_src, q_first, H, Dh), _Map(group_src, torch.arange(G2) < G, G, Dh)


def _layer_maps(cfg: ModelConfig, wide: ModelConfig, gen: torch.Generator) -> dict[str, _Map]:
    maps = {"F": _unit_map(cfg.d_ff, wide.d_ff, gen)}
    maps["Q"], maps["K"] = _head_maps(cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, wide.n_heads,
                                      wide.n_kv_heads or wide.n_heads, cfg.head_dim, gen)
    if cfg.moe is not None:
        maps["X"] = _unit_map(cfg.moe.d_ff, wide.moe.d_ff, gen)
        maps["S"] = _unit_map(cfg.moe.shared_width, wide.moe.shared_width, gen)
    return maps


def _build(cfg: ModelConfig, like: MoETransformer) -> MoETransformer:
    """A new model on ``like``'s device and in its mode; its random init (overwritten) leaves
    the caller's RNG as it was."""
    device = like.embed.weight.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        new = MoETransformer.build(cfg, device=device)
    return new.train(like.training)


def _grow_width(model: MoETransformer, wide: ModelConfig, mode: str, gen: torch.Generator,
                moments: bool = False) -> MoETransformer:
    cfg = model.cfg
    new = _build(wide, model)
    src = model.state_dict()
    maps = {"D": _unit_map(cfg.d_model, wide.d_model, gen, cyclic=True)}
    per_layer = [_layer_maps(cfg, wide, gen) for _ in range(cfg.n_layers)]
    with torch.no_grad():
        for name, t in new.state_dict().items():
            if cfg.tie_embeddings and name == "lm_head.weight":
                continue                          # the embedding, grown once
            hit = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
            block, key = (int(hit[1]), hit[2]) if hit else (None, name)
            assert key in _LAYOUT, f"grow has no layout for {name}"
            these = maps if block is None else {**maps, **per_layer[block]}
            if mode == "aki":
                donor = _next_block_tensor(src, block, key, cfg.n_layers) if block is not None else None
                grown = _aki(src[name].float(), donor, _LAYOUT[key], these)
            else:
                grown = _fpi(src[name].float(), _LAYOUT[key], these, mode, gen, moments)
            t.copy_(grown)
        D, D2 = cfg.d_model, wide.d_model
        if cfg.tie_embeddings and D2 != D and mode != "aki" and not moments:
            # the tied LM head reads k copies (fpi) or channels scaled by c (zero): undo it in the gain
            new.norm.weight.div_(D2 // D if mode == "fpi" else math.sqrt(D2 / D))
    return new


def _fpi(t: Tensor, layout: tuple, maps: dict[str, _Map], mode: str, gen: torch.Generator,
         moments: bool = False) -> Tensor:
    """One tensor grown along each axis: own axes copied, readers split; d_model in zero mode
    by :func:`_zero_channels`. ``moments``: optimizer moments, copied where weights are split
    and without scale factors, new entries zero (the same random draws: the same maps)."""
    for axis, spec in enumerate(layout):
        if spec is None or maps[spec[0]].identity:
            continue
        dim, role = spec
        m = maps[dim]
        if dim == "D" and mode == "zero":
            t = _zero_channels(t, axis, len(m.src), role, gen, moments)
        elif role == READ:
            split = m.split(t, axis, gen)
            t = m.copy(t, axis) if moments else split
        else:
            t = m.copy(t, axis)
    return t


def _zero_channels(t: Tensor, axis: int, n_new: int, role: str, gen: torch.Generator,
                   moments: bool = False) -> Tensor:
    """d_model D -> D' with new channels at zero: writers c * old and zeros, gains old / c and
    ones, readers old and small random (c = sqrt(D'/D) keeps every RMS, eps included).
    ``moments``: old as they are, new zero."""
    shape = list(t.shape)
    c = math.sqrt(n_new / shape[axis])
    shape[axis] = n_new - shape[axis]
    if moments:
        if role == READ:
            torch.randn(shape, generator=gen)     # the draw the weights take: the same maps after
        return torch.cat([t, t.new_zeros(shape)], dim=axis)
    if role == OWN:
        old, extra = t * c, t.new_zeros(shape)
    elif role == GAIN:
        old, extra = t / c, t.new_ones(shape)
    else:
        old, extra = t, (torch.randn(shape, generator=gen) * NEW_READER_STD).to(t)
    return torch.cat([old, extra], dim=axis)


def _next_block_tensor(src: dict[str, Tensor], block: int, key: str, n_layers: int) -> Tensor | None:
    """The same parameter of the next block that has one of the same shape (AKI), else None."""
    own = src[f"blocks.{block}.{key}"]
    for j in range(block + 1, n_layers):
        t = src.get(f"blocks.{j}.{key}")
        if t is not None and t.shape == own.shape:
            return t.float()
    return None


def _aki(t: Tensor, donor: Tensor | None, layout: tuple, maps: dict[str, _Map]) -> Tensor:
    """The source's weights where both indices are old units in their places, the donor's
    (next block's) mapped weights everywhere else; no donor: the tensor's own copies."""
    donor = t if donor is None else donor
    keep = None
    for axis, spec in enumerate(layout):
        if spec is None or maps[spec[0]].identity:
            continue
        m = maps[spec[0]]
        t, donor = m.copy(t, axis), m.copy(donor, axis)
        first = m._along(m.first, axis, t)
        keep = first if keep is None else keep & first
    return t if keep is None else torch.where(keep, t, donor)


def _grow_depth(model: MoETransformer, L2: int, mode: str, moments: bool = False) -> MoETransformer:
    cfg = model.cfg
    plan = block_plan(cfg.n_layers, L2, mode)
    moe_ids = set(cfg.moe_layer_ids())
    ids = [p for p, (i, _) in enumerate(plan) if i in moe_ids]
    layers = cfg.moe_layers if cfg.moe is None else ("all" if len(ids) == L2 else ids)
    new = _build(dataclasses.replace(cfg, n_layers=L2, moe_layers=layers), model)
    with torch.no_grad():
        state = new.state_dict()
        for name, t in model.state_dict().items():
            if not name.startswith("blocks."):
                state[name].copy_(t)
        for p, (i, fresh) in enumerate(plan):
            new.blocks[p].load_state_dict(model.blocks[i].state_dict())
            if fresh and mode == "zero":
                block_state = new.blocks[p].state_dict()
                for key in block_state if moments else BRANCH_OUTPUTS:   # moments: a new block
                    if key in block_state:
                        block_state[key].zero_()
    return new
