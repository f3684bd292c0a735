"""The expert-count scaling curve: dense and MoE variants at equal active parameters and equal
steps, in one command.

    python bench/sweep_experts.py --out /tmp/sweep --corpus news-en --experts 4,8,16,32 --seeds 0,1
    python bench/sweep_experts.py --out /tmp/sweep-p --corpus parlspeech --steps 400 \
        --granularity 2,4 --shared

Every arm is ``moekit train`` on the default recipe (4 layers, d_model 256, top-2 experts of
width 256 = a dense SwiGLU of width 512 in active parameters) with ``--set`` overrides:

    dense        model.moe=false, model.d_ff=512
    E<n>         model.moe.num_experts=n
    E<8m>-g<m>   fine-grained (MoEConfig.with_granularity(m) of the 8-expert MoE):
                 8m experts of width 256/m, top-2m
    E8-shared    one shared expert + top-1 of 8 routed (the same active width)

run one after the other (the wall-clock is comparable only on an otherwise idle machine;
``--extra`` adds ``--set`` to every arm, e.g. ``--extra train.max_steps=400``). A finished
arm's run directory is reused, so an interrupted sweep continues.

Reported per arm, with the spread (min-max) over seeds: the final validation loss, the steps
at which it first reaches the same seed's dense final loss as a share of the dense run's
steps (linear interpolation between evaluations; ">1" = never), the most dead experts in
any layer and logging interval after warmup, and the wall-clock. Writes JSON
(``--json``), a plot of validation loss against steps and against wall-clock (``--plot``)
and a self-contained HTML page (OUT/sweep.html).
"""

from __future__ import annotations

import argparse
import html
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import train_arm  # noqa: E402

from moekit.report.compare import first_below  # noqa: E402
from moekit.report.figures import png, read_metrics, series  # noqa: E402


def arms(experts: list[int], granularity: list[int], shared: bool, dense: bool,
         d_ff: int = 256) -> dict[str, list[str]]:
    """{arm: its --set list}; ``d_ff``: the experts' width (top-2, so the dense FFN is 2 x d_ff)."""
    width = [f"model.moe.d_ff={d_ff}"]
    out = {"dense": ["model.moe=false", f"model.d_ff={2 * d_ff}"]} if dense else {}
    for n in experts:
        out[f"E{n}"] = [f"model.moe.num_experts={n}", *width]
    for m in granularity:
        out[f"E{8 * m}-g{m}"] = [f"model.moe.num_experts={8 * m}", f"model.moe.d_ff={d_ff // m}",
                                 f"model.moe.top_k={2 * m}"]
    if shared:
        out["E8-shared"] = ["model.moe.num_experts=8", "model.moe.top_k=1", "model.moe.num_shared_experts=1",
                            *width]
    return out


def read_arm(run: Path, wall_s: float) -> dict:
    rows = read_metrics(run)
    cfg = json.loads((run / "config.json").read_text())
    steps, val = series(rows, "loss/val")
    warmup = cfg["train"]["warmup_steps"]
    dead = [v for r in rows if r["step"] > warmup for k, v in r.items() if k.endswith("/dead_experts")]
    return {"val": list(zip(steps, val)), "final_val": val[-1], "wall_s": wall_s,
            "max_steps": cfg["train"]["max_steps"], "max_dead_after_warmup": max(dead, default=0.0),
            "dead_intervals_after_warmup": sum(v > 0 for v in dead)}


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.4f}" if len(values) == 1 else f"{mean:.4f} ({min(values):.4f}-{max(values):.4f})"


def summarize(results: dict[str, dict[int, dict]]) -> list[dict]:
    rows = []
    for name, by_seed in results.items():
        ratios = []
        for seed, r in by_seed.items():
            dense = results.get("dense", {}).get(seed)
            if dense is None or name == "dense":
                continue
            reach = first_below(r["val"], dense["final_val"])
            ratios.append(reach / dense["max_steps"] if reach is not None else float("inf"))
        finals = [r["final_val"] for r in by_seed.values()]
        rows.append({"arm": name, "final_val_mean": statistics.fmean(finals), "final_val": finals,
                     "steps_to_dense": ratios, "wall_s": [r["wall_s"] for r in by_seed.values()],
                     "max_dead_after_warmup": max(r["max_dead_after_warmup"] for r in by_seed.values())})
    return rows


def table(rows: list[dict]) -> list[list[str]]:
    def ratio(v: list[float]) -> str:
        if not v:
            return "-"
        shown = [f"{x:.2f}" if x != float("inf") else ">1" for x in v]
        return " / ".join(shown)
    out = [["arm", "final val loss (min-max over seeds)", "steps to dense final loss (per seed)",
            "dead experts after warmup (max)", "wall-clock s (mean)"]]
    for r in rows:
        out.append([r["arm"], spread(r["final_val"]), ratio(r["steps_to_dense"]),
                    f"{r['max_dead_after_warmup']:.0f}", f"{statistics.fmean(r['wall_s']):.0f}"])
    return out


def plot(results: dict, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, by_seed) in enumerate(results.items()):
        color = f"C{i}"
        for j, r in enumerate(by_seed.values()):
            x, y = zip(*r["val"])
            label = name if j == 0 else None
            a.plot(x, y, color=color, lw=1, label=label)
            per_step = r["wall_s"] / r["max_steps"]
            b.plot([s * per_step for s in x], y, color=color, lw=1, label=label)
    for ax, xlabel in ((a, "step"), (b, "wall-clock s (uniform per step)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.set_ylim(top=min(7.0, ax.get_ylim()[1]))
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--corpus", default="news-en")
    ap.add_argument("--experts", default="4,8,16,32")
    ap.add_argument("--granularity", default="", help="fine-grained variants of the 8-expert MoE, e.g. 2,4")
    ap.add_argument("--shared", action="store_true", help="add one shared expert + top-1 of 8")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--expert-d-ff", type=int, default=256, help="the experts' width (the recipe's: d_model)")
    ap.add_argument("--extra", action="append", default=[], help="a --set for every arm")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: report the arms whose runs finished (each with the seeds it has)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    plan = arms(ints(args.experts), ints(args.granularity), args.shared, not args.no_dense, args.expert_d_ff)
    given = {e.split("=", 1)[0].strip() for e in args.extra}
    defaults = (f'data.corpus="{args.corpus}"', f"train.max_steps={args.steps}", "train.eval_every=50")
    common = [s for s in defaults if s.split("=", 1)[0] not in given] + args.extra
    results: dict[str, dict[int, dict]] = {}
    for seed in ints(args.seeds):
        for name, sets in plan.items():
            run = args.out / f"{name}-s{seed}"
            if args.report_only and not (run / "wall_s.json").exists():
                continue
            wall = train_arm(run, ["--no-progress"], [*common, f"train.seed={seed}", *sets])
            results.setdefault(name, {})[seed] = read_arm(run, wall)
    rows = summarize(results)
    grid = table(rows)
    print("\n" + "\n".join(" | ".join(r) for r in grid))
    title = f"{args.corpus}: {args.steps} steps, seeds {args.seeds}, equal active parameters"
    fig = plot(results, title)
    if args.plot:
        fig.savefig(args.plot, dpi=110)
    page = ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>moekit expert sweep</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px}"
            "td,th{padding:.2rem .8rem;text-align:left}</style></head><body>"
            f"<h1>Expert-count sweep</h1><p>{html.escape(title)}</p><table>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in grid)
            + f"</table>{png(fig)}</body></html>")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.html").write_text(page, encoding="utf-8")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"corpus": args.corpus, "steps": args.steps, "extra": args.extra,
                                         "summary": rows, "runs": {k: {str(s): v for s, v in d.items()}
                                                                   for k, d in results.items()}}, indent=1))
    print(f"wrote {args.out / 'sweep.html'}")


if __name__ == "__main__":
    main()
