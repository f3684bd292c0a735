"""Training-step throughput: the MoE recipe against its dense baseline, in one process.

    python bench/bench_train_step.py                                   # configs/tiny-{moe,dense}.toml
    python bench/bench_train_step.py --moe configs/tiny-moe.toml --dense configs/tiny-dense.toml

Both models get the same random token batches (the recipe's batch size and sequence
length; the vocabulary is the recipe's), and one full optimizer step each (forward,
loss with the aux terms, backward, clip, AdamW) is timed, interleaved, median of --reps.
The ratio is MoE tokens/s over dense tokens/s (the models have equal active parameters).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moekit.config import RunConfig  # noqa: E402
from moekit.model.transformer import MoETransformer, model_flops  # noqa: E402
from moekit.runtime import tune_cpu_allocator  # noqa: E402
from moekit.train.evaluate import lm_loss  # noqa: E402
from moekit.train.optim import build_optimizer  # noqa: E402
from moekit.train.run import autocast, resolve_device  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_step(cfg: RunConfig, device: torch.device):
    model = MoETransformer.build(cfg.model, device=device)
    opt = build_optimizer(model, cfg.train)

    def step(x, y):
        with autocast(cfg, device):
            out = model(x)
        t = cfg.train
        loss = lm_loss(out.logits, y) + t.aux_loss_coef * out.aux_loss + t.z_loss_coef * out.z_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moe", default=str(ROOT / "configs" / "tiny-moe.toml"))
    ap.add_argument("--dense", default=str(ROOT / "configs" / "tiny-dense.toml"))
    ap.add_argument("--set", action="append", default=[],
                    help="override both recipes, e.g. train.batch_size=8")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default="bench/results/train_step.json")
    args = ap.parse_args()
    tune_cpu_allocator()
    cfgs = {"dense": RunConfig.from_toml(args.dense, args.set),
            "moe": RunConfig.from_toml(args.moe, args.set)}
    device = resolve_device(cfgs["moe"].train.device)
    torch.manual_seed(0)
    B, S, V = cfgs["moe"].train.batch_size, cfgs["moe"].data.seq_len, cfgs["moe"].model.vocab_size
    steps = {name: make_step(cfg, device) for name, cfg in cfgs.items()}
    batches = [torch.randint(0, V, (B, S + 1), device=device) for _ in range(4)]
    times = {name: [] for name in steps}
    for i in range(args.reps + 3):
        tokens = batches[i % len(batches)]
        for name, step in steps.items():
            t0 = time.perf_counter()
            step(tokens[:, :-1], tokens[:, 1:])
            if i >= 3:
                times[name].append(time.perf_counter() - t0)
    rows = {}
    print(f"{'model':<6} {'ms/step':>8} {'tok/s':>8} {'active params':>14} {'total params':>13}")
    for name, ts in times.items():
        med = statistics.median(ts)
        f = model_flops(cfgs[name].model, S)
        rows[name] = {"median_s": med, "tokens_per_s": B * S / med, "params_active": f["params_active"],
                      "params_total": f["params_total"], "runs_s": ts}
        print(f"{name:<6} {med * 1e3:8.1f} {B * S / med:8.0f} {f['params_active']:14,.0f} "
              f"{f['params_total']:13,.0f}")
    ratio = rows["moe"]["tokens_per_s"] / rows["dense"]["tokens_per_s"]
    print(f"MoE / dense tokens/s: {ratio:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["python"] + sys.argv), "torch": torch.__version__, "device": str(device),
            "threads": torch.get_num_threads(), "batch": B, "seq_len": S}
    out.write_text(json.dumps({"meta": meta, "results": rows, "moe_over_dense": ratio}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
