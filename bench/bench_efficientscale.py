"""EfficientScale as documented commands: small dense -> Scale-Up -> train -> Scale-Out -> train,
against the same final MoE trained from scratch, on training FLOPs.

    python bench/bench_efficientscale.py --out /tmp/es        # ~15 min on 2 cores

The pipeline (every stage a moekit command; each stage's FLOPs from the model's own formula,
``model_flops(cfg)["flops_per_token"]`` x the tokens it trained on):

    moekit train --out S1 --set model.moe=false --set model.d_model=128 --set model.n_layers=2 \\
        --set model.n_heads=2 --set model.d_ff=256 ...               # a small dense model
    moekit grow S1 --d-model 256 --n-layers 4 --n-heads 4 --out G    # Scale-Up (function-preserving)
    moekit train --from G --out S2 ...                               # train the grown dense model
    moekit upcycle S2 --experts 8 --top-k 2 --out U                  # Scale-Out: the default recipe's MoE
    moekit train --from U --out S3 ...                               # train the MoE

and the default recipe (the same MoE: 4 layers, d_model 256, 8 experts of 256, top-2) from
scratch for its 750 steps. Reports validation loss against cumulative FLOPs for both (one
plot, docs/scale_up.png; JSON in bench/results/efficientscale.json), and the FLOPs at which
the pipeline first reaches the scratch model's final validation loss, as a share of the
scratch run's FLOPs (the goal: at most 0.6x).

``--pipeline configs/efficientscale.toml``: the stages as one ``moekit pipeline`` run (the
same shapes; the AdamW state and one LR schedule carried across stages, see
moekit/train/pipeline.py), compared with the same scratch run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moekit.model.transformer import model_flops  # noqa: E402
from moekit.report.compare import first_below  # noqa: E402
from moekit.report.figures import read_metrics, series  # noqa: E402
from moekit.store.run_dir import load_run  # noqa: E402

COMMON = ["--no-progress", "--set", "train.eval_every=25"]
SMALL = ["--set", "model.moe=false", "--set", "model.d_model=128", "--set", "model.n_layers=2",
         "--set", "model.n_heads=2", "--set", "model.d_ff=256"]


def moekit(*argv: str) -> None:
    print("$ moekit " + " ".join(argv), flush=True)
    subprocess.run([sys.executable, "-m", "moekit", *argv], check=True, stdout=subprocess.DEVNULL)


def curve(run: Path, flops_offset: float) -> tuple[list[tuple[float, float]], float]:
    """[(cumulative FLOPs, val loss)] of a run, and the FLOPs it trained for."""
    cfg = json.loads((run / "config.json").read_text())
    model, _, _ = load_run(run)
    tokens = cfg["train"]["batch_size"] * cfg["data"]["seq_len"]
    per_step = model_flops(model.cfg, cfg["data"]["seq_len"])["flops_per_token"] * tokens
    steps, losses = series(read_metrics(run), "loss/val")
    points = [(flops_offset + s * per_step, v) for s, v in zip(steps, losses)]
    return points, cfg["train"]["max_steps"] * per_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", default="500,150,400",
                    help="steps of the small dense, grown dense and MoE stages")
    ap.add_argument("--later-lr", type=float, default=3e-3, help="peak LR of stages 2 and 3")
    ap.add_argument("--later-warmup", type=int, default=40, help="warmup steps of stages 2 and 3")
    ap.add_argument("--pipeline", type=Path, default=None,
                    help="a moekit pipeline recipe to run instead of the separate commands")
    ap.add_argument("--scratch-set", action="append", default=[], metavar="KEY=VALUE",
                    help="for the scratch run (e.g. the pipeline's corpus)")
    ap.add_argument("--json", type=Path, default=ROOT / "bench/results/efficientscale.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs/scale_up.png")
    args = ap.parse_args()
    s1, s2, s3 = (int(x) for x in args.steps.split(","))
    o = args.out
    if not (o / "scratch" / "summary.json").exists():
        moekit("train", "--out", str(o / "scratch"), *COMMON,
               *[x for v in args.scratch_set for x in ("--set", v)])
    if args.pipeline is not None:
        moekit("pipeline", "--config", str(args.pipeline), "--out", str(o / "pipeline"), "--no-progress")
        info = json.loads((o / "pipeline" / "pipeline.json").read_text())
        runs = [Path(st["run_dir"]) for st in info["stages"]]
        return report(args, o, runs, runs[0])
    later = ["--set", f"train.lr={args.later_lr}", "--set", f"train.warmup_steps={args.later_warmup}"]
    if not (o / "s1" / "summary.json").exists():
        moekit("train", "--out", str(o / "s1"), *COMMON, *SMALL, "--set", f"train.max_steps={s1}")
    if not (o / "s2" / "summary.json").exists():
        moekit("grow", str(o / "s1"), "--d-model", "256", "--n-layers", "4", "--n-heads", "4",
               "--out", str(o / "g"))
        moekit("train", "--from", str(o / "g"), "--out", str(o / "s2"), *COMMON,
               "--set", f"train.max_steps={s2}", "--set", "train.seed=1", *later)
    if not (o / "s3" / "summary.json").exists():
        moekit("upcycle", str(o / "s2"), "--experts", "8", "--top-k", "2", "--out", str(o / "u"))
        moekit("train", "--from", str(o / "u"), "--out", str(o / "s3"), *COMMON,
               "--set", f"train.max_steps={s3}", "--set", "train.seed=2", *later)
    report(args, o, [o / "s1", o / "s2", o / "s3"], o / "s1")


def report(args, o: Path, runs: list[Path], first: Path) -> None:
    scratch, scratch_flops = curve(o / "scratch", 0.0)
    stages, offset = [], 0.0
    for run in runs:
        points, flops = curve(run, offset)
        stages.append({"stage": run.name, "curve": points, "flops": flops})
        offset += flops
    pipeline = [p for s in stages for p in s["curve"]]
    target = scratch[-1][1]
    reach = first_below(pipeline, target)
    same_tok = (o / "scratch" / "tokenizer.json").read_text() == (first / "tokenizer.json").read_text()
    s1, s2, s3 = (json.loads((r / "config.json").read_text())["train"]["max_steps"] for r in runs)
    result = {"later_lr": args.later_lr, "later_warmup": args.later_warmup,
              "scratch_final_val": target, "scratch_flops": scratch_flops, "pipeline_flops": offset,
              "pipeline_final_val": pipeline[-1][1], "flops_to_scratch_final": reach,
              "ratio": reach / scratch_flops if reach else None, "same_tokenizer": same_tok,
              "stages": stages, "scratch": scratch, "steps": [s1, s2, s3],
              "pipeline": str(args.pipeline) if args.pipeline else None}
    print(f"scratch MoE: final val {target:.4f} after {scratch_flops:.3e} FLOPs")
    for s in stages:
        (_, first), (_, last) = s["curve"][0], s["curve"][-1]
        print(f"  {s['stage']}: {s['flops']:.3e} FLOPs, val {first:.4f} -> {last:.4f}")
    print(f"pipeline: final val {pipeline[-1][1]:.4f} after {offset:.3e} FLOPs "
          f"({offset / scratch_flops:.2f}x)")
    print("reaches the scratch final loss at " + (f"{reach:.3e} FLOPs = {reach / scratch_flops:.2f}x" if reach
                                                  else "no point of the run (not reached)"))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    plot(result, args.plot)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    x, y = zip(*result["scratch"])
    ax.plot([v / 1e15 for v in x], y, label="MoE from scratch (default recipe)", color="k")
    labels = ["small dense (d128, 2 layers)", "grown dense (d256, 4 layers)", "upcycled MoE"]
    for s, label in zip(result["stages"], labels):
        x, y = zip(*s["curve"])
        ax.plot([v / 1e15 for v in x], y, marker="o", ms=2, label=f"pipeline: {label}")
    ax.axhline(result["scratch_final_val"], color="gray", lw=0.6, ls="--")
    ax.set_xlabel("cumulative training FLOPs (PFLOP)")
    ax.set_ylabel("validation loss")
    ax.set_ylim(top=min(7.5, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("EfficientScale pipeline vs from scratch (parlspeech)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
