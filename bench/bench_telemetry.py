"""Routing-telemetry overhead: training steps with telemetry on vs off, in one process.

    python bench/bench_telemetry.py            # the default recipe (configs/tiny-moe.toml), fp32 on CPU

Alternates blocks of --log-every steps with telemetry (update every step, flush and log
every --log-every) and without, on the same model and batches; reports the median step
time of each and the overhead (target: under 3% of step time).
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
from moekit.model.transformer import MoETransformer  # noqa: E402
from moekit.moe.layer import MoELayer  # noqa: E402
from moekit.runtime import tune_cpu_allocator  # noqa: E402
from moekit.train.evaluate import lm_loss  # noqa: E402
from moekit.train.optim import build_optimizer  # noqa: E402
from moekit.train.run import autocast, resolve_device  # noqa: E402
from moekit.train.telemetry import RoutingTelemetry  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny-moe.toml"))
    ap.add_argument("--blocks", type=int, default=8, help="blocks of log-every steps per setting")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--out", default="bench/results/telemetry.json")
    args = ap.parse_args()
    tune_cpu_allocator()
    cfg = RunConfig.from_toml(args.config)
    device = resolve_device(cfg.train.device)
    torch.manual_seed(0)
    model = MoETransformer.build(cfg.model, device=device)
    opt = build_optimizer(model, cfg.train)
    layers = {i: b.ffn for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoELayer)}
    B, S, V = cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size
    tokens = torch.randint(0, V, (B, S + 1), device=device)

    def step(tele):
        with autocast(cfg, device):
            out = model(tokens[:, :-1])
        loss = lm_loss(out.logits, tokens[:, 1:]) + cfg.train.aux_loss_coef * out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if tele is not None:
            tele.update(out.moe)

    times = {"off": [], "on": []}
    tele = RoutingTelemetry(layers)
    for _ in range(3):
        step(None)
    for _ in range(args.blocks):
        for setting in ("off", "on"):
            t0 = time.perf_counter()
            for _ in range(args.log_every):
                step(tele if setting == "on" else None)
            if setting == "on":
                tele.flush()
            times[setting].append((time.perf_counter() - t0) / args.log_every)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    overhead = on / off - 1
    print(f"step time, telemetry off: {off * 1e3:.1f} ms; on: {on * 1e3:.1f} ms; overhead {overhead:+.2%}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["python"] + sys.argv), "torch": torch.__version__}
    out.write_text(json.dumps({"meta": meta, "off_s": times["off"], "on_s": times["on"],
                               "overhead": overhead}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
