"""moekit eval: validation loss and perplexity of a trained run."""

from __future__ import annotations

import json
import math
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("eval", help="validation loss and perplexity of a run", allow_abbrev=False)
    p.add_argument("run_dir")
    p.add_argument("--batches", type=int, default=None,
                   help="the first N batches of train.batch_size windows (default: all of the split; a run's "
                        "final_val_loss is over its train.eval_batches: --batches that many gives it again)")
    p.set_defaults(run=run)


def run(args) -> int:
    from moekit.store.run_dir import load_run
    from moekit.train.evaluate import eval_windows, evaluate
    from moekit.train.splits import has_cache, open_split, prepare_data
    if args.batches is not None and args.batches < 1:
        raise ValueError(f"--batches {args.batches}: must be >= 1 (leave it out for the whole split)")
    run_dir = Path(args.run_dir)
    model, _, cfg = load_run(run_dir)
    if has_cache(run_dir):
        val = open_split(cfg, run_dir, "val")
    else:   # an export: rebuild the token cache from the recipe's corpus with the run's tokenizer
        _, _, val, _ = prepare_data(cfg, run_dir)
    sources: dict = {}
    loss = evaluate(model, val, cfg.train.batch_size, next(model.parameters()).device, args.batches,
                    by_source=sources)
    if not math.isfinite(loss):
        raise ValueError(f"the validation loss of {str(run_dir)!r} is {loss}: its weights are not usable; "
                         "retrain with a lower train.lr")
    B = cfg.train.batch_size
    result = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)),
              "val_windows": eval_windows(val, B, args.batches), "of_val_windows": eval_windows(val, B, None),
              **{f"val_loss/{k}": v for k, v in sources.items()}}
    if getattr(val, "label_ids", None) is not None:     # a classification task: accuracy too
        from moekit.data.task_split import accuracy
        device = next(model.parameters()).device
        n = None if args.batches is None else args.batches * B
        result["val_accuracy"] = accuracy(model, val, device, B, n)
        result["test_accuracy"] = accuracy(model, open_split(cfg, run_dir, "test"), device, B, n)
    print(json.dumps(result))
    return 0
