"""The self-contained HTML run report: every plot an embedded PNG, no external files."""

from __future__ import annotations

import html
import json
import math
import statistics
from pathlib import Path

from moekit.model.routing import RoutingBreakdown, frequency_class, routing_breakdown
from moekit.model.transformer import model_flops
from moekit.report.compare import compare, comparison_plot, comparison_table
from moekit.report.experts_per_token import experts_per_token_section
from moekit.report.figures import facts_table, page, per_layer, plt, png, read_metrics, series
from moekit.runtime import write_text_atomic
from moekit.store.run_dir import load_run
from moekit.train.splits import open_split


def loss_curves(rows: list[dict], baseline: list[dict] | None) -> str:
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    for ax, key, title in zip(axes.flat, ["loss/lm", "loss/val", "loss/aux", "loss/z"],
                              ["train LM loss", "validation loss", "load-balancing loss (sum over layers)",
                               "router z-loss (sum over layers)"]):
        for data, label, style in ((rows, "this run", "-"), (baseline, "baseline", "--")):
            if data:
                x, y = series(data, key)
                if x and (data is rows or any(y)):   # a dense baseline has no aux/z: leave it out
                    ax.plot(x, y, style, label=label)
        for step, _ in growth_steps(rows):
            ax.axvline(step, color="gray", lw=0.7, ls=":")
        for step in stage_starts(rows)[1:]:
            ax.axvline(step, color="C3", lw=0.8, ls="--")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if baseline:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return png(fig)


def keyed_curves(rows: list[dict], prefix: str, ylabel: str) -> str | None:
    """One panel with a line per metric ``<prefix><name>`` (a mixture's per-source validation
    losses, a task's accuracies), or None when the run has none."""
    keys = sorted({k for r in rows for k in r if k.startswith(prefix)})
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for key in keys:
        x, y = series(rows, key)
        ax.plot(x, y, "o-" if len(x) < 3 else "-", ms=3, label=key[len(prefix):])
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return png(fig)


def stage_starts(rows: list[dict]) -> list[int]:
    """The first step of each stage of a ``moekit pipeline`` (its metrics mark them)."""
    return [r["step"] for r in rows if "stage/index" in r]


def stage_table(run_dir: Path) -> str:
    stages = json.loads((run_dir / "pipeline.json").read_text())["stages"]
    cells = "".join(
        f"<tr><td>{s['index']}</td><td>{html.escape(s['name'])}</td><td>{s['transform'] or 'train'}</td>"
        f"<td>{s['first_step']}</td><td>{s['steps']}</td><td>{s['flops']:.3e}</td>"
        f"<td>{'-' if s['val_start'] is None else format(s['val_start'], '.4f')}</td>"
        f"<td>{'-' if s['val_final'] is None else format(s['val_final'], '.4f')}</td></tr>" for s in stages)
    return ("<table><tr><th>stage</th><th>name</th><th>made by</th><th>first step</th><th>steps</th>"
            f"<th>training FLOPs</th><th>val loss at start</th><th>val loss at end</th></tr>{cells}</table>")


def growth_steps(rows: list[dict]) -> list[tuple[int, int]]:
    """[(step, experts after)] of the run's expert growths (train.expert_schedule)."""
    return [(r["step"], int(r["moe/num_experts"])) for r in rows if "growth/jump" in r]


def load_heatmaps(rows: list[dict], layers: list[int]) -> str:
    """Share of tokens per expert over time; experts added by a growth start blank (grey) before
    it, and each growth is a dashed white line."""
    fig, panels = per_layer(layers, 3.4)
    growths = growth_steps(rows)
    shares = {}
    for _, i in panels:
        steps, loads = series(rows, f"moe/layer{i}/load")
        width = max(len(load) for load in loads)
        shares[i] = steps, width, [[c / (sum(load) or 1) for c in load] + [math.nan] * (width - len(load))
                                   for load in loads]
    top = max((v for _, _, share in shares.values() for row in share for v in row if v == v), default=1.0)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    for ax, i in panels:
        steps, width, share = shares[i]
        # each logged load covers the steps since the previous log: (previous, step]
        edges = [0, *steps] if steps[0] > 0 else [steps[0] - 1, *steps]
        im = ax.pcolormesh(edges, [e - 0.5 for e in range(width + 1)], list(map(list, zip(*share))),
                           cmap=cmap, vmin=0.0, vmax=top, shading="flat")
        ax.invert_yaxis()
        for step, _ in growths:
            ax.axvline(step, color="white", lw=1, ls="--")
        ax.set_title(f"layer {i}: share of tokens", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
    fig.colorbar(im, ax=[ax for ax, _ in panels], fraction=0.046 / len(panels) ** 0.5)   # one scale for all
    return png(fig)


def growth_table(rows: list[dict]) -> str:
    cells = "".join(f"<tr><td>{r['step']}</td><td>{int(r['moe/num_experts'])}</td>"
                    f"<td>{r['growth/val_before']:.4f}</td><td>{r['growth/val_after']:.4f}</td>"
                    f"<td>{r['growth/jump']:+.4f}</td></tr>" for r in rows if "growth/jump" in r)
    return ("<table><tr><th>step</th><th>experts per MoE layer from then</th><th>val loss before</th>"
            f"<th>val loss after</th><th>jump</th></tr>{cells}</table>")


def final_loads(rows: list[dict], layers: list[int]) -> str:
    fig, panels = per_layer(layers, 2.8)
    for ax, i in panels:
        _, loads = series(rows, f"moe/layer{i}/load")
        last = loads[-1]
        total = sum(last) or 1
        ax.bar(range(len(last)), [c / total for c in last])
        ax.axhline(1 / len(last), color="gray", ls="--", lw=0.8)
        ax.set_title(f"layer {i}: final load", fontsize=9)
        ax.set_xlabel("expert")
    fig.tight_layout()
    return png(fig)


def breakdown_heatmaps(b: RoutingBreakdown, title: str) -> str:
    fig, panels = per_layer(sorted(b.counts), 0.5 * len(b.labels) + 1.8)
    for ax, i in panels:
        c = b.counts[i]
        p = c / c.sum(1, keepdims=True).clip(min=1)
        ax.imshow(p, aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_yticks(range(len(b.labels)), b.labels, fontsize=8)
        ax.set_xlabel("expert")
        ax.set_title(f"layer {i}: P(expert | {title})\nI = {b.mutual_information(i):.3f} bits", fontsize=9)
    fig.tight_layout()
    return png(fig)


def curve(rows_by_key: dict[str, list[dict]], key_fmt: str, layers: list[int], title: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 3))
    for i in layers:
        x, y = series(rows_by_key["run"], key_fmt.format(i=i))
        if x:
            ax.plot(x, y, label=f"layer {i}" if "{i}" in key_fmt else None)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    if "{i}" in key_fmt:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return png(fig)


def build_report(run_dir: Path, summary: dict, by_tag: RoutingBreakdown | None,
                 by_freq: RoutingBreakdown | None, baseline_dir: Path | None = None,
                 can_drop: bool = True, moe=None) -> str:
    """The page. ``by_tag`` is shown only when the data has more than one tag; the dropped
    fraction only when ``can_drop`` (a capacity) or when anything was dropped; the experts per
    token when tokens got varying numbers of them (``moe``, the run's MoEConfig, names the
    budget controller's knob and target)."""
    # an export (compress, extract, upcycle) has no training history: the routing panels only
    run_dir = Path(run_dir)
    exported = not (run_dir / "metrics.jsonl").exists() and (run_dir / "model.safetensors").exists()
    rows = [] if exported else read_metrics(run_dir)
    baseline = read_metrics(baseline_dir) if baseline_dir else None
    layers = sorted({int(k.split("/")[1][5:]) for r in rows for k in r if k.startswith("moe/layer")
                     and k.endswith("/load")})
    tps = series(rows, "perf/tokens_per_s")[1]
    _, val = series(rows, "loss/val")
    final = f"{val[-1]:.4f} (perplexity {math.exp(min(val[-1], 50)):.1f})" if val else "-"
    facts = {"run directory": str(run_dir), "steps": rows[-1]["step"] if rows else 0,
             "final validation loss": final,
             "median tokens/s": f"{statistics.median(tps):,.0f}" if tps else "-", **summary}
    if baseline:
        _, bval = series(baseline, "loss/val")
        facts["baseline"] = f"{baseline_dir} (final val loss {bval[-1]:.4f})" if bval else str(baseline_dir)
    sections = [("summary", "Run", facts_table(facts))]
    if baseline and rows:
        c = compare(run_dir, baseline_dir)
        sections.append(("baseline", "Against the baseline (validation loss: who reaches whose, when)",
                         comparison_table(c) + comparison_plot(c)))
    sections.append(("losses", "Loss curves", loss_curves(rows, baseline)))
    for sid, title, prefix, ylabel in (
            ("by-source", "Validation loss by source (data.mixture)", "loss/val/", "validation loss"),
            ("accuracy", "Task accuracy (validation while training, test at the end)", "acc/", "accuracy")):
        if (content := keyed_curves(rows, prefix, ylabel)) is not None:
            sections.append((sid, title, content))
    if (run_dir / "pipeline.json").exists():
        sections.append(("stages", "Stages (moekit pipeline; dashed red lines in the loss curves)",
                         stage_table(run_dir)))
    if growth_steps(rows):
        sections.append(("growth", "Expert growth (train.expert_schedule; dotted lines in the plots)",
                         growth_table(rows)))
    if layers:
        sections += [
            ("load-over-time", "Expert load over training (one colour scale)", load_heatmaps(rows, layers)),
            ("final-load", "Final load per expert (dashed: perfect balance)", final_loads(rows, layers)),
        ]
        dropped = any(r.get(f"moe/layer{i}/dropped_fraction", 0) > 0 for r in rows for i in layers)
        if can_drop or dropped:
            drops = curve({"run": rows}, "moe/layer{i}/dropped_fraction", layers,
                          "share of assignments dropped by capacity")
            sections.append(("drops", "Dropped fraction", drops))
    if (content := experts_per_token_section(rows, by_tag, by_freq, moe)) is not None:
        mode = f" (dynamic_k={moe.dynamic_k})" if moe is not None and moe.dynamic else ""
        sections.append(("experts-per-token", f"Experts per token{mode}", content))
    if by_tag is not None and by_tag.counts and len(by_tag.labels) > 1:
        mi = "".join(f"<tr><td>{i}</td><td>{by_tag.mutual_information(i):.3f}</td>"
                     f"<td>{by_tag.class_entropy(i):.3f}</td></tr>" for i in sorted(by_tag.counts))
        sections.append(("by-language", "Routing by language (validation split)",
                         breakdown_heatmaps(by_tag, "language")
                         + "<table><tr><th>layer</th><th>I(expert; language) bits</th>"
                         f"<th>H(language) bits</th></tr>{mi}</table>"))
    if by_freq is not None and by_freq.counts:
        sections.append(("by-frequency", "Routing by token-frequency class",
                         breakdown_heatmaps(by_freq, "frequency class")))
    sections.append(("throughput", "Throughput", curve({"run": rows}, "perf/tokens_per_s", [0], "tokens/s")))
    return page(f"moekit run report: {run_dir}", "moekit run report", sections)


def write_run_report(run_dir: Path, baseline: Path | None = None, out: Path | None = None,
                     windows: int = 512) -> tuple[Path, list[str]]:
    """Route ``windows`` validation windows of the run (by language, by token frequency), write
    the page to ``out`` (default RUN_DIR/report.html); returns (the page's path, a line per MoE
    layer with its mutual information)."""
    run_dir = Path(run_dir)
    model, tok, cfg = load_run(run_dir)
    data_dir = run_dir
    if (run_dir / "pipeline.json").exists():    # a moekit pipeline: the last stage's data
        data_dir = Path(json.loads((run_dir / "pipeline.json").read_text())["stages"][-1]["run_dir"])
    val, train = open_split(cfg, data_dir, "val"), open_split(cfg, data_dir, "train")
    by_tag, by_freq = routing_breakdown(model, val, frequency_class(train, tok.get_vocab_size()),
                                        max_windows=windows)
    flops = model_flops(model.cfg, cfg.data.seq_len)
    source = ("task", cfg.data.task) if cfg.data.task else ("corpus", cfg.data.corpus)
    summary = {source[0]: source[1], "parameters (total / active)":
               f"{flops['params_total']:,.0f} / {flops['params_active']:,.0f}",
               "experts": experts_line(cfg.model.moe)}
    can_drop = cfg.model.moe is not None and (cfg.model.moe.capacity_factor is not None
                                              or cfg.model.moe.router == "expert_choice")
    page_html = build_report(run_dir, summary, by_tag, by_freq, baseline, can_drop=can_drop,
                             moe=cfg.model.moe)
    out = Path(out) if out else run_dir / "report.html"
    write_text_atomic(out, page_html)          # a full disk leaves no truncated page
    tags = len(by_tag.labels) > 1
    dynamic = cfg.model.moe is not None and cfg.model.moe.dynamic
    lines = []
    for i in sorted(by_tag.counts):
        lang = (f"I(expert; language) = {by_tag.mutual_information(i):.3f} bits "
                f"(H(language) = {by_tag.class_entropy(i):.3f}), " if tags else "")
        k = f", {by_freq.overall_experts_per_token(i):.2f} experts per token" if dynamic else ""
        mi = by_freq.mutual_information(i)
        lines.append(f"layer {i}: {lang}I(expert; frequency class) = {mi:.3f} bits{k}")
    return out, lines


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
