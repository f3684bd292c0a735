"""moekit upcycle: a dense model as an MoE whose experts are copies of its FFNs (Scale-Out)."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("upcycle", help="turn a dense model into an MoE (sparse upcycling)",
                       allow_abbrev=False,
                       description="Read a dense model (a run, an export, a Hugging Face directory or a "
                                   "catalog model such as smollm2-135m) and write OUT, an MoE whose experts "
                                   "are copies of each FFN: the same function at step 0 (top-k >= 2).")
    p.add_argument("src")
    p.add_argument("--experts", type=int, required=True, help="experts per MoE layer")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", default="all", help="all, alternate, or indices such as 0,2,4")
    p.add_argument("--router-init", default="normal", choices=("normal", "zeros"), help="N(0, 0.02) or zeros")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(run=run)


def _layers(text: str):
    if text in ("all", "alternate"):
        return text
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers {text!r}: give all, alternate, or comma-separated indices such as "
                         "0,2") from None


def run(args) -> int:
    from moekit.scale.upcycle import upcycle
    from moekit.train.run_dir import check_export_target, load_run, save_export
    check_export_target(Path(args.out), "upcycle --out")
    model, tok, cfg = load_run(args.src)
    moe = upcycle(model, args.experts, args.top_k, layers=_layers(args.layers), router_init=args.router_init,
                  seed=args.seed)
    save_export(moe, tok, cfg, Path(args.out))
    print(f"upcycled {args.src} to {args.out}: {len(moe.moe_layers())} MoE layers of {args.experts} experts, "
          f"top-{args.top_k}")
    return 0
