"""Growing the experts during training against fixed expert counts, for equal steps.

    python bench/bench_expert_schedule.py --out /tmp/sched        # ~25 min on 2 cores

Every arm is the default recipe (parlspeech, 4 layers, d_model 256, experts of width 256,
top-2, 750 steps of 16 x 128 tokens, seed 0) run by ``moekit train``, one after the other on
an otherwise idle machine (wall-clock is compared):

    fixed-4       --set model.moe.num_experts=4
    fixed-16      --set model.moe.num_experts=16
    progressive   --set train.expert_schedule="4@0, 8@250, 16@500"   (and --noise-arms)

Prints a table (final validation loss, wall-clock and its ratio to fixed-16, the validation
loss just before and after each growth) and writes JSON (bench/results/expert_schedule.json)
and a plot (docs/expert_schedule.png). The goal: progressive ends within 0.02 nats of
fixed-16 at <= 0.8x its wall-clock.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import train_arm  # noqa: E402

from moekit.report.figures import read_metrics, series  # noqa: E402

COMMON = ["--no-progress", "--set", "train.eval_every=50"]


def arm(out: Path, name: str, sets: list[str]) -> dict:
    """Run one arm (or reuse its finished run dir) and read its curve and growths."""
    run = out / name
    wall_s = train_arm(run, COMMON, sets)
    rows = read_metrics(run)
    steps, val = series(rows, "loss/val")
    growths = [{"step": r["step"], "experts": int(r["moe/num_experts"]), "val_before": r["growth/val_before"],
                "val_after": r["growth/val_after"], "jump": r["growth/jump"]}
               for r in rows if "growth/jump" in r]
    tps = sorted(r["perf/tokens_per_s"] for r in rows if "perf/tokens_per_s" in r)
    return {"arm": name, "sets": sets, "wall_s": wall_s,
            "val": list(zip(steps, val)), "final_val": val[-1], "growths": growths,
            "median_tokens_per_s": tps[len(tps) // 2]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--schedule", default="4@0, 8@250, 16@500")
    ap.add_argument("--noise-arms", default="0.01", help="comma list of train.expert_growth_noise values, "
                    "one progressive arm each")
    ap.add_argument("--json", type=Path, default=ROOT / "bench/results/expert_schedule.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs/expert_schedule.png")
    args = ap.parse_args()
    arms = [arm(args.out, "fixed-16", ["model.moe.num_experts=16"]),
            arm(args.out, "fixed-4", ["model.moe.num_experts=4"])]
    for noise in [float(x) for x in args.noise_arms.split(",") if x.strip()]:
        arms.append(arm(args.out, f"progressive-noise{noise:g}",
                        [f'train.expert_schedule="{args.schedule}"', f"train.expert_growth_noise={noise}"]))
    ref = arms[0]
    print(f"\n{'arm':<24} {'final val':>9} {'vs fixed-16':>11} {'wall s':>7} {'x wall':>7}  growths "
          "(step: val before -> after)")
    for a in arms:
        g = ", ".join(f"{x['step']}: {x['val_before']:.4f} -> {x['val_after']:.4f} ({x['jump']:+.4f})"
                      for x in a["growths"])
        print(f"{a['arm']:<24} {a['final_val']:9.4f} {a['final_val'] - ref['final_val']:+11.4f} "
              f"{a['wall_s']:7.0f} {a['wall_s'] / ref['wall_s']:7.2f}  {g}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"schedule": args.schedule, "arms": arms}, indent=1))
    plot(arms, args.plot)


def plot(arms: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for a in arms:
        x, y = zip(*a["val"])
        ax.plot(x, y, marker="o", ms=2, label=f"{a['arm']} ({a['wall_s']:.0f} s)")
        for g in a["growths"]:
            ax.axvline(g["step"], color="gray", lw=0.5, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_ylim(top=min(7.0, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Growing experts 4 -> 8 -> 16 during training vs fixed counts (parlspeech)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
