"""Fine-tuning a dense model and an MoE on rotten-tomatoes, with each regulariser.

    python bench/bench_finetune.py --dense RUN_DENSE --moe RUN_MOE --out /tmp/ftb \\
        --json bench/results/finetune.json

RUN_DENSE and RUN_MOE: two pretrained runs at equal active parameters and steps (e.g. the
``dense`` and ``E8`` arms of bench/sweep_experts.py). Every arm is ``moekit finetune SRC --task
rotten-tomatoes`` with the fine-tuning recipe (dropout 0.1 outside the experts, 0.4 inside,
lr 1e-3, aux loss on) and ``--set`` overrides, one after the other:

    full            the recipe                           (dense and MoE)
    no-dropout      model.dropout=0, expert_dropout=0    (dense and MoE)
    lora-r8         LoRA rank 8 on the FFN/experts and attention, and the (tied) embeddings in
                    full (finetune.lora_also), lr 3e-3 (dense and MoE)
    freeze-router, freeze-moe, freeze-non_expert, esft   finetune.freeze=...  (MoE)
    aux-off         train.aux_loss_coef=0                (MoE)
    capacity-1.0    model.moe.capacity_factor=1.0: token dropping (MoE)

and, with ``--small N``, the full and no-dropout arms again on a task of N examples
(the first N of rotten-tomatoes, its own 80/10/10 split) trained for ``--small-steps``, to see
overfitting. Reported per arm: test accuracy, the best validation accuracy, the train-
validation loss gap at the end and its largest value, and the median tokens/s.
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

from moekit.report.figures import read_metrics, series  # noqa: E402

BOTH = {"full": [], "no-dropout": ["model.dropout=0", "model.moe.expert_dropout=0"]}
MOE_ONLY = {"freeze-router": ["finetune.freeze=router"], "freeze-moe": ["finetune.freeze=moe"],
            "freeze-non_expert": ["finetune.freeze=non_expert"], "esft": ["finetune.freeze=esft"],
            "aux-off": ["train.aux_loss_coef=0"], "capacity-1.0": ["model.moe.capacity_factor=1.0"]}


def lora(dense: bool) -> list[str]:
    targets = "dense_ffn,attention" if dense else "experts,attention"
    return ["finetune.lora_rank=8", f"finetune.lora_targets={targets}", "finetune.lora_also=embeddings",
            "train.lr=3e-3"]


def read(run: Path, wall_s: float) -> dict:
    rows = read_metrics(run)
    steps, val = series(rows, "loss/val")
    train = dict(zip(*series(rows, "loss/lm")))
    gaps = [v - train[s] for s, v in zip(steps, val) if s in train]
    acc = series(rows, "acc/val")[1]
    test = series(rows, "acc/test")[1]
    return {"test_acc": test[-1] if test else None, "best_val_acc": max(acc) if acc else None,
            "final_val_loss": val[-1], "gap_final": gaps[-1] if gaps else None,
            "gap_max": max(gaps) if gaps else None,
            "tokens_per_s": statistics.median(series(rows, "perf/tokens_per_s")[1]), "wall_s": wall_s,
            "curve": {"step": steps, "val": val, "acc_val": acc}}


def small_task(n: int, path: Path) -> Path:
    from moekit.data.tasks import load_task
    task = load_task("rotten-tomatoes")
    rows = [e for split in ("train", "val", "test") for e in task.splits[split]][:n]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for e in rows:
            text = e.prompt.removeprefix("Review: ").removesuffix("\nSentiment:")
            f.write(json.dumps({"text": text, "label": task.labels[e.label].strip()}) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", type=Path, required=True)
    ap.add_argument("--moe", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--small", type=int, default=0, help="also a small task of N examples")
    ap.add_argument("--small-steps", type=int, default=600)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    plan = []
    for src_name, src in (("dense", args.dense), ("moe", args.moe)):
        arms = {**BOTH, "lora-r8": lora(src_name == "dense"), **({} if src_name == "dense" else MOE_ONLY)}
        plan += [(src_name, src, name, sets, "rotten-tomatoes", args.steps) for name, sets in arms.items()]
    if args.small:
        task = str(small_task(args.small, args.out / f"small{args.small}.jsonl"))
        for src_name, src in (("dense", args.dense), ("moe", args.moe)):
            for name in ("full", "no-dropout"):
                sets = {**BOTH, **MOE_ONLY}[name]
                plan.append((src_name, src, f"small-{name}", sets, task, args.small_steps))
    results = {}
    for src_name, src, name, sets, task, steps in plan:
        run = args.out / f"{src_name}-{name}"
        wall = train_arm(run, ["--task", task, "--no-progress"], [f"train.max_steps={steps}", *sets],
                         command=["finetune", str(src)])
        results[f"{src_name}/{name}"] = read(run, wall)
    head = ["arm", "test acc", "best val acc", "final val loss", "gap end", "gap max", "tokens/s"]
    lines = [" | ".join(head)]
    for key, r in results.items():
        cells = [f"{r['test_acc']:.4f}", f"{r['best_val_acc']:.4f}", f"{r['final_val_loss']:.4f}",
                 f"{r['gap_final']:+.4f}", f"{r['gap_max']:+.4f}", f"{r['tokens_per_s']:,.0f}"]
        lines.append(" | ".join([key, *cells]))
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"dense": str(args.dense), "moe": str(args.moe), "steps": args.steps,
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
