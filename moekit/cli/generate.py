"""moekit generate: sample text from a trained run (or an export)."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a run", allow_abbrev=False,
                       description="Continue one or more prompts (one batch, with a KV cache). Prints each "
                                   "completion, then a line on stderr with the new tokens and tokens/s.")
    p.add_argument("run_dir")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt; repeat for several, generated as one batch (default: one empty prompt, "
                        "which starts from end-of-text)")
    p.add_argument("--prompts-file", metavar="FILE", help="one prompt per line (added after any --prompt)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = the whole vocabulary")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens "
                                                             "holding this much probability (1 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true",
                   help="recompute every window for every token (the slow reference; same greedy output)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar on stderr (shown on a terminal: new tokens so far, tokens/s)")
    p.add_argument("--tag", help="the text's tag (language, source) for a model that routes by tag "
                                 "(task-level routing): one of its model.moe.route_tags")
    p.set_defaults(run=run)


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise FileNotFoundError(f"--prompts-file {str(path)!r} does not exist; give a text file with one "
                                    "prompt per line") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"--prompts-file {str(path)!r} cannot be read as UTF-8 text "
                             f"({type(err).__name__}); give a text file with one prompt per line") from None
        lines = [line for line in lines if line.strip()]
        if not lines:
            raise ValueError(f"--prompts-file {str(path)!r} holds no prompt; write one prompt per line")
        prompts += lines
    return prompts or [""]


def run(args) -> int:
    from tqdm import tqdm

    from moekit.serve.generate import check_sampling, generate, tag_index
    from moekit.store.run_dir import load_model
    # before the model loads: a bad flag is one line naming it
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                   names=("--max-new-tokens", "--temperature", "--top-k", "--top-p"))
    prompts = _prompts(args)
    model, tok = load_model(Path(args.run_dir))
    tag_index(model, args.tag)
    start, counts = time.perf_counter(), []
    # the text is printed at the end (all prompts at once); until then the bar shows it is working
    bar = tqdm(total=args.max_new_tokens, unit="tok", desc="generating", file=sys.stderr, leave=False,
               dynamic_ncols=True, disable=True if args.no_progress else None)   # None: a terminal only
    with bar:
        texts = generate(model, tok, prompts, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                         args.tag, args.top_p, use_cache=not args.no_cache, counts=counts,
                         on_step=bar.update)
    seconds = time.perf_counter() - start
    new = sum(counts)
    print("\n\n".join(texts), flush=True)
    print(f"{len(prompts)} prompt(s), {new} new tokens in {seconds:.2f} s ({new / max(seconds, 1e-9):.1f} "
          f"tokens/s, {'no cache' if args.no_cache else 'KV cache'})", file=sys.stderr)
    return 0
