"""Sampling text from a model: greedy, temperature and top-k.

No KV cache yet: every new token recomputes the window of the last ``max_seq_len`` tokens.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from moekit.checks import is_int, is_real
from moekit.data.tokenizer import eos_id


def check_sampling(max_new_tokens: int, temperature: float, top_k: int,
                   names: tuple[str, str, str] = ("max_new_tokens", "temperature", "top_k")) -> None:
    """The sampling settings, each a one-line error under its own ``names`` (the CLI's flags)."""
    new, temp, k = names
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"{new}={max_new_tokens!r}: must be an integer >= 0")
    if not (is_real(temperature) and temperature >= 0):
        raise ValueError(f"{temp}={temperature!r}: must be a finite number >= 0 (0 = greedy)")
    if not is_int(top_k) or top_k < 0:
        raise ValueError(f"{k}={top_k!r}: must be an integer >= 0 (0 = no cut)")


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


@torch.no_grad()
def sample(model, ids: list[int], max_new_tokens: int, temperature: float = 0.8, top_k: int = 50,
           eos: int | None = None, tag: str | None = None) -> list[int]:
    """Autoregressive sampling: the new token ids (stopping after ``eos`` if it is drawn).

    ``temperature`` 0 is greedy (argmax); ``top_k`` 0 keeps the whole vocabulary. ``tag``: the
    text's tag (language, source), for a model that routes by tag (:func:`tag_index`).
    """
    check_sampling(max_new_tokens, temperature, top_k)
    if not ids:
        raise ValueError("sample: the prompt has no tokens; pass at least one id (e.g. end-of-text)")
    tag_id = tag_index(model, tag, "tag")
    S = model.cfg.max_seq_len
    device = next(model.parameters()).device
    tags = {} if tag_id is None else {"tags": torch.tensor([tag_id], device=device)}
    out = list(ids)
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([out[-S:]], device=device), **tags).logits[0, -1].float()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1))
        out.append(nxt)
        if nxt == eos:
            break
    return out[len(ids):]


def generate(model, tok: Tokenizer, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
             top_k: int = 50, seed: int | None = None, tag: str | None = None) -> str:
    """The prompt followed by what the model writes after it (an empty prompt starts from
    end-of-text). ``tag``: for a model that routes by tag, one of ``model.cfg.moe.route_tags``.

    Example:
        >>> model, tok = moekit.load_model("runs/e16")                     # doctest: +SKIP
        >>> generate(model, tok, "Mr Speaker,", max_new_tokens=20, temperature=0)   # doctest: +SKIP
    """
    tag_index(model, tag, "tag")      # before any work: a wrong tag is one line
    if seed is not None:
        torch.manual_seed(seed)
    eos = eos_id(tok, required=False)
    if not prompt and eos is None:
        raise ValueError("generate: an empty prompt starts from end-of-text, and this tokenizer has no "
                         "end-of-text token; give a prompt (--prompt)")
    ids = tok.encode(prompt).ids if prompt else [eos]
    return prompt + tok.decode(sample(model, ids, max_new_tokens, temperature, top_k, eos, tag))
