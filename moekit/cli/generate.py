"""moekit generate: sample text from a trained run."""

from __future__ import annotations

from pathlib import Path

import torch


def register(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a run")
    p.add_argument("run_dir")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


@torch.no_grad()
def sample(model, ids: list[int], max_new_tokens: int, temperature: float, top_k: int,
           eos: int | None) -> list[int]:
    """Autoregressive sampling (no KV cache: the small models here recompute the window)."""
    if temperature < 0 or top_k < 0:
        raise ValueError(f"temperature={temperature}, top_k={top_k}: must be >= 0 (0 = greedy / no cut)")
    S = model.cfg.max_seq_len
    out = list(ids)
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([out[-S:]])).logits[0, -1].float()
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


def run(args) -> int:
    from moekit.data.tokenizer import eos_id
    from moekit.train.trainer import load_run
    model, tok, _ = load_run(Path(args.run_dir))
    torch.manual_seed(args.seed)
    eos = eos_id(tok)
    ids = tok.encode(args.prompt).ids if args.prompt else [eos]
    new = sample(model, ids, args.max_new_tokens, args.temperature, args.top_k, eos)
    print(args.prompt + tok.decode(new))
    return 0
