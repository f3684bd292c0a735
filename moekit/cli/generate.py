"""moekit generate: sample text from a trained run (or an export)."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a run", allow_abbrev=False)
    p.add_argument("run_dir")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = the whole vocabulary")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", help="the text's tag (language, source) for a model that routes by tag "
                                 "(task-level routing): one of its model.moe.route_tags")
    p.set_defaults(run=run)


def run(args) -> int:
    from moekit.serve.generate import check_sampling, generate, tag_index
    from moekit.train.run_dir import load_model
    # before the model loads: a bad flag is one line naming it
    check_sampling(args.max_new_tokens, args.temperature, args.top_k,
                   names=("--max-new-tokens", "--temperature", "--top-k"))
    model, tok = load_model(Path(args.run_dir))
    tag_index(model, args.tag)
    print(generate(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                   args.tag))
    return 0
