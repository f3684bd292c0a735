"""moekit compress: a smaller model from a trained one (distill, merge, prune, quantize).

Each method writes OUT, a directory eval, generate, report and export read:

- ``distill``: a run (the training engine with the distillation objective) whose student is
  by default the teacher's dense baseline (the same active parameters per token); a
  ``--set model.moe.*`` makes it an MoE of the teacher's architecture (a dense teacher's: the
  recipe's default MoE) with those fields, e.g. a dynamic number of experts per token;
- ``merge`` / ``prune``: an export with fewer experts per MoE layer (with ``--recover-steps``
  a short training run from it instead);
- ``quantize``: an export whose experts (and with ``--attention`` the attention projections)
  hold 8- or 4-bit weights with group-wise scales.

The source is only read. An export made from a run carries the run's token cache (data/),
so eval and report see the same validation windows as the source.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

METHODS = ("distill", "merge", "prune", "quantize")
# MoEConfig's fields of a dynamic number of experts per token (docs/dynamic_routing.md)
DYNAMIC_FIELDS = ("dynamic_k", "top_p", "min_k", "max_k", "num_null_experts", "relu_l1", "target_k",
                  "budget_rate")


def register(sub) -> None:
    p = sub.add_parser("compress", help="distill, merge, prune or quantize a trained model",
                       allow_abbrev=False,
                       description="Read SRC (a run or export; never modified) and write a smaller model to "
                                   "OUT. See docs/compression.md for what each method keeps.")
    p.add_argument("src")
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    p.add_argument("--out", required=True)
    p.add_argument("--experts", type=int, help="merge / prune: experts per MoE layer to keep")
    p.add_argument("--prune-by", default="reconstruction", help="prune: usage (most routed tokens) or "
                   "reconstruction (NAEE: the subset whose layer output is closest on the calibration "
                   "tokens)")
    p.add_argument("--similarity", default="expert-output", help="merge: group experts by expert-output "
                   "(HC-SMoE) or router-logits similarity on the calibration tokens")
    p.add_argument("--router", default="mean", help="merge: a merged expert's router row is the usage-"
                   "weighted mean of its group's rows (mean) or the most used expert's (dominant)")
    p.add_argument("--no-align", action="store_true", help="merge: average without aligning hidden units")
    p.add_argument("--bits", type=int, help="quantize: 8 or 4")
    p.add_argument("--group-size", type=int, default=64, help="quantize: weights per scale (default 64)")
    p.add_argument("--attention", action="store_true", help="quantize: the attention projections too")
    p.add_argument("--calib", metavar="CORPUS", help="merge / prune: calibration text, a catalog corpus or a "
                   "file (default: SRC's training windows, or its corpus)")
    p.add_argument("--calib-tokens", type=int, default=16384, help="merge / prune: calibration tokens")
    p.add_argument("--recover-steps", type=int, default=0, help="merge / prune: train this many steps "
                   "afterwards on SRC's data (OUT is then a run)")
    p.add_argument("--temperature", type=float, default=1.0, help="distill: softmax temperature T")
    p.add_argument("--alpha", type=float, default=0.5, help="distill: weight of the soft targets (0 = the "
                   "student trained alone, the baseline)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="distill / --recover-steps: the student's recipe, e.g. --set train.max_steps=750 "
                        "--set model.d_ff=512 (a given size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def _check_flags(args) -> None:
    if args.method not in METHODS:
        raise ValueError(f"--method {args.method!r}: unknown; use one of {', '.join(METHODS)}")
    takes = {"merge": ("experts",), "prune": ("experts",), "quantize": ("bits",), "distill": ()}
    for flag in takes[args.method]:
        if getattr(args, flag) is None:
            raise ValueError(f"--method {args.method} needs --{flag}")
    if args.method == "prune" and args.prune_by not in ("usage", "reconstruction"):
        raise ValueError(f"--prune-by {args.prune_by!r}: use usage or reconstruction")
    if args.method == "merge" and args.similarity not in ("expert-output", "router-logits"):
        raise ValueError(f"--similarity {args.similarity!r}: use expert-output or router-logits")
    if args.method == "merge" and args.router not in ("mean", "dominant"):
        raise ValueError(f"--router {args.router!r}: use mean or dominant")
    if args.method == "quantize" and args.bits not in (8, 4):
        raise ValueError(f"--bits {args.bits}: use 8 or 4")
    if args.method == "quantize" and (args.group_size < 2 or args.group_size % 2):
        raise ValueError(f"--group-size {args.group_size}: must be an even number >= 2 that divides the "
                         "model's d_model and expert d_ff (e.g. 32, 64, 128)")
    if args.calib_tokens < 1:
        raise ValueError(f"--calib-tokens {args.calib_tokens}: must be >= 1 (e.g. 16384)")
    if args.recover_steps < 0 or (args.recover_steps and args.method not in ("merge", "prune")):
        raise ValueError(f"--recover-steps {args.recover_steps}: must be >= 0, and only merge or prune "
                         "recover (distill trains anyway; quantized weights do not train)")
    if args.set and args.method not in ("distill",) and not args.recover_steps:
        raise ValueError(f"--set {args.set[0]}: only distill and --recover-steps train; drop --set")


def run(args) -> int:
    from moekit.store.run_dir import check_export_target, check_fresh
    _check_flags(args)
    src, out = Path(args.src), Path(args.out)
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise ValueError(f"--out {str(out)!r} is the source itself; writing there would overwrite it: "
                         "choose another --out")
    if args.method == "distill" or args.recover_steps:
        check_fresh(out)
    else:
        check_export_target(out, "compress --out", src=src)
    if args.method == "distill":
        return _distill(args, src, out)
    from moekit.store.run_dir import load_run
    model, tok, cfg = load_run(src)
    if args.recover_steps:               # a bad --set is found before the work, not after it
        from moekit.config import RunConfig
        RunConfig.from_dict(_recover_raw(args, cfg))
    small, info = _transform(args, model, tok, cfg, src)
    if args.recover_steps:
        _recover(args, small, tok, cfg, out, info)
    else:
        _write(small, tok, cfg, src, out, info)
    _report(info, out)
    return 0


def _transform(args, model, tok, cfg, src: Path):
    """(the compressed model, what was done) for merge, prune and quantize."""
    from moekit.model.transformer import count_params
    info = {"method": args.method, "source": str(src), "params": {"source": count_params(model)}}
    if args.method == "quantize":
        from moekit.transform.quantize import quantize_model, quantized_bytes
        small = quantize_model(model, args.bits, args.group_size, args.attention)
        info.update(bits=args.bits, group_size=args.group_size, attention=args.attention,
                    bytes={"source": quantized_bytes(model), "compressed": quantized_bytes(small)})
    else:
        from moekit.transform.calibrate import check_target
        check_target(model, args.experts, f"{args.method}_experts")   # before the calibration text is read
        batches = calibration(args, model, tok, cfg, src)
        if args.method == "prune":
            from moekit.transform.prune import prune_experts
            small, kept = prune_experts(model, batches, args.experts, method=args.prune_by)
            info.update(prune_by=args.prune_by, kept={str(i): k for i, k in kept.items()})
        else:
            from moekit.transform.merge import merge_experts
            small, groups = merge_experts(model, batches, args.experts, similarity=args.similarity,
                                          align=not args.no_align, router=args.router)
            info.update(similarity=args.similarity, router=args.router, align=not args.no_align,
                        groups={str(i): g for i, g in groups.items()})
        info.update(experts={"source": model.cfg.moe.num_experts, "compressed": args.experts},
                    calib_tokens=sum(b.numel() for b in batches))
    # quantized weights are buffers, not parameters: the same count, fewer bytes
    quantized = args.method == "quantize"
    info["params"]["compressed"] = info["params"]["source"] if quantized else count_params(small)
    return small, info


def calibration(args, model, tok, cfg, src: Path) -> list:
    """Calibration batches [B, S] of ``--calib-tokens`` tokens: SRC's own training windows by
    default (never its validation windows, which eval reports on; a task's training examples,
    padded), else the text of --calib
    (or SRC's corpus), tokenized with SRC's tokenizer and cut into windows; seeded."""
    import torch

    from moekit.train.splits import has_cache, open_split
    S = min(cfg.data.seq_len, model.cfg.max_seq_len)
    n_windows = max(1, -(-args.calib_tokens // S))
    g = torch.Generator().manual_seed(args.seed)
    if args.calib is None and has_cache(src):
        train = open_split(cfg, src, "train")
        idx = torch.randperm(len(train), generator=g)[:n_windows].tolist()
        windows = train.batch(idx)[0]
    else:
        windows = _text_windows(args.calib or cfg.data.corpus, tok, S, n_windows, g)
    return list(windows.split(8))


def _text_windows(source, tok, S: int, n: int, g):
    import torch

    from moekit.data.catalog import load_documents
    from moekit.data.tokenizer import eos_id
    docs = load_documents(source)
    order = torch.randperm(len(docs), generator=g).tolist()
    eos, ids = eos_id(tok, required=False), []
    for i in order:
        ids += tok.encode(docs[i].text).ids + ([eos] if eos is not None else [])
        if len(ids) >= n * S:
            break
    if len(ids) < S:
        raise ValueError(f"--calib {str(source)!r} yields {len(ids)} tokens, fewer than one window of {S}; "
                         "give a larger corpus or file")
    usable = len(ids) // S * S
    return torch.tensor(ids[:usable]).view(-1, S)[:n]


def _write(small, tok, cfg, src: Path, out: Path, info: dict) -> None:
    """OUT: the export with SRC's token cache and compress.json, written beside OUT first and
    moved into place whole, so a failure (a full disk) leaves no half-written OUT."""
    from moekit.store.run_dir import save_export
    from moekit.train.splits import has_cache
    out = out.resolve()                     # "." or a link to an earlier export: the real place
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_export(small, tok, cfg, staging)
        if has_cache(src):
            shutil.copytree(src / "data", staging / "data")
        (staging / "compress.json").write_text(json.dumps(info, indent=1))
        _replace(staging, out)
    except (OSError, ValueError) as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, ValueError):     # save_export's one line, about the staging directory
            raise ValueError(str(err).replace(repr(str(staging)), repr(str(out)))) from None
        # shutil.Error (copytree) lists (src, dst, why) per file: the first why says it
        reason = err.strerror or (str(err.args[0][0][-1]).split(": ")[0] if isinstance(err, shutil.Error)
                                  else str(err))
        raise ValueError(f"writing {str(out)!r} failed: {reason}; free space or choose another "
                         "--out") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace(new: Path, out: Path) -> None:
    """Move ``new`` to ``out``; an earlier export there (check_export_target allowed it) is
    moved aside first and removed only once ``new`` is in place, else put back."""
    old = out.parent / f".{out.name}.old" if out.exists() else None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    try:
        new.rename(out)
    except OSError:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _recover_raw(args, cfg) -> dict:
    """The recovery run's recipe: SRC's data, a short schedule at a tenth of SRC's LR, --set."""
    from moekit.recipe import apply_overrides
    raw = {"data": dataclasses.asdict(cfg.data),
           "train": {"max_steps": args.recover_steps, "lr": cfg.train.lr / 10,
                     "batch_size": cfg.train.batch_size, "seed": args.seed}}
    return apply_overrides(raw, args.set)


def _recover(args, small, tok, cfg, out: Path, info: dict) -> None:
    """OUT: a run trained from the compressed model, which stays in OUT/init (its init_from),
    with compress.json beside it; a resume (moekit train --resume OUT) continues it."""
    from moekit.cli import train as train_cmd
    from moekit.store.checkpoint import find_checkpoint
    from moekit.store.run_dir import create, save_export
    made = create(out)
    try:
        save_export(small, tok, cfg, out / "init")
        info = {**info, "recover_steps": args.recover_steps}
        (out / "compress.json").write_text(json.dumps(info, indent=1))
        ns = argparse.Namespace(config=None, set=[], out=str(out), resume=None,
                                init_from=str((out / "init").resolve()), no_progress=args.no_progress,
                                stop_at=None, nproc=None, raw=_recover_raw(args, cfg))
        train_cmd.run(ns)
    except BaseException:
        if made is not None and find_checkpoint(out) is None:   # nothing to resume: leave nothing
            shutil.rmtree(made, ignore_errors=True)
        raise


def _report(info: dict, out: Path) -> None:
    p = info["params"]
    what = {"quantize": lambda: f"{info['bits']}-bit weights, groups of {info['group_size']}; weight bytes "
                                f"{info['bytes']['source']['total']:,} -> "
                                f"{info['bytes']['compressed']['total']:,}",
            "prune": lambda: f"{info['experts']['compressed']} of {info['experts']['source']} experts per "
                             f"layer "
                             f"(by {info['prune_by']})",
            "merge": lambda: f"{info['experts']['source']} -> {info['experts']['compressed']} experts per "
                             f"layer "
                             f"(by {info['similarity']})"}[info["method"]]()
    print(f"compressed {info['source']} into {out} ({info['method']}: {what}); parameters {p['source']:,} -> "
          f"{p['compressed']:,}")
    print(json.dumps(info))


def _distill(args, src: Path, out: Path) -> int:
    """The student run: the teacher's data and train sections, its dense baseline as the model
    (unless --set model.* says otherwise), and the distill section."""
    from moekit.cli import train as train_cmd
    from moekit.recipe import apply_overrides
    from moekit.store.run_dir import load_run
    teacher, _, cfg = load_run(src)
    base = cfg.to_dict()
    dropped = ("init_from", "expert_schedule", "warmup_steps")
    train = {k: v for k, v in base["train"].items() if k not in dropped}
    if any(item.split("=", 1)[0].strip().startswith("model.moe.") for item in args.set):
        # an MoE student (e.g. --set model.moe.dynamic_k=top_p): the teacher's architecture, or the
        # recipe's default MoE on a dense teacher's
        arch = dataclasses.replace(cfg, model=teacher.cfg).to_dict()["model"]
        model = {k: v for k, v in arch.items() if k not in ("quant", "dropout")}
        if not isinstance(model.get("moe"), dict):
            model["moe"] = {}
        if any(item.split("=", 1)[0].strip() == "model.moe.dynamic_k" for item in args.set):
            # another mode for the student: the teacher's mode fields go (TOML cannot unset them;
            # the --set ones are applied below)
            for name in DYNAMIC_FIELDS:
                model["moe"].pop(name, None)
    else:
        student = teacher.cfg.dense_baseline() if teacher.cfg.moe is not None else teacher.cfg
        model = {k: v for k, v in dataclasses.asdict(student).items() if k not in ("quant", "dropout")}
    raw = {"model": model, "data": base["data"], "train": {**train, "seed": args.seed},
           "distill": {"teacher": str(src), "temperature": args.temperature, "alpha": args.alpha}}
    raw = apply_overrides(raw, args.set)
    del teacher
    ns = argparse.Namespace(config=None, set=[], out=str(out), resume=None, init_from=None,
                            no_progress=args.no_progress, stop_at=None, nproc=None, raw=raw)
    return train_cmd.run(ns)
