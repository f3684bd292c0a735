"""Sampling text from a model: a KV cache, batched prompts, greedy / temperature / top-k /
top-p sampling, stop on end-of-text.

    completions = sample_batch(model, [ids_a, ids_b], max_new_tokens=50, top_p=0.9, eos=eos)

The fast path prefills every prompt at once (left-padded, see
:class:`moekit.model.kv_cache.KVCache`) and then runs one token per sequence per step;
sequences that drew end-of-text leave the batch. The slow twin (``use_cache=False``)
recomputes each sequence's whole window for every token. Both draw from the same logits in
the same order, so greedy decoding gives the same tokens (tested on dense and MoE models).

Where they can differ: when the cache is full, a sequence within a quarter window of
``max_seq_len`` tokens restarts from its last half window (the other sequences keep all their
tokens), while the uncached path slides its window by one token per step from
``max_seq_len`` on; a router with capacity
(token dropping) or expert choice routes a step's tokens together, so its choices depend on
which tokens share the forward (the window vs one new token per sequence).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer
from torch import Tensor

from moekit.checks import is_int, is_real
from moekit.data.tokenizer import eos_id
from moekit.model.kv_cache import KVCache


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float = 1.0,
                   names: tuple[str, ...] = ("max_new_tokens", "temperature", "top_k", "top_p")) -> None:
    """The sampling settings, each a one-line error under its own ``names`` (the CLI's flags)."""
    new, temp, k, p = names
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"{new}={max_new_tokens!r}: must be an integer >= 0")
    if not (is_real(temperature) and temperature >= 0):
        raise ValueError(f"{temp}={temperature!r}: must be a finite number >= 0 (0 = greedy)")
    if not is_int(top_k) or top_k < 0:
        raise ValueError(f"{k}={top_k!r}: must be an integer >= 0 (0 = no cut)")
    if not (is_real(top_p) and 0 < top_p <= 1):
        raise ValueError(f"{p}={top_p!r}: must be in (0, 1] (1 = no cut; e.g. 0.9 keeps the most likely "
                         "tokens that together hold 90% of the probability)")


def tag_index(model, tag: str | None, flag: str = "--tag") -> int | None:
    """The index of ``tag`` in the routers' tags (``model.cfg.moe.route_tags``) for a model that
    routes by tag (task-level routing), where one is required; None for any other model, which
    takes none. A wrong, missing or needless tag is one line."""
    cfg = model.cfg
    if not cfg.routes_by_tag:
        if tag is not None:
            raise ValueError(f"{flag} {tag!r}: this model does not route by tag (model.moe.router_input is "
                             f"{'unset: a dense model' if cfg.moe is None else repr(cfg.moe.router_input)}); "
                             f"drop {flag}")
        return None
    known = cfg.moe.route_tags
    if tag is None and len(known) == 1:      # a model extracted for one tag: that tag
        return 0
    if tag not in known:
        given = f"{flag} {tag!r} is not one of its tags" if tag is not None else f"pass {flag}, one of"
        raise ValueError(f"this model routes by tag (model.moe.router_input={cfg.moe.router_input!r}): "
                         f"{given} {', '.join(known)}")
    return known.index(tag)


def next_tokens(logits_BV: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """One token per row [B]: argmax at ``temperature`` 0, else a draw from softmax(logits / T)
    cut to the ``top_k`` most likely tokens (0 = all) and then to the smallest set whose
    probability reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020; 1 = all)."""
    logits_BV = logits_BV.float()
    if temperature == 0:
        return logits_BV.argmax(-1)
    # shifted so the largest is 0 first: a tiny temperature then gives -inf, never inf - inf
    logits_BV = (logits_BV - logits_BV.max(-1, keepdim=True).values) / temperature
    if top_k:
        kth_B1 = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    probs_BV = torch.softmax(logits_BV, -1)
    if top_p < 1:
        sorted_BV, order_BV = probs_BV.sort(-1, descending=True)
        before_BV = sorted_BV.cumsum(-1) - sorted_BV          # mass of the more likely tokens
        sorted_BV = sorted_BV.masked_fill(before_BV >= top_p, 0.0)   # the most likely always stays
        probs_BV = torch.zeros_like(probs_BV).scatter_(-1, order_BV, sorted_BV)
    return torch.multinomial(probs_BV, 1, generator=generator)[:, 0]


def _tag_ids(model, tags, batch: int, device) -> Tensor | None:
    """tags (one name for all rows, or one per row) -> [B] indices, or None (no tag routing)."""
    names = tags if isinstance(tags, (list, tuple)) else [tags] * batch
    if len(names) != batch:
        raise ValueError(f"tags: {len(names)} tags for {batch} prompts; give one tag, or one per prompt")
    ids = [tag_index(model, t, "tag") for t in names]
    return None if ids[0] is None else torch.tensor(ids, device=device)


class _Cached:
    """The cached decoder: prefill the live rows' contexts, then one token per row per step."""

    def __init__(self, model, rows: list[list[int]], tags_B: Tensor | None, budget: int):
        self.model, self.tags_B = model, tags_B
        p = next(model.parameters())
        self.dtype, self.device = (p.dtype if p.dtype.is_floating_point else torch.float32), p.device
        self.budget = budget   # tokens still to generate: the cache's room
        self.cache = None
        self.prefill(rows)

    def prefill(self, rows: list[list[int]], keep: list[int] | None = None) -> None:
        """A new cache holding each row's last ``keep[b]`` tokens (default: as many as fit)."""
        S_max = self.model.cfg.max_seq_len
        ctx = [r[-(keep[b] if keep else S_max):] for b, r in enumerate(rows)]
        longest = max(len(c) for c in ctx)
        pad_B = torch.tensor([longest - len(c) for c in ctx], device=self.device)
        filler = ctx[0][0]
        tokens = torch.tensor([[filler] * (longest - len(c)) + c for c in ctx], device=self.device)
        capacity = min(S_max, longest + self.budget)
        self.cache = KVCache.empty(self.model.cfg, len(rows), max(capacity, longest), pad_B,
                                   self.dtype, self.device)
        self.last_BV = self._forward(tokens)[:, -1]

    def _forward(self, tokens_BS: Tensor) -> Tensor:
        tags = {} if self.tags_B is None else {"tags": self.tags_B}
        return self.model(tokens_BS, cache=self.cache, **tags).logits

    def step(self, new_B: Tensor, rows: list[list[int]]) -> None:
        """Feed each live row's new token (``rows``: the live rows, the new token included)."""
        self.budget -= 1
        if self.cache.length == self.cache.capacity:
            # full: a row within a quarter window of max_seq_len restarts from its last half
            # window; the others keep every token (their output stays the uncached one). So a
            # restart leaves at least a quarter window of room: no re-prefill every few steps
            S_max = self.model.cfg.max_seq_len
            near = S_max - max(1, S_max // 4)
            self.prefill(rows, keep=[len(r) if len(r) < near else max(1, S_max // 2) for r in rows])
        else:
            self.last_BV = self._forward(new_B[:, None])[:, -1]

    def keep(self, alive: Tensor) -> None:
        """Only the rows ``alive`` (a bool mask over the live rows) stay in the batch."""
        c = self.cache
        c.k = [k[alive] for k in c.k]
        c.v = [v[alive] for v in c.v]
        c.pad_B, self.last_BV = c.pad_B[alive], self.last_BV[alive]
        if self.tags_B is not None:
            self.tags_B = self.tags_B[alive]


class _Uncached:
    """The slow twin: every row's window recomputed for every token."""

    def __init__(self, model, rows: list[list[int]], tags_B: Tensor | None, budget: int):
        self.model, self.tags_B = model, tags_B
        self.device = next(model.parameters()).device
        self.step(None, rows)

    def step(self, new_B, rows: list[list[int]]) -> None:
        S = self.model.cfg.max_seq_len
        logits = []
        for b, row in enumerate(rows):
            tags = {} if self.tags_B is None else {"tags": self.tags_B[b:b + 1]}
            logits.append(self.model(torch.tensor([row[-S:]], device=self.device), **tags).logits[0, -1])
        self.last_BV = torch.stack(logits)

    def keep(self, alive: Tensor) -> None:
        if self.tags_B is not None:
            self.tags_B = self.tags_B[alive]


@torch.no_grad()
def sample_batch(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.8,
                 top_k: int = 50, top_p: float = 1.0, eos: int | None = None, tags=None,
                 use_cache: bool = True, generator: torch.Generator | None = None,
                 on_step=None) -> list[list[int]]:
    """The new token ids of each prompt (each stops after ``eos`` once it is drawn).
    ``on_step``: called after every decoding step (a progress bar's update).

    ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 cut nothing (:func:`next_tokens`).
    ``tags``: a tag name for every prompt, or one per prompt, for a model that routes by tag.
    ``use_cache=False``: the slow twin that recomputes every window (the module docstring).
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if not prompts or any(not p for p in prompts):
        raise ValueError("sample: a prompt has no tokens; pass at least one id each (e.g. end-of-text)")
    device = next(model.parameters()).device
    tags_B = _tag_ids(model, tags, len(prompts), device)
    out = [list(p) for p in prompts]
    live = list(range(len(prompts)))          # indices of the rows still generating
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    dec = (_Cached if use_cache else _Uncached)(model, out, tags_B, max_new_tokens)
    for t in range(max_new_tokens):
        new_B = next_tokens(dec.last_BV, temperature, top_k, top_p, generator)
        for b, tok in zip(live, new_B.tolist()):
            out[b].append(tok)
        if on_step is not None:
            on_step()
        alive = new_B != eos if eos is not None else torch.ones_like(new_B, dtype=torch.bool)
        if t == max_new_tokens - 1 or not bool(alive.any()):
            break
        if not bool(alive.all()):
            dec.keep(alive)
            live = [b for b, a in zip(live, alive.tolist()) if a]
            new_B = new_B[alive]
        dec.step(new_B, [out[b] for b in live])
    return [row[len(p):] for row, p in zip(out, prompts)]


def sample(model, ids: list[int], max_new_tokens: int, temperature: float = 0.8, top_k: int = 50,
           eos: int | None = None, tag: str | None = None, top_p: float = 1.0,
           use_cache: bool = True) -> list[int]:
    """One prompt's new token ids (:func:`sample_batch` with one row, the global RNG)."""
    return sample_batch(model, [ids], max_new_tokens, temperature, top_k, top_p, eos, tag, use_cache)[0]


def generate(model, tok: Tokenizer, prompt: str | list[str], max_new_tokens: int = 100,
             temperature: float = 0.8, top_k: int = 50, seed: int | None = None, tag=None,
             top_p: float = 1.0, use_cache: bool = True, counts: list | None = None,
             on_step=None) -> str | list[str]:
    """The prompt followed by what the model writes after it (an empty prompt starts from
    end-of-text); a list of prompts is generated as one batch and gives a list. ``tag``: for a
    model that routes by tag, one of ``model.cfg.moe.route_tags`` (or one per prompt).
    ``counts``: a list that is filled with each prompt's number of new tokens; ``on_step``:
    called after each new token (of every prompt still going).

    Example:
        >>> model, tok = moekit.load_model("runs/e16")                     # doctest: +SKIP
        >>> generate(model, tok, "Mr Speaker,", max_new_tokens=20, temperature=0)   # doctest: +SKIP
    """
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    _tag_ids(model, tag, len(texts), "cpu")      # before any work: a wrong tag is one line
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    generator = torch.Generator(next(model.parameters()).device)
    generator.manual_seed(seed if seed is not None else torch.initial_seed())
    eos = eos_id(tok, required=False)
    if any(not t for t in texts) and eos is None:
        raise ValueError("generate: an empty prompt starts from end-of-text, and this tokenizer has no "
                         "end-of-text token; give a prompt (--prompt)")
    ids = [tok.encode(t).ids if t else [eos] for t in texts]
    new = sample_batch(model, ids, max_new_tokens, temperature, top_k, top_p, eos, tag, use_cache, generator,
                       on_step)
    if counts is not None:
        counts[:] = [len(n) for n in new]
    outs = [t + tok.decode(n) for t, n in zip(texts, new)]
    return outs[0] if isinstance(prompt, str) else outs
