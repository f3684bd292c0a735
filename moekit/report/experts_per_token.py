"""The run report's "Experts per token" section, for a router that gives each token its own
number of experts (``MoEConfig.dynamic_k``, or expert choice): how many experts a token got
over training and in the last logging interval, the compute-budget controller's knob, and the
mean number of experts by token-frequency class and by tag from the routing breakdown.

Reads the telemetry's ``moe/layer{i}/experts_per_token``, ``k_hist``, ``k_control`` and
``sparsity_loss`` (moekit.train.telemetry).
"""

from __future__ import annotations

import html

from matplotlib.ticker import MaxNLocator

from moekit.model.routing import RoutingBreakdown
from moekit.moe.config import MoEConfig
from moekit.report.figures import per_layer, plt, png, series

KNOBS = {"top_p": "p (probability mass taken)", "null": "null experts' logit bias",
         "relu": "L1 coefficient"}


def k_layers(rows: list[dict]) -> list[int]:
    """The MoE layers whose experts per token the run logged."""
    return sorted({int(k.split("/")[1][5:]) for r in rows for k in r
                   if k.startswith("moe/layer") and k.endswith("/experts_per_token")})


def k_varies(rows: list[dict]) -> bool:
    """True when tokens got a varying number of experts: a budget controller's knob was logged,
    or some interval's histogram is not all on one number (a fixed top-k's always is)."""
    for r in rows:
        for key, value in r.items():
            if not key.startswith("moe/layer"):
                continue
            if key.endswith("/k_control"):
                return True
            if key.endswith("/k_hist") and sum(value) > 0 and max(value) < (1 - 1e-6) * sum(value):
                return True
    return False


def mean_k_curves(rows: list[dict], layers: list[int], target: float | None) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for i in layers:
        ax.plot(*series(rows, f"moe/layer{i}/experts_per_token"), label=f"layer {i}")
    if target is not None:
        ax.axhline(target, color="gray", ls="--", lw=0.8, label=f"target_k = {target:g}")
    ax.set_title("mean experts per token (each logging interval)", fontsize=10)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("experts per token")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return png(fig)


def k_histograms(rows: list[dict], layers: list[int]) -> str:
    fig, panels = per_layer(layers, 2.8)
    for ax, i in panels:
        steps, hists = series(rows, f"moe/layer{i}/k_hist")
        _, means = series(rows, f"moe/layer{i}/experts_per_token")
        hist = hists[-1]
        ax.bar(range(len(hist)), hist)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"layer {i}: step {steps[-1]}, mean {means[-1]:.2f}", fontsize=9)
        ax.set_xlabel("experts per token")
    panels[0][0].set_ylabel("share of tokens")
    fig.tight_layout()
    return png(fig)


def k_control_curves(rows: list[dict], layers: list[int], mode: str | None) -> str:
    sparsity = any(f"moe/layer{i}/sparsity_loss" in r for r in rows for i in layers)
    fig, axes = plt.subplots(1, 1 + sparsity, figsize=(6.5 * (1 + sparsity), 3.2), squeeze=False)
    for ax, key, title in zip(axes[0], ("k_control", "sparsity_loss"),
                              (f"budget controller: {KNOBS.get(mode, 'its knob (k_control)')}",
                               "relu L1 penalty (coefficient x load-weighted mean gate)")):
        for i in layers:
            x, y = series(rows, f"moe/layer{i}/{key}")
            if x:
                ax.plot(x, y, "o-" if len(x) < 3 else "-", ms=3, label=f"layer {i}")
        if mode == "relu" and key == "k_control" and all(v > 0 for i in layers
                                                          for v in series(rows, f"moe/layer{i}/{key}")[1]):
            ax.set_yscale("log")   # the L1 coefficient moves by a factor per step
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return png(fig)


def class_table(b: RoutingBreakdown, what: str) -> str:
    """Mean experts per token, a row per layer and a column per class (and all tokens)."""
    k = b.experts_per_token()
    first = b.tokens[min(k)]
    share = first / max(first.sum(), 1)
    head = "".join(f"<th>{html.escape(label)}<br>({s:.0%} of tokens)</th>"
                   for label, s in zip(b.labels, share))
    body = ""
    for i, by_class in k.items():
        cells = "".join(f"<td>{by_class[label]:.2f}</td>" if label in by_class else "<td>-</td>"
                        for label in b.labels)
        body += f"<tr><td>{i}</td>{cells}<td>{b.overall_experts_per_token(i):.2f}</td></tr>"
    return (f"<p>Mean experts per token by {html.escape(what)} (validation split):</p>"
            f"<table><tr><th>layer</th>{head}<th>all tokens</th></tr>{body}</table>")


def experts_per_token_section(rows: list[dict], by_tag: RoutingBreakdown | None,
                              by_freq: RoutingBreakdown | None, moe: MoEConfig | None = None) -> str | None:
    """The section's content, or None for a run without logged experts per token or whose
    tokens all got the same number (a fixed top-k). ``moe`` names the knob and the target."""
    layers = k_layers(rows)
    if not layers or not k_varies(rows):
        return None
    mode = moe.dynamic_k if moe is not None and moe.dynamic else None
    parts = [mean_k_curves(rows, layers, moe.target_k if moe is not None else None)]
    hist_layers = [i for i in layers if any(f"moe/layer{i}/k_hist" in r for r in rows)]
    if hist_layers:
        parts.append("<p>Experts per token in the last logging interval:</p>"
                     + k_histograms(rows, hist_layers))
    if any(f"moe/layer{i}/k_control" in r for r in rows for i in layers):
        parts.append(k_control_curves(rows, layers, mode))
    for b, what, min_classes in ((by_freq, "token-frequency class", 1), (by_tag, "language (tag)", 2)):
        if b is not None and b.experts_per_token() and len(b.labels) >= min_classes:
            parts.append(class_table(b, what))
    return "\n".join(parts)
