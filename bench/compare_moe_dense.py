"""The default MoE recipe against its dense twin (equal active parameters), seed by seed.

    python bench/compare_moe_dense.py --out /tmp/cmp --corpus parlspeech --seeds 0,1 \
        --json bench/results/moe_vs_dense_parl.json --plot docs/moe_vs_dense_parl.png

Trains ``configs/tiny-moe.toml`` and ``configs/tiny-dense.toml`` (``--moe-config`` and
``--dense-config`` for others) one after the other for each seed, with ``--set`` extras for
both, then compares each MoE run with its seed's dense run (moekit.report.compare, the same
numbers ``moekit report MOE --baseline DENSE`` shows): final validation losses, the steps and
the training seconds at which the MoE reaches the dense run's final loss, as a share of the
dense run's. A finished run is reused, so an interrupted comparison continues. Prints a
table, writes JSON and a plot of validation loss against steps and against seconds. Seconds
compare only on an otherwise idle machine: arms run one at a time, never beside another job.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _common import train_arm  # noqa: E402

from moekit.report.compare import compare  # noqa: E402


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
        return name + (" (AMX)" if "amx_bf16" in out else "")
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def spread(values: list[float]) -> str:
    return (f"{statistics.fmean(values):.3f} ({min(values):.3f}-{max(values):.3f})" if values else "-")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="a directory for the runs (reused when it holds them)")
    ap.add_argument("--corpus", default="parlspeech")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--moe-config", default=str(ROOT / "configs" / "tiny-moe.toml"))
    ap.add_argument("--dense-config", default=str(ROOT / "configs" / "tiny-dense.toml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for both arms")
    ap.add_argument("--moe-set", action="append", default=[], metavar="KEY=VALUE", help="for the MoE only")
    ap.add_argument("--dense-set", action="append", default=[], metavar="KEY=VALUE",
                    help="for the dense only")
    ap.add_argument("--eval-every", type=int, default=50, help="evaluations for the crossing (default 50)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    common = [f"data.corpus={args.corpus}", f"train.eval_every={args.eval_every}", *args.set]
    pairs = {}
    for seed in seeds:
        runs = {}
        for arm, config, own in (("moe", args.moe_config, args.moe_set),
                                 ("dense", args.dense_config, args.dense_set)):
            runs[arm] = out / f"{arm}-s{seed}"
            train_arm(runs[arm], ["--config", config, "--no-progress"], [*common, *own, f"train.seed={seed}"])
        pairs[seed] = compare(runs["moe"], runs["dense"])
    head = ["seed", "dense final", "MoE final", "MoE - dense", "steps to dense final", "time to dense final"]
    lines = [head] + [[str(s), f"{c['baseline_final_val']:.4f}", f"{c['final_val']:.4f}",
                       f"{c['delta']:+.4f}", "-" if c["steps_ratio"] is None else f"{c['steps_ratio']:.2f}x",
                       "-" if c["seconds_ratio"] is None else f"{c['seconds_ratio']:.2f}x"]
                      for s, c in pairs.items()]
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    print(f"{args.corpus}, seeds {args.seeds}, {cpu_name()}")
    for r in lines:
        print("  ".join(x.rjust(w) for x, w in zip(r, widths)))
    ratios = [c["steps_ratio"] for c in pairs.values() if c["steps_ratio"] is not None]
    times = [c["seconds_ratio"] for c in pairs.values() if c["seconds_ratio"] is not None]
    deltas = [c["delta"] for c in pairs.values()]
    summary = {"corpus": args.corpus, "cpu": cpu_name(), "sets": common, "moe_sets": args.moe_set,
               "dense_sets": args.dense_set, "seeds": seeds,
               "steps_ratio": spread(ratios), "seconds_ratio": spread(times), "delta": spread(deltas),
               "reached": f"{len(ratios)} of {len(pairs)}", "pairs": {str(s): c for s, c in pairs.items()}}
    print(f"mean (min-max): steps {summary['steps_ratio']}, time {summary['seconds_ratio']}, "
          f"MoE - dense {summary['delta']} nats; reached in {summary['reached']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1))
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for seed, c in pairs.items():
            for ax, (moe, dense, xlabel) in zip(axes, ((c["curves"]["run"], c["curves"]["baseline"], "step"),
                                                       (c["curves"]["run_by_s"], c["curves"]["baseline_by_s"],
                                                        "training seconds"))):
                ax.plot(*zip(*dense), "--", color="C0", alpha=0.8, label=f"dense, seed {seed}")
                ax.plot(*zip(*moe), "-", color="C1", alpha=0.8, label=f"MoE, seed {seed}")
                ax.axhline(c["baseline_final_val"], color="gray", lw=0.6, ls="--")
                ax.set_xlabel(xlabel)
                ax.set_ylabel("validation loss")
        axes[0].legend(fontsize=7)
        axes[0].set_title(f"{args.corpus}: MoE vs its dense twin (equal active parameters)", fontsize=9)
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
