"""Token-level against task-level routing on parlspeech's four languages, at equal steps.

    python bench/bench_task_routing.py --out /tmp/tr --json bench/results/task_routing.json

Every arm is ``moekit train`` on a data mixture of parlspeech's German, English, Spanish and
Dutch speeches (weight 1 each, tagged de/en/es/nl) with ``model.moe.router_input``:

    token       the router sees the token (today's MoE)
    token+tag   the token plus a learned embedding of its language (Kudugunta et al. 2021)
    tag         the language alone: every token of a language goes to the same top-k experts

Reported per arm: each language's final validation loss, the mutual information between
expert and language per layer on the validation windows (``moekit report``'s figure), and
``moekit extract --task LANG`` for each language: the extracted model's parameters, its
forward tokens/s against the full model's on that language's windows, and whether its
logits equal the full model's (exact for ``tag``; approximate otherwise, with the largest
logit difference).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import train_arm  # noqa: E402

from moekit.report.figures import read_metrics, series  # noqa: E402

LANGS = ("de", "en", "es", "nl")
ARMS = ("token", "token+tag", "tag")


def mixture() -> str:
    return "data.mixture=[" + ", ".join(f'{{source="parlspeech:{t}", tag="{t}"}}' for t in LANGS) + "]"


def mutual_information(run: Path) -> dict[int, float]:
    from moekit.model.routing import frequency_class, routing_breakdown
    from moekit.store.run_dir import load_run
    from moekit.train.splits import open_split
    model, tok, cfg = load_run(run)
    val, train = open_split(cfg, run, "val"), open_split(cfg, run, "train")
    by_tag, _ = routing_breakdown(model, val, frequency_class(train, tok.get_vocab_size()), max_windows=512)
    return {i: by_tag.mutual_information(i) for i in sorted(by_tag.counts)}


def extract(run: Path, lang: str, out: Path, batches: int) -> dict:
    if not (out / "config.json").exists():
        cmd = [sys.executable, "-m", "moekit", "extract", str(run), "--task", lang, "--out", str(out),
               "--batches", str(batches)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        (out / "extract.json").write_text(proc.stdout.strip().splitlines()[-1])
    return json.loads((out / "extract.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--extra", action="append", default=[], help="a --set for every arm")
    ap.add_argument("--batches", type=int, default=4, help="validation batches per language for extract")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = {}
    for arm in ARMS:
        run = args.out / arm.replace("+", "-")
        sets = [mixture(), f"train.max_steps={args.steps}", "train.eval_every=50",
                f'model.moe.router_input="{arm}"', *args.extra]
        wall = train_arm(run, ["--no-progress"], sets)
        rows = read_metrics(run)
        r = {"wall_s": wall, "val": {t: series(rows, f"loss/val/{t}")[1][-1] for t in LANGS},
             "val_mean": series(rows, "loss/val")[1][-1], "mutual_information": mutual_information(run),
             "extract": {t: extract(run, t, args.out / f"{run.name}-{t}", args.batches) for t in LANGS}}
        results[arm] = r
    lines = ["arm | " + " | ".join(f"val {t}" for t in LANGS) + " | mean | I(expert; language) per layer | "
             "extracted params | extracted / full tokens/s | exact (max logit diff)"]
    for arm, r in results.items():
        ex = r["extract"]
        speed = [e["tokens_per_s"]["extracted"] / e["tokens_per_s"]["full"] for e in ex.values()]
        diff = max(e["max_abs_logit_diff"] for e in ex.values())
        lines.append(" | ".join([arm, *(f"{r['val'][t]:.4f}" for t in LANGS), f"{r['val_mean']:.4f}",
                                 ", ".join(f"{v:.3f}" for v in r["mutual_information"].values()),
                                 f"{ex['de']['params']['extracted']:,} of {ex['de']['params']['full']:,}",
                                 f"{min(speed):.2f}-{max(speed):.2f}",
                                 f"{all(e['exact'] for e in ex.values())} ({diff:.1e})"]))
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"steps": args.steps, "extra": args.extra, "results": results},
                                        indent=1))


if __name__ == "__main__":
    main()
