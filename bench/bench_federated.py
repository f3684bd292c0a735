"""Federated MoE on parlspeech's four languages (one client each): centralised training, each
client alone, and the three federation strategies, at equal total tokens.

    python bench/bench_federated.py --out /tmp/fedbench --rounds 5 --local-steps 40 \\
        --json bench/results/federated.json

Arms (the recipe configs/tiny-moe.toml with --set overrides; batch x seq_len tokens a step):

    centralised    one run on the union of the four clients' training text, 4 x R x S steps
    alone          each client trains on its own shard only, R x S steps (no communication)
    fedavg, local-experts, routing
                   ``moekit federate --strategy ...``: four clients, R rounds of S local steps

Every arm uses the first federation's tokenizer (trained on the clients' training text), so
losses are in the same units, and is evaluated on the same validation windows of each client
(the clients' own held-out speeches: the centralised run's corpus leaves them out). A
federated arm's model for client i is what client i holds after the last round (under
local-experts: the averaged shared tensors with its own experts). Reported: each client's
validation loss on its own language, the mean over clients, the mean on the other clients'
languages, the bytes communicated and the wall-clock.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STRATEGIES = ("fedavg", "local-experts", "routing")


def federate(out: Path, strategy: str, args, tokenizer: Path | None) -> float:
    wall = out / "wall_s.json"
    if not wall.exists():
        cmd = ["federate", "--config", str(ROOT / "configs/tiny-moe.toml"), "--clients", "4", "--rounds",
               str(args.rounds), "--strategy", strategy, "--out", str(out), "--threads", "1",
               *[x for s in sets(args, args.local_steps, args.rounds * args.local_steps)
                 for x in ("--set", s)],
               *(["--tokenizer", str(tokenizer)] if tokenizer else [])]
        print("$ moekit " + " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "moekit", *cmd], check=True)
        wall.write_text(json.dumps(time.perf_counter() - t0))
    return json.loads(wall.read_text())


def sets(args, max_steps: int, total: int) -> list[str]:
    """The recipe overrides: the user's, the arm's steps, warmup a fifth of the arm's total."""
    return [*args.set, f"train.max_steps={max_steps}", f"train.warmup_steps={max(1, total // 5)}"]


def central_corpus(fed: Path, path: Path) -> Path:
    """The union of the clients' training documents (their validation documents left out)."""
    from moekit.data.catalog import load_documents
    from moekit.data.stream import is_val_doc
    from moekit.federate.spec import FederationSpec
    spec = FederationSpec.load(fed)
    data = spec.run_config().data
    if path.exists():
        return path
    with open(path, "w", encoding="utf-8") as out:
        for shard in spec.shards:
            for j, d in enumerate(load_documents(shard)[:data.max_docs]):
                if not is_val_doc(j, data.val_fraction):
                    out.write(json.dumps({"text": d.text, "tag": d.tag}, ensure_ascii=False) + "\n")
    return path


def train_with(run: Path, fed: Path, corpus: str, steps: int, args) -> float:
    """A plain ``train()`` run on ``corpus`` with the federation's tokenizer (fresh weights)."""
    from moekit.config import RunConfig, apply_overrides
    from moekit.data.tokenizer import load_tokenizer
    from moekit.recipe import load_toml
    from moekit.store.source import Initial
    from moekit.train.trainer import train
    wall = run / "wall_s.json"
    if not wall.exists():
        raw = apply_overrides(load_toml(ROOT / "configs/tiny-moe.toml"),
                              [*sets(args, steps, steps), f'data.corpus="{corpus}"',
                               f"train.log_every={steps}"])
        print(f"train {run.name}: {corpus}, {steps} steps", flush=True)
        t0 = time.perf_counter()
        train(RunConfig.from_dict(raw), run, progress=False,
              initial=Initial(None, load_tokenizer(fed / "tokenizer.json")))
        wall.write_text(json.dumps(time.perf_counter() - t0))
    return json.loads(wall.read_text())


def losses_of(model, fed: Path, clients: int) -> list[float]:
    from moekit.federate.client import evaluate_on
    return [evaluate_on(model, fed, j) for j in range(clients)]


def federated_row(out: Path, clients: int) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    own = [last[f"client{i}/val_loss"] for i in range(clients)]
    others = [sum(last[f"client{i}/val_loss_on_client{j}"] for j in range(clients) if j != i) / (clients - 1)
              for i in range(clients)]
    sim = {k: v for k, v in last.items() if k.startswith(("routing/", "experts/"))}
    return {"own": own, "others_mean": sum(others) / clients,
            "bytes": sum(r["bytes/total"] for r in rows), "similarity_last_round": sim}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-steps", type=int, default=40)
    ap.add_argument("--set", action="append", default=[], help="recipe overrides for every arm")
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated (default: all three)")
    ap.add_argument("--tokenizer", type=Path, help="a tokenizer.json for every arm (default: the first "
                                                   "federation trains one)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    total = args.rounds * args.local_steps
    results, tok = {}, args.tokenizer
    strategies = [s for s in args.strategies.split(",") if s]
    for strategy in strategies:
        wall = federate(args.out / strategy, strategy, args, tok)
        tok = tok or args.out / strategies[0] / "tokenizer.json"
        results[strategy] = {**federated_row(args.out / strategy, 4), "wall_s": wall}
    fed = args.out / strategies[0]
    from moekit.federate.spec import FederationSpec
    from moekit.store.run_dir import load_run
    shards = FederationSpec.load(fed).shards
    corpus = central_corpus(fed, args.out / "central.jsonl")
    wall = train_with(args.out / "centralised", fed, str(corpus), 4 * total, args)
    model = load_run(args.out / "centralised")[0]
    own = losses_of(model, fed, 4)
    results["centralised"] = {"own": own, "others_mean": None, "bytes": 0, "wall_s": wall}
    alone, cross, walls = [], [], 0.0
    for i, shard in enumerate(shards):
        walls += train_with(args.out / f"alone{i}", fed, shard, total, args)
        losses = losses_of(load_run(args.out / f"alone{i}")[0], fed, 4)
        alone.append(losses[i])
        cross.append(sum(x for j, x in enumerate(losses) if j != i) / 3)
    results["alone"] = {"own": alone, "others_mean": sum(cross) / 4, "bytes": 0, "wall_s": walls}
    report(results, shards, strategies, args)


def report(results: dict, shards: list[str], strategies: list[str], args) -> None:
    names = [s.rsplit(":", 1)[-1] for s in shards]
    print(f"\nper-client validation loss (own language), {args.rounds} rounds x {args.local_steps} local "
          "steps, equal total tokens\n")
    print(f"| arm | {' | '.join(names)} | mean | on the others' data | MiB sent | wall s |")
    print("|---" * (len(names) + 5) + "|")
    for arm in ("centralised", "alone", *strategies):
        r = results[arm]
        mean = sum(r["own"]) / len(r["own"])
        others = "-" if r["others_mean"] is None else f"{r['others_mean']:.3f}"
        print(f"| {arm} | {' | '.join(f'{x:.3f}' for x in r['own'])} | {mean:.3f} | {others} | "
              f"{r['bytes'] / 2**20:.0f} | {r['wall_s']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "rounds": args.rounds,
                                         "local_steps": args.local_steps, "shards": shards,
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
