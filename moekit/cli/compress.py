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

METHODS = ("distill", "merge", "prune", "quantize")


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
    from moekit.train.compress import CompressRequest, compress
    _check_flags(args)
    return compress(CompressRequest(
        src=args.src, out=args.out, method=args.method, experts=args.experts, prune_by=args.prune_by,
        similarity=args.similarity, router=args.router, align=not args.no_align, bits=args.bits,
        group_size=args.group_size, attention=args.attention, calib=args.calib,
        calib_tokens=args.calib_tokens, recover_steps=args.recover_steps, temperature=args.temperature,
        alpha=args.alpha, sets=args.set, seed=args.seed, progress=not args.no_progress))
