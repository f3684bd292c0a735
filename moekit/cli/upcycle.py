"""moekit upcycle: a dense model as an MoE made from its FFNs (EfficientScale Scale-Out)."""

from __future__ import annotations

import dataclasses
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("upcycle", help="turn a dense model into an MoE (sparse upcycling)",
                       allow_abbrev=False,
                       description="Read a dense model (a run, an export, a Hugging Face directory or a "
                                   "catalog model such as smollm2-135m) and write OUT, an MoE whose experts "
                                   "are made from each FFN: copies (the same function at step 0), copies "
                                   "with a re-drawn share (drop), or fine-grained shards (virtual-group, "
                                   "the same function at step 0).")
    p.add_argument("src")
    p.add_argument("--experts", type=int, required=True, help="experts per MoE layer")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--method", default="copy", choices=("copy", "drop", "virtual-group"))
    p.add_argument("--drop-ratio", type=float, help="drop: share of hidden units re-drawn (default 0.5)")
    p.add_argument("--granularity", type=int, default=1,
                   help="virtual-group: shards per FFN (experts of width d_ff / G)")
    p.add_argument("--shared-from-ffn", action="store_true", help="add a shared expert copied from the FFN")
    p.add_argument("--layers", default="all", help="all, alternate, or indices such as 0,2,4")
    p.add_argument("--router-init", default="normal", choices=("normal", "zeros"), help="N(0, 0.02) or zeros")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="another MoEConfig field, e.g. --set router=sigmoid --set aux_loss_free=true")
    p.add_argument("--weight-scale", default="auto",
                   help="factor on the experts' down projections: auto (num_experts / top_k for softmax-then-"
                        "top-k, --set normalize_topk=false; else 1) or a number")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-optimizer", action="store_true",
                   help="do not carry SRC's AdamW state (by default a run's is mapped like the weights into "
                        "OUT/optimizer.safetensors, for train --from OUT --set train.init_optimizer=true)")
    p.add_argument("--out", required=True)
    p.set_defaults(run=run)


def _layers(text: str):
    if text in ("all", "alternate"):
        return text
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--layers {text!r}: give all, alternate, or comma-separated indices such as "
                         "0,2") from None


def moe_options(items: list[str]) -> dict:
    """``["router=sigmoid"]`` -> {"router": "sigmoid"}, refusing what is not an MoEConfig field
    (parsed as ``--set`` is, repeated fields refused there)."""
    from moekit.moe.config import MoEConfig
    from moekit.recipe import apply_overrides
    from moekit.transform.upcycle import SET_BY_UPCYCLE
    fields = {f.name for f in dataclasses.fields(MoEConfig)} - set(SET_BY_UPCYCLE)
    options = apply_overrides({}, items)
    for key in options:
        if key not in fields:
            raise ValueError(f"--set {key}: not an MoEConfig field upcycle takes; use one of "
                             f"{', '.join(sorted(fields))}")
    return options


def _scale(text: str):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--weight-scale {text!r}: give auto or a number > 0, e.g. 4") from None


def carried(optim: dict | None) -> str:
    """The words a transforming command adds about the AdamW state it carried."""
    if not optim:
        return ""
    step = max(float(e["step"]) for e in optim.values())
    return (f"; AdamW state carried (step {step:.0f}): continue with train --from OUT --set "
            "train.init_optimizer=true")


def run(args) -> int:
    from moekit.store.run_dir import check_export_target, load_optimizer_state, load_run, save_export
    from moekit.transform.upcycle import upcycle, upcycle_is_exact, upcycled_optimizer_state
    check_export_target(Path(args.out), "upcycle --out", src=args.src)
    options = moe_options(args.set)
    model, tok, cfg = load_run(args.src)
    kwargs = dict(method=args.method, drop_ratio=args.drop_ratio, granularity=args.granularity,
                  shared_from_ffn=args.shared_from_ffn, layers=_layers(args.layers),
                  router_init=args.router_init, seed=args.seed, weight_scale=_scale(args.weight_scale),
                  **options)
    moe = upcycle(model, args.experts, args.top_k, **kwargs)
    optim = None if args.no_optimizer else load_optimizer_state(args.src, model)
    if optim is not None:
        optim = upcycled_optimizer_state(optim, model, args.experts, args.top_k, **kwargs)
    save_export(moe, tok, cfg, Path(args.out), optim=optim)
    m = moe.cfg.moe
    exact = upcycle_is_exact(m, args.method, args.router_init, kwargs["weight_scale"])
    same = "the dense function at step 0" if exact else \
        "not the dense function at step 0 (by the method or the router options)"
    from moekit.interop.hf import to_hf_config
    try:
        hf = f"; exports to Hugging Face as {to_hf_config(moe.cfg)['model_type']}"
    except ValueError as err:
        hf = f"; cannot be exported to Hugging Face ({str(err).split(': ', 1)[-1].split(';')[0]})"
    print(f"upcycled {args.src} to {args.out} ({args.method}): {len(moe.moe_layers())} MoE layers of "
          f"{m.num_experts} experts of width {m.d_ff}, top-{m.top_k}"
          f"{', 1 shared expert' if m.num_shared_experts else ''}; {same}{hf}{carried(optim)}")
    return 0
