"""A dynamic number of experts per token against top-2 at equal mean active FLOPs, in one command.

    python bench/bench_dynamic_k.py --out /tmp/dk --corpus news-en --steps 300 \
        --json bench/results/dynamic_k_news.json

Every arm is ``moekit train`` (4 layers, d_model 128, 8 experts of width 128, batches of
64 x 128 tokens) with ``--set`` overrides; each dynamic arm's compute-budget controller holds
a mean of 2 experts per token (``model.moe.target_k=2``), the FLOPs of the top-2 arm:

    top2   model.moe.top_k=2 (the baseline)
    top_p  dynamic_k=top_p, p from 0.5, 1..8 experts (Huang et al. 2024)
    null   dynamic_k=null, top_k=4 of 8 experts + 8 null experts (AdaMoE)
    relu   dynamic_k=relu, up to 8 experts, L1 coefficient from 1e-3 (ReMoE)

A finished arm's run directory is reused (an interrupted benchmark continues;
``--report-only`` reports what is there; ``--speed-rounds N`` also times each trained model's training
step, interleaved, in one process: run it on an idle machine). Reported per arm: the final
validation loss, the mean experts per token over training and over the last quarter (active
expert FLOPs relative to top-2), the training tokens/s, and, on the validation split after
training, the mean experts per token by token-frequency class and by language
(moekit.model.routing.routing_breakdown).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import train_arm  # noqa: E402

from moekit.report.experts_per_token import k_layers  # noqa: E402
from moekit.report.figures import read_metrics, series  # noqa: E402

ARMS = {
    "top2": [],
    "top_p": ["model.moe.dynamic_k=top_p", "model.moe.top_p=0.5", "model.moe.target_k=2"],
    "null": ["model.moe.dynamic_k=null", "model.moe.top_k=4", "model.moe.num_null_experts=8",
             "model.moe.target_k=2"],
    "relu": ["model.moe.dynamic_k=relu", "model.moe.relu_l1=0.001", "model.moe.target_k=2"],
}
SHAPE = ["model.d_model=128", "model.n_heads=4", "model.moe.d_ff=128", "model.moe.num_experts=8",
         "train.batch_size=64", "train.eval_batches=4", "train.eval_every=50"]


def mean_k(rows: list[dict], layers: list[int], last: float = 1.0) -> float:
    """The mean over layers and logged intervals of experts per token (the last ``last`` share)."""
    values = []
    for i in layers:
        _, ks = series(rows, f"moe/layer{i}/experts_per_token")
        values += ks[int(len(ks) * (1 - last)):]
    return statistics.fmean(values) if values else float("nan")


def by_class(run: Path) -> dict:
    """Mean experts per token by frequency class and by tag on the validation split."""
    from moekit.model.routing import frequency_class, routing_breakdown
    from moekit.store.run_dir import load_run
    from moekit.train.splits import open_split
    model, tok, cfg = load_run(run)
    val, train = open_split(cfg, run, "val"), open_split(cfg, run, "train")
    by_tag, by_freq = routing_breakdown(model, val, frequency_class(train, tok.get_vocab_size()))
    return {"by_frequency": by_freq.experts_per_token(), "by_tag": by_tag.experts_per_token()}


def speed(out: Path, arms: list[str], rounds: int, batches: int = 4) -> dict[str, float]:
    """Training tokens/s of each arm's trained model (its learned routing, so its own k) on the
    same validation batches: forward, the loss with the router terms, backward; interleaved
    rounds in this one process, the median per arm."""
    from moekit.store.run_dir import load_run
    from moekit.train.evaluate import lm_loss
    from moekit.train.objectives import router_terms
    from moekit.train.splits import open_split
    models = {arm: load_run(out / arm)[0].train() for arm in arms}
    cfg = load_run(out / arms[0])[2]
    val = open_split(cfg, out / arms[0], "val")
    B = cfg.train.batch_size
    data = [val.batch(list(range(b * B, (b + 1) * B)))[:2] for b in range(batches)]
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for r in range(rounds + 1):                       # round 0 warms up
        for arm, model in models.items():
            t0 = time.perf_counter()
            for x, y in data:
                out_ = model(x)
                total, _ = router_terms(lm_loss(out_.logits, y), out_, 0.01, 1e-3)
                total.backward()
                model.zero_grad(set_to_none=True)
            if r:
                times[arm].append(time.perf_counter() - t0)
    tokens = sum(x.numel() for x, _ in data)
    return {arm: tokens / statistics.median(t) for arm, t in times.items()}


def report(out: Path, arms: list[str]) -> dict:
    results = {}
    for arm in arms:
        run = out / arm
        if not (run / "summary.json").exists():
            continue
        rows = read_metrics(run)
        summary = json.loads((run / "summary.json").read_text())
        layers = k_layers(rows)
        _, tps = series(rows, "perf/tokens_per_s")
        results[arm] = {"val_loss": summary["final_val_loss"], "mean_k": mean_k(rows, layers),
                        "mean_k_last_quarter": mean_k(rows, layers, 0.25),
                        "tokens_per_s": statistics.median(tps) if tps else float("nan"),
                        "wall_s": json.loads((run / "wall_s.json").read_text()), **by_class(run)}
    print(f"{'arm':>6} {'val loss':>9} {'mean k':>7} {'k last 1/4':>10} {'tokens/s':>9}")
    for arm, r in results.items():
        print(f"{arm:>6} {r['val_loss']:9.4f} {r['mean_k']:7.3f} {r['mean_k_last_quarter']:10.3f} "
              f"{r['tokens_per_s']:9.0f}")
    for arm, r in results.items():
        print(f"{arm}: experts per token by frequency class {r['by_frequency']}, by tag {r['by_tag']}")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--corpus", default="news-en")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--extra", action="append", default=[], help="another --set for every arm")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--speed-rounds", type=int, default=0,
                    help="also time each trained model's training step, interleaved, this many rounds")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; use some of {list(ARMS)}")
    base = [f'data.corpus="{args.corpus}"', f"train.max_steps={args.steps}", f"train.seed={args.seed}",
            *SHAPE, *args.extra]
    if not args.report_only:
        for arm in arms:
            train_arm(args.out / arm, ["--no-progress"], base + ARMS[arm])
    results = report(args.out, arms)
    if args.speed_rounds:
        done = [a for a in arms if a in results]
        tps = speed(args.out, done, args.speed_rounds)
        print(f"{'arm':>6} {'step tokens/s':>14} {'vs top2':>8}")
        for arm in done:
            results[arm]["step_tokens_per_s"] = tps[arm]
            base = tps.get("top2")
            print(f"{arm:>6} {tps[arm]:14.0f} {tps[arm] / base if base else float('nan'):8.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"corpus": args.corpus, "steps": args.steps, "seed": args.seed,
                                         "sets": base, "arms": results}, indent=1))


if __name__ == "__main__":
    main()
