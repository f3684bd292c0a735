"""moekit grow: a model made wider and deeper, the same function at step 0 (EfficientScale Scale-Up)."""

from __future__ import annotations

from pathlib import Path

_DIMS = ("d_model", "d_ff", "expert_d_ff", "n_heads", "n_kv_heads", "n_layers")


def register(sub) -> None:
    p = sub.add_parser("grow", help="grow a model's width and depth (function-preserving)",
                       allow_abbrev=False,
                       description="Read a model (a run, an export, a Hugging Face directory or a catalog "
                                   "model such as smollm2-135m) and write OUT, a larger model: wider by "
                                   "copies whose outputs are split (fpi), by zero residual channels (zero) "
                                   "or from the next layer's weights (aki); deeper by identity blocks "
                                   "between the old ones (zero) or by repeating the blocks (stack); or "
                                   "with more experts (--experts), copies of the old ones.")
    p.add_argument("src")
    p.add_argument("--d-model", type=int, help="residual width (fpi: a multiple of the model's)")
    p.add_argument("--d-ff", type=int, help="dense FFN width")
    p.add_argument("--expert-d-ff", type=int, help="every expert's width (shared experts follow)")
    p.add_argument("--n-heads", type=int, help="query heads (head_dim stays)")
    p.add_argument("--n-kv-heads", type=int, help="key/value heads (n-heads stays a multiple)")
    p.add_argument("--n-layers", type=int, help="blocks")
    p.add_argument("--width-mode", default="fpi", help="fpi (default), zero or aki")
    p.add_argument("--depth-mode", default="zero", help="zero (default) or stack")
    p.add_argument("--experts", type=int, help="experts per MoE layer, new ones copying old ones (not with "
                   "the width and depth flags)")
    p.add_argument("--which", help="with --experts: all (default; every expert copied equally) or "
                   "most_loaded (copies of the most loaded, per the last loads in SRC's metrics.jsonl)")
    p.add_argument("--noise-std", type=float, help="with --experts: N(0, S) on the copies' router rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-optimizer", action="store_true",
                   help="do not carry SRC's AdamW state (by default a run's is mapped like the weights into "
                        "OUT/optimizer.safetensors, for train --from OUT --set train.init_optimizer=true)")
    p.add_argument("--out", required=True)
    p.set_defaults(run=run)


def _dims(cfg) -> dict[str, int | None]:
    return {"d_model": cfg.d_model, "d_ff": cfg.d_ff, "expert_d_ff": cfg.moe.d_ff if cfg.moe else None,
            "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads or cfg.n_heads, "n_layers": cfg.n_layers}


def run(args) -> int:
    from moekit.cli.upcycle import carried
    from moekit.store.run_dir import check_export_target, load_optimizer_state, load_run, save_export
    from moekit.transform.grow import block_plan, grow, grow_is_exact, grown_optimizer_state
    if args.experts is not None:
        return _run_experts(args)
    for flag, value in (("--which", args.which), ("--noise-std", args.noise_std)):
        if value is not None:
            raise ValueError(f"grow: {flag} applies to --experts only; add --experts N or drop {flag}")
    check_export_target(Path(args.out), "grow --out", src=args.src)
    model, tok, cfg = load_run(args.src)
    kwargs = {name: getattr(args, name) for name in _DIMS}
    modes = {"width_mode": args.width_mode, "depth_mode": args.depth_mode}
    big = grow(model, **kwargs, **modes, seed=args.seed)
    optim = None if args.no_optimizer else load_optimizer_state(args.src, model)
    if optim is not None:
        optim = grown_optimizer_state(optim, model, **kwargs, **modes, seed=args.seed)
    save_export(big, tok, cfg, Path(args.out), optim=optim)
    old, new = _dims(model.cfg), _dims(big.cfg)
    grew = [f"{name} {old[name]} -> {new[name]}" for name in _DIMS if old[name] != new[name]]
    where = ""
    if big.cfg.n_layers > model.cfg.n_layers and args.depth_mode == "zero":
        plan = block_plan(model.cfg.n_layers, big.cfg.n_layers, "zero")
        where = f" (new blocks at {[p for p, (_, fresh) in enumerate(plan) if fresh]})"
    exact = grow_is_exact(model, big, args.width_mode, args.depth_mode)
    same = "the source function at step 0" if exact else "not the source function at step 0 (aki / stack)"

    print(f"grew {args.src} to {args.out} (width {args.width_mode}, depth {args.depth_mode}): "
          f"{', '.join(grew)}{where}; {same}{carried(optim)}")
    return 0


def _run_experts(args) -> int:
    """--experts: grow the number of experts (moekit.transform.grow_experts); the model only."""
    from moekit.cli.upcycle import carried
    from moekit.store.run_dir import check_export_target, load_optimizer_state, load_run, save_export
    from moekit.train.optim import grow_optimizer_state
    from moekit.transform.grow_experts import (
        exact_max_k,
        exact_top_k,
        grow_experts,
        grow_experts_is_exact,
        last_loads,
    )
    given = [f"--{name.replace('_', '-')}" for name in _DIMS if getattr(args, name) is not None]
    given += [f"--{flag}-mode" for flag, default in (("width", "fpi"), ("depth", "zero"))
              if getattr(args, f"{flag}_mode") != default]
    if given:
        raise ValueError(f"grow: --experts with {', '.join(given)} is not supported yet; grow the experts "
                         "and the width or depth in two runs of moekit grow")
    check_export_target(Path(args.out), "grow --out", src=args.src)
    which = args.which or "all"
    model, tok, cfg = load_run(args.src)
    loads = last_loads(args.src) if which == "most_loaded" else None
    big, mapping = grow_experts(model, args.experts, which=which, loads=loads,
                                noise_std=args.noise_std or 0.0, seed=args.seed)
    optim = None if args.no_optimizer else load_optimizer_state(args.src, model)
    if optim is not None:
        optim = grow_optimizer_state(optim, model, big, mapping)
    save_export(big, tok, cfg, Path(args.out), optim=optim)
    m = model.cfg.moe
    if grow_experts_is_exact(model, big, mapping):
        same = "the source function at step 0"
    elif m.dynamic_k == "relu":
        k = exact_max_k(model, mapping)
        why = ("router noise" if args.noise_std else "the capacity of unevenly copied experts"
               if m.max_k is None else f"max_k {m.max_k} kept" + (f"; max_k={k} would be exact" if k else ""))
        same = f"not the source function at step 0 ({why})"
    else:
        k = exact_top_k(model, mapping) if not args.noise_std else None
        same = f"top_k {m.top_k} kept, so not the source function at step 0" + (
            f" (top_k={k} would be)" if k is not None and k <= args.experts else "")
    copies = "; ".join(f"layer {i}: {src[m.num_experts:]}" for i, src in list(mapping.items())[:3])
    more = f" and {len(mapping) - 3} more layers" if len(mapping) > 3 else ""
    print(f"grew {args.src} to {args.out}: experts {m.num_experts} -> {args.experts} in {len(mapping)} MoE "
          f"layers ({which}; new experts copy {copies}{more}); {same}{carried(optim)}")
    return 0
