"""moekit extract: a smaller model with only the experts one tag is routed to (task-level MoE)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("extract", help="keep only the experts one tag (language, source) is routed to",
                       allow_abbrev=False,
                       description="Read a run and write OUT, an export with only the experts TAG's tokens "
                                   "go to (Kudugunta et al. 2021). A model that routes by the tag alone "
                                   "(model.moe.router_input='tag') keeps exactly its top-k experts per layer "
                                   "and the same function on TAG's text; any other keeps the experts that "
                                   "took at least --min-share of TAG's routed tokens on its validation "
                                   "windows, an approximation. Prints the parameters and tokens/s of both.")
    p.add_argument("run_dir")
    p.add_argument("--task", required=True, metavar="TAG", help="the tag (a data.mixture source's tag, or "
                   "a corpus's document tag) whose experts to keep")
    p.add_argument("--min-share", type=float, default=0.0,
                   help="approximate case: keep experts with at least this share of TAG's routed tokens "
                        "(default 0: any)")
    p.add_argument("--batches", type=int, default=4,
                   help="batches of TAG's validation windows to count, compare and time on")
    p.add_argument("--out", required=True)
    p.set_defaults(run=run)


def _check_flags(args) -> None:
    if not (0.0 <= args.min_share < 1.0):
        raise ValueError(f"--min-share {args.min_share}: must be in [0, 1); use e.g. 0.05, or 0 for any")
    if args.batches < 1:
        raise ValueError(f"--batches {args.batches}: must be >= 1")


def _splits(cfg, run_dir: Path, model, tag: str):
    """(train split, val split) of the run, after the tag is known to be one it saw."""
    from moekit.data.stream import split_tags
    from moekit.train.splits import has_cache, open_split
    if not has_cache(run_dir):
        raise ValueError(f"{str(run_dir)!r} has no token cache (data/): extract reads the tag's validation "
                         "windows; give the run directory")
    if cfg.data.task is not None:
        raise ValueError(f"{str(run_dir)!r} was trained on a task (data.task={cfg.data.task!r}); extract "
                         "reads a corpus's or a mixture's tags")
    val = open_split(cfg, run_dir, "val")
    m = model.cfg.moe
    known = m.route_tags if m.router_input != "token" else split_tags(val)
    if tag not in known:
        raise ValueError(f"--task {tag!r}: the run never saw that tag; its tags are {', '.join(known)}")
    return open_split(cfg, run_dir, "train"), val


def _extract(model, val, cfg, args):
    """(the extracted model, the printed result) from the first --batches of TAG's windows."""
    from moekit.data.stream import tag_split
    from moekit.model.transformer import count_params
    from moekit.transform import extract as ex
    tag = args.task
    part, windows, _ = tag_split(val, tag)
    if not windows:
        raise ValueError(f"--task {tag!r}: the validation split has no window of that tag; use a larger "
                         "data.val_fraction")
    B = cfg.train.batch_size
    batches = [part.batch(windows[i:i + B])[0] for i in range(0, len(windows), B)][:args.batches]
    exact = ex.is_exact(model.cfg.moe)
    loads = None if exact else ex.tag_loads(model, batches, tag)
    small, kept = ex.extract_experts(model, tag, loads, args.min_share)
    return small, {"tag": tag, "exact": exact,
                   "experts": {"full": model.cfg.moe.num_experts, "extracted": small.cfg.moe.num_experts},
                   "params": {"full": count_params(model), "extracted": count_params(small)},
                   **ex.compare(model, small, batches, tag), "windows": sum(len(x) for x in batches),
                   "kept": {str(i): e for i, e in kept.items()}}


def run(args) -> int:
    from moekit.data.stream import write_tag_data
    from moekit.store.run_dir import check_export_target, load_run, save_export
    _check_flags(args)
    run_dir, out, tag = Path(args.run_dir), Path(args.out), args.task
    check_export_target(out, "extract --out", src=run_dir)
    model, tok, cfg = load_run(run_dir)
    if model.cfg.moe is None:
        raise ValueError(f"{str(run_dir)!r} is a dense model; it has no experts to extract")
    train, val = _splits(cfg, run_dir, model, tag)
    small, result = _extract(model, val, cfg, args)
    # the export's data is the tag's alone (its own documents of the run's splits), for moekit eval
    data = dataclasses.replace(cfg.data, mixture=None, corpus=_source(cfg, tag))
    finetune = dataclasses.replace(cfg.finetune, esft_experts=None)   # expert ids of the full model
    save_export(small, tok, dataclasses.replace(cfg, data=data, finetune=finetune), out)
    write_tag_data(train, val, tag, out / "data")
    share = f">= {args.min_share:g} of" if args.min_share else "any of"
    how = ("exact: the tag's own top-k experts, the same function on its text" if result["exact"] else
           f"approximate (the routing depends on more than the tag): the experts with {share} the tag's "
           f"routed tokens; max |logit difference| {result['max_abs_logit_diff']:.3g} on "
           f"{result['windows']} windows")
    print(f"extracted {tag!r} from {run_dir} into {out}: {small.cfg.moe.num_experts} of "
          f"{model.cfg.moe.num_experts} experts per MoE layer, {result['params']['extracted']:,} of "
          f"{result['params']['full']:,} parameters; {how}")
    print(json.dumps(result))
    return 0


def _source(cfg, tag: str) -> str:
    """What the extracted model's data is: the tag's mixture source, or the corpus."""
    for entry in cfg.data.mixture or ():
        if entry["tag"] == tag:
            return entry["source"]
    return cfg.data.corpus
