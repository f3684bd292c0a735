"""Scale-Out on real weights: SmolLM2-135M continued as a dense model and as three upcycled MoEs.

    python bench/bench_upcycling.py --out runs/upcycling          # ~40 min on 2 cores
    python bench/bench_upcycling.py --out /tmp/u --steps 3 --layers 4 --max-docs 200   # a smoke run

Arms, each continued for the same number of steps of the same batches (equal extra tokens)
with ``moekit train --from ARM`` on news-en tokenized with SmolLM2's own tokenizer:

- dense:          SmolLM2 (its first ``--layers`` blocks) as it is
- copy:           ``upcycle --method copy``, 8 experts, top-2 (the dense function at step 0)
- drop:           ``upcycle --method drop --drop-ratio 0.5``, 8 experts, top-2
- virtual-group:  ``upcycle --method virtual-group``, 16 experts of width d_ff / 4, top-4:
                  the dense model's active parameters (the dense function at step 0)

Reports per arm: validation loss at step 0 (the function-preserving arms must equal the
dense) and along training, final validation loss, tokens/s, wall-clock, peak memory (the
training process's max RSS), and the loss each arm reaches by the dense run's wall-clock.
Writes ``bench/results/upcycling.json`` and ``docs/upcycling.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from moekit.data.stream import PackedSplit  # noqa: E402
from moekit.model.transformer import MoETransformer, model_flops  # noqa: E402
from moekit.report.figures import read_metrics, series  # noqa: E402
from moekit.store.run_dir import load_run, save_export  # noqa: E402
from moekit.train.evaluate import evaluate  # noqa: E402
from moekit.transform.upcycle import upcycle  # noqa: E402

ARMS = {"dense": None,
        "copy": dict(num_experts=8, top_k=2, method="copy"),
        "drop": dict(num_experts=8, top_k=2, method="drop", drop_ratio=0.5),
        "virtual-group": dict(num_experts=16, top_k=4, method="virtual-group", granularity=4)}


def first_layers(model: MoETransformer, n: int) -> MoETransformer:
    """The model's first ``n`` blocks with its embeddings, final norm and head (real weights)."""
    if n >= model.cfg.n_layers:
        return model
    cut = MoETransformer.build(dataclasses.replace(model.cfg, n_layers=n))
    cut.load_state_dict({k: v for k, v in model.state_dict().items()
                         if not k.startswith("blocks.") or int(k.split(".")[1]) < n})
    return cut.eval()


def make_arms(out: Path, layers: int) -> dict[str, Path]:
    model, tok, cfg = load_run("smollm2-135m")
    dense = first_layers(model, layers)
    dirs = {}
    for name, spec in ARMS.items():
        d = out / "arms" / name
        if not (d / "model.safetensors").exists():
            arm = dense if spec is None else upcycle(dense, seed=0, **spec)
            save_export(arm, tok, dataclasses.replace(cfg, model=arm.cfg), d)
        dirs[name] = d
    return dirs


def train_arm(src: Path, run: Path, args) -> dict:
    """``moekit train --from`` in its own process; its wall-clock and max RSS (os.wait4)."""
    sets = {"data.corpus": '"news-en"', "data.max_docs": args.max_docs, "data.seq_len": args.seq_len,
            "train.batch_size": args.batch, "train.max_steps": args.steps, "train.lr": args.lr,
            "train.warmup_steps": max(1, args.steps // 10), "train.eval_every": args.eval_every,
            "train.eval_batches": args.eval_batches, "train.log_every": 1, "train.save_every": args.steps,
            "train.seed": 0}
    cmd = [sys.executable, "-m", "moekit", "train", "--from", str(src), "--out", str(run), "--no-progress",
           *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    t0 = time.perf_counter()
    run.parent.mkdir(parents=True, exist_ok=True)
    log = open(run.parent / f"{run.name}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed; see {log.name}")
    return {"wall_s": wall, "peak_rss_gb": usage.ru_maxrss / 2**20}


def step0_val(src: Path, run: Path, args) -> float:
    model, _, _ = load_run(src)
    val = PackedSplit.open(run / "data", "val", args.seq_len)
    with torch.no_grad():
        return evaluate(model, val, args.batch, torch.device("cpu"), args.eval_batches)


def report(name: str, run: Path, timing: dict, loss0: float, args, cfg) -> dict:
    rows = read_metrics(run)
    val = [(0, loss0)] + list(zip(*series(rows, "loss/val")))
    steps, tps = series(rows, "perf/tokens_per_s")       # logged every step: that step's throughput
    tokens = args.batch * args.seq_len
    clock, t = {0: 0.0}, 0.0
    for step, rate in zip(steps, tps):
        t += tokens / rate                                # training time (no evaluation, no saving)
        clock[step] = t
    flops = model_flops(cfg, args.seq_len)
    return {"arm": name, "spec": ARMS[name], "val_curve": val, "val_step0": loss0, "val_final": val[-1][1],
            "val_train_s": [clock.get(s) for s, _ in val], "tokens_per_s": tokens * len(tps) / t,
            "train_s": t, "process_wall_s": timing["wall_s"], "peak_rss_gb": timing["peak_rss_gb"],
            "params_total": flops["params_total"], "params_active": flops["params_active"]}


def loss_at(r: dict, seconds: float) -> float | None:
    """Validation loss at ``seconds`` of training time (linear between evaluations)."""
    pts = list(zip(r["val_train_s"], (v for _, v in r["val_curve"])))
    for (t0, l0), (t1, l1) in zip(pts, pts[1:]):
        if t0 <= seconds <= t1:
            return l0 + (l1 - l0) * (seconds - t0) / (t1 - t0)
    return None


def plot(results: list[dict], path: Path, tokens_per_step: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    dense = next((r for r in results if r["arm"] == "dense"), results[0])
    top = dense["val_step0"] + 0.6                         # arms far above the dense are named, not drawn
    for r in results:
        steps, losses = zip(*r["val_curve"])
        off = f" ({losses[0]:.2f} -> {losses[-1]:.2f}, off scale)" if max(losses) > top else ""
        label = r["arm"] + off
        a.plot([s * tokens_per_step / 1e3 for s in steps], losses, marker="o", ms=3, label=label)
        b.plot([x / 60 for x in r["val_train_s"]], losses, marker="o", ms=3, label=label)
    lows = [v for r in results for _, v in r["val_curve"]]
    for ax in (a, b):
        ax.set_ylim(min(lows) - 0.05, top)
    a.set_xlabel("extra training tokens (thousands)")
    b.set_xlabel("training wall-clock (min; evaluation excluded)")
    for ax in (a, b):
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("SmolLM2-135M continued: dense vs upcycled (news-en)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=30, help="SmolLM2's first N blocks (30 = all)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--max-docs", type=int, default=1500)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--json", type=Path, default=ROOT / "bench/results/upcycling.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs/upcycling.png")
    ap.add_argument("--results-from", type=Path, help="report and plot these results again (no training)")
    ap.add_argument("--clock-from", type=Path,
                    help="the tokens/s of another run of this script (e.g. a short one on a quiet machine) "
                         "for the wall-clock comparison")
    args = ap.parse_args()
    if args.results_from:
        saved = json.loads(args.results_from.read_text())
        results, meta = saved["results"], saved["meta"]
    else:
        results, meta = run_arms(args), None
    if args.clock_from:
        reclock(results, json.loads(args.clock_from.read_text())["results"], args.batch * args.seq_len)
    summarize(results, args, meta)


def reclock(results: list[dict], quiet: list[dict], tokens_per_step: int) -> None:
    """Training time from another run's tokens/s (each step of an arm costs the same)."""
    rate = {r["arm"]: r["tokens_per_s"] for r in quiet}
    for r in results:
        if r["arm"] in rate:
            r["tokens_per_s_measured_here"] = r.get("tokens_per_s_measured_here", r["tokens_per_s"])
            r["tokens_per_s"] = rate[r["arm"]]
            r["val_train_s"] = [s * tokens_per_step / rate[r["arm"]] for s, _ in r["val_curve"]]
            r["train_s"] = r["val_train_s"][-1]


def run_arms(args) -> list[dict]:
    args.out.mkdir(parents=True, exist_ok=True)
    dirs = make_arms(args.out, args.layers)
    results = []
    for name in args.arms.split(","):
        run = args.out / "runs" / name
        timing = train_arm(dirs[name], run, args)
        arm_cfg = load_run(dirs[name])[0].cfg
        results.append(report(name, run, timing, step0_val(dirs[name], run, args), args, arm_cfg))
        r = results[-1]
        print(f"{name:14s} val@0 {r['val_step0']:.4f}  final {r['val_final']:.4f}  "
              f"{r['tokens_per_s']:7.0f} tok/s  {r['train_s'] / 60:5.1f} min  "
              f"{r['peak_rss_gb']:.1f} GB", flush=True)
    return results


def summarize(results: list[dict], args, meta: dict | None) -> None:
    tokens_per_step = args.batch * args.seq_len
    dense_s = next((r["train_s"] for r in results if r["arm"] == "dense"), None)
    print(f"\n{'arm':14s} {'val@0':>8s} {'final':>8s} {'@dense s':>8s} {'tok/s':>7s} {'min':>6s} {'GB':>5s} "
          f"{'total M':>8s} {'active M':>8s}")
    for r in results:
        r["val_at_dense_wall"] = loss_at(r, dense_s) if dense_s else None
        at = f"{r['val_at_dense_wall']:8.4f}" if r["val_at_dense_wall"] is not None else f"{'-':>8s}"
        print(f"{r['arm']:14s} {r['val_step0']:8.4f} {r['val_final']:8.4f} {at} {r['tokens_per_s']:7.0f} "
              f"{r['train_s'] / 60:6.1f} {r['peak_rss_gb']:5.1f} {r['params_total'] / 1e6:8.1f} "
              f"{r['params_active'] / 1e6:8.1f}")
    meta = meta or {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "layers": args.layers,
                    "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
                    "tokens_per_step": tokens_per_step, "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu": os.uname().machine}
    if args.clock_from:
        meta["clock_from"] = str(args.clock_from)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    plot(results, args.plot, tokens_per_step)
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
