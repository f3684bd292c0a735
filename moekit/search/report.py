"""search.html: the search report, a self-contained page in the run report's style
(moekit.report.html): summary, trials table, Pareto front or optimisation history, parameter
importances, and the validation-loss curves of the best trials."""

from __future__ import annotations

import html
import json
import math
import warnings
from pathlib import Path

from moekit.report.figures import facts_table, page, plt, png, read_metrics, series

BEST_CURVES = 5


def search_page(study, data: dict) -> str:
    trials, objectives = data["trials"], data["objectives"]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    sections = [("summary", "Search", facts_table(_facts(data))),
                ("trials", "Trials", trials_table(trials, objectives))]
    if len(objectives) > 1:
        sections.append(("pareto", "Pareto front", pareto_plot(complete, objectives) if complete
                         else "<p>No trial completed yet.</p>"))
    elif complete:
        sections.append(("history", "Objective per trial", history_plot(complete, objectives[0],
                                                                       data["directions"][0])))
    sections.append(("importance", "Parameter importances", importances(study, objectives)))
    sections.append(("curves", f"Validation loss of the best {BEST_CURVES} trials", loss_curves(complete)))
    return page(f"moekit search report: {data['study']}", "moekit search report", sections)


def _facts(data: dict) -> dict:
    trials = data["trials"]
    states = {s: sum(t["state"] == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    facts = {"study": data["study"], "storage": data["storage"],
             "objectives": ", ".join(f"{o} ({d})" for o, d in zip(data["objectives"], data["directions"])),
             "trials": ", ".join(f"{n} {s.lower()}" for s, n in states.items() if n)}
    best = next((t for t in trials if t["number"] == data["best"]), None)
    if best is not None:
        facts["best trial"] = f"{best['number']}: {_values(best)} with {json.dumps(best['params'])}"
    base = next((t for t in trials if t["baseline"] and t["state"] == "COMPLETE"), None)
    if base is not None:
        facts[f"base recipe (trial {base['number']})"] = _values(base)
    facts["search space"] = data["space"]
    return facts


def _values(t: dict) -> str:
    return ", ".join(f"{k} {_num(v)}" for k, v in (t["values"] or {}).items())


def _num(v) -> str:
    if isinstance(v, float) and (abs(v) >= 1e5 or v.is_integer()):
        return f"{v:,.0f}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def trials_table(trials: list[dict], objectives: list[str]) -> str:
    names = sorted({k for t in trials for k in t["params"]})
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["trial", "state", *objectives, *names, "note"])
    rows = []
    for t in trials:
        values = t["values"] or {}
        note = t["prune_reason"] or ("base recipe" if t["baseline"] else "")
        note += f" (retries trial {t['retry_of']})" if t.get("retry_of") is not None else ""
        note += " (Pareto front)" if t["pareto"] and len(objectives) > 1 else " (best)" if t["pareto"] else ""
        cells = [str(t["number"]), t["state"].lower(), *(_num(values[o]) if o in values else "-"
                                                         for o in objectives),
                 *(_num(t["params"][n]) if n in t["params"] else "-" for n in names), note.strip()]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def pareto_plot(complete: list[dict], objectives: list[str]) -> str:
    """The first objective against each other one; the Pareto front in colour."""
    first, others = objectives[0], objectives[1:]
    fig, axes = plt.subplots(1, len(others), figsize=(5 * len(others), 3.6), squeeze=False)
    for ax, other in zip(axes[0], others):
        for front, style in ((False, dict(color="#bbbbbb", label="dominated")),
                             (True, dict(color="C3", label="Pareto front"))):
            pts = [t for t in complete if t["pareto"] == front]
            ax.scatter([t["values"][other] for t in pts], [t["values"][first] for t in pts], s=28, **style)
            for t in pts if front else ():
                ax.annotate(str(t["number"]), (t["values"][other], t["values"][first]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(other)
        ax.set_ylabel(first)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return png(fig)


def history_plot(complete: list[dict], objective: str, direction: str) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    xs = [t["number"] for t in complete]
    ys = [t["values"][objective] for t in complete]
    pick = min if direction == "minimize" else max
    ax.plot(xs, ys, "o", ms=4, label="trial")
    ax.step(xs, [pick(ys[:i + 1]) for i in range(len(ys))], where="post", color="C3", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(objective)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png(fig)


def importances(study, objectives: list[str]) -> str:
    """optuna.importance.get_param_importances per objective, as bars; or why there are none."""
    import optuna
    from optuna.trial import TrialState
    n = sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
    if n < 2:
        return f"<p>Not computed: {n} complete trial{'s' * (n != 1)}; importances need at least 2.</p>"
    found = {}
    for i, name in enumerate(objectives):
        sign = -1.0 if study.directions[i].name == "MAXIMIZE" else 1.0    # PED-ANOVA looks for low targets
        try:
            with warnings.catch_warnings():     # PED-ANOVA's notes on few trials: the bars say it
                warnings.simplefilter("ignore", UserWarning)
                found[name] = optuna.importance.get_param_importances(
                    study, target=lambda t, i=i, sign=sign: sign * t.values[i])
        except (RuntimeError, ValueError, ZeroDivisionError) as err:
            return f"<p>Not computed: Optuna says {html.escape(str(err).splitlines()[0])}</p>"
    if not any(found.values()):
        return "<p>Not computed: no parameter varied among the complete trials.</p>"
    rows = max(len(imp) for imp in found.values())
    fig, axes = plt.subplots(1, len(found), figsize=(4.5 * len(found), 0.35 * rows + 1.5), squeeze=False)
    for ax, (name, imp) in zip(axes[0], found.items()):
        keys = list(imp)[::-1]
        ax.barh(keys, [imp[k] for k in keys])
        ax.set_title(f"importance for {name}", fontsize=9)
        ax.set_xlim(0, 1)
    fig.tight_layout()
    return png(fig)


def loss_curves(complete: list[dict]) -> str:
    """loss/val over steps of the lowest-val-loss trials (and the base recipe, dashed)."""
    ranked = sorted(complete, key=lambda t: _loss(t))[:BEST_CURVES]
    ranked += [t for t in complete if t["baseline"] and t not in ranked]
    drawn = [(t, Path(t["run_dir"])) for t in ranked
             if t["run_dir"] and (Path(t["run_dir"]) / "metrics.jsonl").exists()]
    if not drawn:
        return "<p>No complete trial with a run directory here.</p>"
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for t, run_dir in drawn:
        x, y = series(read_metrics(run_dir), "loss/val")
        ax.plot(x, y, "--" if t["baseline"] else "-", marker="o", ms=3,
                label=f"trial {t['number']}" + (" (base recipe)" if t["baseline"] else ""))
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png(fig)


def _loss(t: dict) -> float:
    v = t["measured"].get("val_loss")
    return math.inf if v is None or v != v else v
