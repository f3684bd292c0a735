"""Sparse upcycling at a scale this machine runs to the end: a dense model moekit pretrains
itself, continued for an equal extra budget as a dense model and as upcycled MoEs.

    python bench/bench_upcycle_continue.py --out /tmp/uc --seeds 0,1      # ~25 min per seed on 2 cores

Per seed: ``moekit train --config configs/tiny-dense.toml`` for ``--pre-steps`` steps of one
schedule planned over pre + extra steps (``train.decay_steps``), then each arm continues it
for ``--steps`` more steps with the pretraining run's AdamW state (``train.init_optimizer``)
and the schedule going on (``train.schedule_start``), on the same batches (``train.seed``):

- dense:    the run itself, continued
- copy:     ``moekit upcycle --experts 8 --top-k 2`` (twice the dense active FFN width)
- drop:     the same with ``--method drop --drop-ratio 0.1`` (Drop-Upcycling at a small ratio)
- vg:       ``--method virtual-group --granularity 4 --experts 16 --top-k 4``: experts of width
            d_ff / 4, the dense model's active width (equal FLOPs per token)
- vg-stk:   vg with softmax-then-top-k and its weight scaling (Megatron's granular upcycling:
            ``--set normalize_topk=false --router-init zeros``)

Each arm logs its validation loss at step 0 (``train.eval_at_start``) and every
``--eval-every`` steps. Reports per arm the final loss, its step-0 loss and its highest loss
after the first 10% of the continuation, the extra training FLOPs (the model's own
``model_flops`` x tokens), the loss at the dense arm's extra FLOPs, and where it crosses the
dense arm's final loss; seconds are training seconds from the logs (quiet machine only).
JSON to ``--json``, a plot of validation loss against extra FLOPs to ``--plot``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _common import train_arm  # noqa: E402
from compare_moe_dense import cpu_name  # noqa: E402

from moekit.cli.main import main as moekit_cli  # noqa: E402
from moekit.model.transformer import model_flops  # noqa: E402
from moekit.report.compare import first_below, train_seconds  # noqa: E402
from moekit.report.figures import read_metrics, series  # noqa: E402
from moekit.store.run_dir import load_run  # noqa: E402

ARMS = {"dense": None,
        "copy": ["--experts", "8", "--top-k", "2"],
        "drop": ["--experts", "8", "--top-k", "2", "--method", "drop", "--drop-ratio", "0.1"],
        "vg": ["--experts", "16", "--top-k", "4", "--method", "virtual-group", "--granularity", "4"],
        "vg-stk": ["--experts", "16", "--top-k", "4", "--method", "virtual-group", "--granularity", "4",
                   "--set", "normalize_topk=false", "--router-init", "zeros"]}


def at(curve: list[tuple[float, float]], x: float) -> float | None:
    """The curve's loss at ``x`` (linear between points; None past its end)."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return None


def arm_curves(run: Path) -> dict:
    cfg = json.loads((run / "config.json").read_text())
    model, _, _ = load_run(run)
    tokens = cfg["train"]["batch_size"] * cfg["data"]["seq_len"]
    per_step = model_flops(model.cfg, cfg["data"]["seq_len"])["flops_per_token"] * tokens
    rows = read_metrics(run)
    steps, losses = series(rows, "loss/val")
    secs = train_seconds(rows, tokens)
    pts = list(zip(steps, losses))
    return {"by_step": pts, "by_flops": [(s * per_step, v) for s, v in pts],
            "by_s": [(secs[s] if s else 0.0, v) for s, v in pts if s == 0 or s in secs],
            "flops_per_step": per_step, "params": model_flops(model.cfg)["params_total"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--corpus", default="parlspeech")
    ap.add_argument("--pre-steps", type=int, default=500)
    ap.add_argument("--steps", type=int, default=500, help="the continuation's steps, every arm")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for every run")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    total = args.pre_steps + args.steps
    common = [f"data.corpus={args.corpus}", f"train.eval_every={args.eval_every}",
              f"train.decay_steps={total}", "train.warmup_steps=100", *args.set]
    arms = args.arms.split(",")
    results = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        base = args.out / f"s{seed}"
        pre = base / "pre"
        train_arm(pre, ["--config", str(ROOT / "configs" / "tiny-dense.toml"), "--no-progress"],
                  [*common, f"train.max_steps={args.pre_steps}", f"train.seed={seed}"])
        curves = {}
        for arm in arms:
            src = pre
            if ARMS[arm] is not None:
                src = base / f"{arm}-model"
                if not (src / "model.safetensors").exists():
                    print(f"$ moekit upcycle {pre} {' '.join(ARMS[arm])} --out {src}", flush=True)
                    if moekit_cli(["upcycle", str(pre), *ARMS[arm], "--seed", str(seed), "--out", str(src)]):
                        raise SystemExit(f"upcycle {arm} failed")
            run = base / arm
            train_arm(run, ["--from", str(src), "--no-progress"],
                      [*common, f"train.max_steps={args.steps}", f"train.seed={seed + 100}",
                       "train.init_optimizer=true", f"train.schedule_start={args.pre_steps}",
                       "train.eval_at_start=true"])
            curves[arm] = arm_curves(run)
        results[seed] = curves
    rows = summarize(results, arms, args.steps)
    out = {"cpu": cpu_name(), "corpus": args.corpus, "pre_steps": args.pre_steps, "steps": args.steps,
           "sets": common, "arms": rows, "curves": {str(s): c for s, c in results.items()}}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    if args.plot:
        plot(results, arms, args.plot, args.corpus)


def summarize(results: dict, arms: list[str], steps: int) -> dict:
    table = {}
    for arm in arms:
        per_seed = []
        for curves in results.values():
            c, d = curves[arm], curves["dense"]
            start = c["by_step"][0][1]
            late = max(v for s, v in c["by_step"] if s >= 0.1 * steps)
            dense_flops = d["by_flops"][-1][0]
            per_seed.append({"final": c["by_step"][-1][1], "start": start, "worst_after_10pct": late,
                             "rises": late > start, "flops": c["by_flops"][-1][0],
                             "at_dense_flops": at(c["by_flops"], dense_flops),
                             "flops_to_dense_final": first_below(c["by_flops"], d["by_step"][-1][1]),
                             "seconds": c["by_s"][-1][0], "params": c["params"]})
        table[arm] = per_seed
    dense_final = [r["final"] for r in table["dense"]]
    print(f"{'arm':8} {'params':>8} {'step-0 val':>10} {'final val':>16} {'- dense':>16} "
          f"{'@ dense FLOPs':>14} {'FLOPs to dense final':>20} {'rises':>6}")
    for arm, per_seed in table.items():
        finals = [r["final"] for r in per_seed]
        deltas = [f - d for f, d in zip(finals, dense_final)]
        eq = [r["at_dense_flops"] for r in per_seed if r["at_dense_flops"] is not None]
        reach = [r["flops_to_dense_final"] / dense["flops"] for r, dense in zip(per_seed, table["dense"])
                 if r["flops_to_dense_final"] is not None]
        print(f"{arm:8} {per_seed[0]['params'] / 1e6:7.2f}M {per_seed[0]['start']:10.4f} "
              f"{spread(finals):>16} {spread(deltas):>16} {spread(eq):>14} {spread(reach, 'x'):>20} "
              f"{sum(r['rises'] for r in per_seed)}/{len(per_seed)}")
    return table


def spread(values: list[float], unit: str = "") -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}{unit}"
    return f"{statistics.fmean(values):.4f}{unit} ±{(max(values) - min(values)) / 2:.4f}"


def plot(results: dict, arms: list[str], path: Path, corpus: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, arm in enumerate(arms):
        for j, curves in enumerate(results.values()):
            x, y = zip(*curves[arm]["by_flops"])
            ax.plot([v / 1e15 for v in x], y, color=f"C{i}", ls="-" if j == 0 else ":",
                    label=arm if j == 0 else None)
    ax.set_xlabel("extra training FLOPs after the dense pretraining (PFLOP)")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"dense continued vs upcycled ({corpus}; dotted: second seed)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
