"""MoE recipe vs its dense baseline (equal active parameters): validation-loss curves.

    moekit train --config configs/tiny-moe.toml --set train.eval_every=25 --out runs/cmp-moe
    moekit train --config configs/tiny-dense.toml --set train.eval_every=25 --out runs/cmp-dense
    python bench/compare_moe_dense.py runs/cmp-moe runs/cmp-dense     # -> docs/moe_vs_dense.png + JSON

Reports each run's final validation loss and the step at which the MoE first reaches the
dense baseline's final validation loss (linear interpolation between evaluations), so
"steps to dense quality" = that step / the dense run's steps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import first_below  # noqa: E402

from moekit.report.figures import read_metrics, series  # noqa: E402


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    return list(zip(*series(read_metrics(run_dir), "loss/val")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("moe_run")
    ap.add_argument("dense_run")
    ap.add_argument("--plot", default="docs/moe_vs_dense.png")
    ap.add_argument("--out", default="bench/results/moe_vs_dense.json")
    args = ap.parse_args()
    moe, dense = val_curve(Path(args.moe_run)), val_curve(Path(args.dense_run))
    if not moe or not dense:
        sys.exit("both runs need validation losses in metrics.jsonl (train with eval_every set)")
    target = dense[-1][1]
    reach = first_below(moe, target)
    result = {"moe_final_val": moe[-1][1], "dense_final_val": target, "dense_steps": dense[-1][0],
              "moe_steps_to_dense_final": reach,
              "steps_ratio": None if reach is None else reach / dense[-1][0],
              "moe_curve": moe, "dense_curve": dense}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(*zip(*dense), "o-", ms=3, label=f"dense baseline (final {target:.3f})")
    ax.plot(*zip(*moe), "o-", ms=3, label=f"MoE, 8 experts top-2 (final {moe[-1][1]:.3f})")
    ax.axhline(target, color="gray", lw=0.8, ls="--")
    if reach is not None:
        ax.axvline(reach, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("parlspeech, equal active parameters per token")
    ax.legend()
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("curve")}, indent=1))


if __name__ == "__main__":
    main()
