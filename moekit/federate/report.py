"""The report of a federation (``moekit report OUT`` on a ``moekit federate`` directory): the
clients' validation losses per round, each client's model on every client's data, bytes per
round, and whether experts with the same index mean the same across clients."""

from __future__ import annotations

import re
from pathlib import Path

from moekit.federate.spec import FederationSpec, last_round
from moekit.report.figures import facts_table, page, plt, png, read_metrics, series


def _clients(rows: list[dict]) -> list[int]:
    found = {int(m.group(1)) for r in rows for k in r if (m := re.match(r"client(\d+)/", k))}
    return sorted(found)


def _round_panel(fig, ax, ylabel: str | None = None, grid: bool = True) -> str:
    """A per-round panel's axes, legend and layout, as an <img>."""
    ax.set_xlabel("round")
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    if grid:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return png(fig)


def loss_figure(rows: list[dict], clients: list[int], shards: list[str]) -> str:
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for i in clients:
        name = shards[i] if i < len(shards) else f"client{i}"
        x, y = series(rows, f"client{i}/val_loss")
        line = ax.plot(x, y, "o-", ms=3, label=f"client{i} ({name}): round's model")[0]
        x, y = series(rows, f"client{i}/local_val_loss")
        ax.plot(x, y, "x--", ms=4, color=line.get_color(), alpha=0.6, label=f"client{i}: after local steps")
    return _round_panel(fig, ax, "validation loss on own data")


def cross_table(row: dict, clients: list[int]) -> str:
    """client i's model (rows) on client j's validation data (columns), the last round."""
    head = "".join(f"<th>data of client{j}</th>" for j in clients)
    body = ""
    for i in clients:
        cells = ""
        for j in clients:
            key = f"client{i}/val_loss" if i == j else f"client{i}/val_loss_on_client{j}"
            value = row.get(key)
            cells += f"<td>{'-' if value is None else f'{value:.3f}'}</td>"
        body += f"<tr><th>model of client{i}</th>{cells}</tr>"
    return f"<table><tr><th></th>{head}</tr>{body}</table>"


def bytes_figure(rows: list[dict]) -> str:
    fig, ax = plt.subplots(figsize=(7.5, 3.0))
    x = [r["step"] for r in rows]
    bottom = [0.0] * len(rows)
    for key, label in (("bytes/down", "server to clients"), ("bytes/up", "clients to server (weights)"),
                       ("bytes/probe_up", "clients to server (probe)")):
        y = [r.get(key, 0.0) / 2**20 for r in rows]
        ax.bar(x, y, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, y)]
    return _round_panel(fig, ax, "MiB", grid=False)


def similarity_figure(rows: list[dict]) -> str | None:
    keys = sorted({k for r in rows for k in r if k.startswith(("routing/layer", "experts/layer"))})
    if not keys:
        return None
    kinds = sorted({k.split("/", 2)[0] + "/" + k.split("/", 2)[2] for k in keys})
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for kind in kinds:
        group, name = kind.split("/")
        per_layer = [k for k in keys if k.startswith(group + "/") and k.endswith("/" + name)]
        x = [r["step"] for r in rows]
        y = [sum(r.get(k, float("nan")) for k in per_layer) / len(per_layer) for r in rows]
        ax.plot(x, y, "o-", ms=3, label=f"{name} (mean over layers)")
    ax.set_ylim(-0.05, 1.05)
    return _round_panel(fig, ax)


def participation(rows: list[dict]) -> str:
    body = "".join(f"<tr><td>{r['step']}</td><td>{int(r.get('clients/trained', 0))}</td>"
                   f"<td>{int(r.get('clients/failed', 0))}</td><td>{r.get('time/round_s', 0):.0f}</td></tr>"
                   for r in rows)
    return ("<table><tr><th>round</th><th>clients trained</th><th>failed</th><th>seconds</th></tr>"
            f"{body}</table>")


def build_federated_report(out: Path) -> str:
    spec = FederationSpec.load(out)
    rows = read_metrics(out)
    if not rows:
        raise ValueError(f"{str(out)!r}: the federation has not finished a round yet; report it after one")
    clients = _clients(rows)
    last = rows[-1]
    facts = {"clients": ", ".join(f"client{i}: {s}" for i, s in enumerate(spec.shards)),
             "strategy": spec.strategy, "rounds": f"{last_round(out)} of {spec.rounds}",
             "local steps a round": spec.local_steps,
             "a round needs": f"{spec.quorum} of {spec.clients} replies",
             "mean validation loss, last round": f"{last.get('val_loss/mean', float('nan')):.4f}",
             "communicated": f"{sum(r.get('bytes/total', 0) for r in rows) / 2**20:.1f} MiB"}
    sim = similarity_figure(rows)
    sections = [("summary", "Federation", facts_table(facts)),
                ("losses", "Validation loss per client", loss_figure(rows, clients, spec.shards)),
                ("cross", f"Each client's model on each client's data (round {last['step']})",
                 cross_table(last, clients)
                 + ("<p>Under local-experts a client's model is the averaged shared tensors with its own "
                    "experts; the off-diagonal cells are measured on this machine from the clients' run "
                    "directories, outside the protocol.</p>" if spec.strategy == "local-experts" else "")),
                ("bytes", "Bytes per round", bytes_figure(rows)),
                ("participation", "Participation", participation(rows))]
    if sim is not None:
        sections.insert(3, ("similarity", "Do experts with the same index mean the same across clients?",
                            sim + "<p>Mean over client pairs, after each round's local training, on a seeded "
                            "random probe: top1_agreement (both routers pick the same expert), load_cosine "
                            "(tokens per expert on own data), same_index_cos / other_index_cos (expert e's "
                            "outputs vs expert e's / another expert's on the other client), same_index_match "
                            "(the closest expert on the other client has the same index).</p>"))
    return page(f"moekit federation report: {out}", f"moekit federation report: {out}",
                sections)


def write_federated_report(out: Path, path: Path | None = None) -> Path:
    """The federation's page, written to ``path`` (default OUT/report.html)."""
    path = Path(path) if path else Path(out) / "report.html"
    path.write_text(build_federated_report(Path(out)), encoding="utf-8")
    return path
