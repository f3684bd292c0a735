"""moekit report: a self-contained HTML page about a run (losses, expert load, routing by language)."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("report", help="write the HTML run report")
    p.add_argument("run_dir")
    p.add_argument("--baseline", metavar="RUN_DIR", help="overlay a (dense) baseline run's curves")
    p.add_argument("--out", help="the HTML file (default: RUN_DIR/report.html)")
    p.add_argument("--windows", type=int, default=512, help="validation windows routed for the breakdowns")
    p.set_defaults(run=run)


def run(args) -> int:
    from moekit.model.routing import frequency_class, routing_breakdown
    from moekit.model.transformer import model_flops
    from moekit.report.html import build_report
    from moekit.store.run_dir import load_run
    from moekit.train.splits import open_split
    run_dir = Path(args.run_dir)
    if (run_dir / "federate.json").exists():        # a moekit federate directory
        return _federation(run_dir, args)
    model, tok, cfg = load_run(run_dir)
    val, train = open_split(cfg, run_dir, "val"), open_split(cfg, run_dir, "train")
    by_tag, by_freq = routing_breakdown(model, val, frequency_class(train, tok.get_vocab_size()),
                                        max_windows=args.windows)
    flops = model_flops(model.cfg, cfg.data.seq_len)
    source = ("task", cfg.data.task) if cfg.data.task else ("corpus", cfg.data.corpus)
    summary = {source[0]: source[1], "parameters (total / active)":
               f"{flops['params_total']:,.0f} / {flops['params_active']:,.0f}",
               "experts": experts_line(cfg.model.moe)}
    can_drop = cfg.model.moe is not None and (cfg.model.moe.capacity_factor is not None
                                              or cfg.model.moe.router == "expert_choice")
    page = build_report(run_dir, summary, by_tag, by_freq, Path(args.baseline) if args.baseline else None,
                        can_drop=can_drop, moe=cfg.model.moe)
    out = Path(args.out) if args.out else run_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    tags = len(by_tag.labels) > 1
    dynamic = cfg.model.moe is not None and cfg.model.moe.dynamic
    for i in sorted(by_tag.counts):
        lang = (f"I(expert; language) = {by_tag.mutual_information(i):.3f} bits "
                f"(H(language) = {by_tag.class_entropy(i):.3f}), " if tags else "")
        k = f", {by_freq.overall_experts_per_token(i):.2f} experts per token" if dynamic else ""
        print(f"layer {i}: {lang}I(expert; frequency class) = {by_freq.mutual_information(i):.3f} bits{k}")
    print(f"wrote {out}")
    return 0


def _federation(out: Path, args) -> int:
    from moekit.federate.report import build_federated_report
    if args.baseline:
        raise ValueError("--baseline: a federation's report compares its clients; drop --baseline")
    path = Path(args.out) if args.out else out / "report.html"
    path.write_text(build_federated_report(out), encoding="utf-8")
    print(f"wrote {path}")
    return 0


def experts_line(moe) -> str:
    """The summary's experts: "8 x top-2, router softmax", or a dynamic router's range and target."""
    if moe is None:
        return "dense"
    if not moe.dynamic:
        return f"{moe.num_experts} x top-{moe.top_k}, router {moe.router}"
    lo, hi = moe.k_range
    null = f" + {moe.num_null_experts} null" if moe.dynamic_k == "null" else ""
    target = f", target {moe.target_k:g}" if moe.target_k is not None else ""
    return (f"{moe.num_experts}{null} experts, dynamic_k={moe.dynamic_k} ({lo}-{hi} per token{target}), "
            f"router {moe.router}")
