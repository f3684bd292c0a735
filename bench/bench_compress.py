"""Compression of one trained MoE by every method, measured the same way.

    python bench/bench_compress.py SRC --out /tmp/compress --json bench/results/compress.json \
        --plot docs/compression.png

Arms (each ``moekit compress SRC ...`` into OUT/<arm>, kept, so an interrupted run continues):
prune by usage and by reconstruction (NAEE) to half the experts, merge to half by expert
output and by router logits (HC-SMoE grouping, MC-SMoE alignment), the best of those with
--recover-steps, quantize to 8 and 4 bits (experts only, and 4 bits with attention), and
distill into the dense baseline (alpha 0.5) next to the same student trained alone
(alpha 0), both for SRC's own number of steps (or --distill-steps).

Each model is then measured in a fresh process: parameters, bytes of its weights in memory,
its weights on disk (model.safetensors of an export), peak resident memory while it
generates (--gen-batch prompts x --gen-tokens new tokens, greedy, KV cache), generate
tokens/s, validation loss and perplexity on SRC's validation windows (the first
--val-batches batches), and for a source fine-tuned on a classification task its test
accuracy. The distilled student's "kept share" is (alone - student) / (alone - SRC): the
share of the MoE's gain over a dense model trained alone that distillation keeps.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def arms(experts: int, recover: int) -> dict[str, list[str]]:
    half = str(max(2, experts // 2))
    return {
        "prune-usage": ["--method", "prune", "--experts", half, "--prune-by", "usage"],
        "prune-naee": ["--method", "prune", "--experts", half, "--prune-by", "reconstruction"],
        "merge-output": ["--method", "merge", "--experts", half, "--similarity", "expert-output"],
        "merge-logits": ["--method", "merge", "--experts", half, "--similarity", "router-logits"],
        "prune-naee+recover": ["--method", "prune", "--experts", half, "--recover-steps", str(recover)],
        "merge-output+recover": ["--method", "merge", "--experts", half, "--recover-steps", str(recover)],
        "int8": ["--method", "quantize", "--bits", "8"],
        "int4": ["--method", "quantize", "--bits", "4"],
        "int4+attention": ["--method", "quantize", "--bits", "4", "--attention"],
    }


def compress(src: Path, out: Path, argv: list[str]) -> None:
    if (out / "compress.json").exists() or (out / "summary.json").exists():
        return
    cmd = [sys.executable, "-m", "moekit", "compress", str(src), "--out", str(out), "--no-progress", *argv]
    print("$ moekit " + " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def measure(model_dir: Path, src: Path, val_batches: int, gen_batch: int, gen_tokens: int,
            val_cache: Path | None) -> dict:
    """One model in a fresh process (for its peak memory): see :func:`_measure_here`."""
    cmd = [sys.executable, __file__, str(src), "--measure", str(model_dir), "--val-batches",
           str(val_batches), "--gen-batch", str(gen_batch), "--gen-tokens", str(gen_tokens),
           *(["--val-cache", str(val_cache)] if val_cache else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"measuring {model_dir} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def val_cache_for(src: Path, corpus: str, out: Path, max_docs: int) -> Path:
    """A token cache of ``corpus`` with SRC's tokenizer (for a source without one, such as an
    upcycled SmolLM2): its validation split is what every arm is evaluated on."""
    from moekit.data.catalog import load_documents
    from moekit.data.stream import build_token_cache
    from moekit.store.run_dir import load_run
    cache = out / "val-cache"
    if not (cache / "val.bin").exists():
        tok = load_run(src)[1]
        build_token_cache(load_documents(corpus)[:max_docs], tok, cache, 0.05)
    return cache


def _rss_peak_mb(reset: bool = False) -> float:
    """The process's peak resident memory (VmHWM) in MiB; ``reset`` starts a new peak from the
    current resident size (Linux: /proc/self/clear_refs), so a peak can be one phase's."""
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _measure_here(model_dir: Path, src: Path, val_batches: int, gen_batch: int, gen_tokens: int,
                  val_cache: Path | None = None) -> dict:
    import tempfile
    import time

    import torch

    from moekit.serve.generate import sample_batch
    from moekit.store.run_dir import EXPORT_WEIGHTS, load_run, save_export
    from moekit.train.evaluate import evaluate
    from moekit.train.splits import open_split
    from moekit.transform.quantize import quantized_bytes
    base_rss = _rss_peak_mb()
    model, tok, cfg = load_run(model_dir)
    load_rss = _rss_peak_mb()
    if (model_dir / EXPORT_WEIGHTS).exists():
        disk = (model_dir / EXPORT_WEIGHTS).stat().st_size
    else:   # a run: its model as an export (the checkpoint also holds the optimizer)
        with tempfile.TemporaryDirectory() as tmp:
            disk = (save_export(model, tok, cfg, Path(tmp) / "x") / EXPORT_WEIGHTS).stat().st_size
    from moekit.config import RunConfig
    src_cfg = RunConfig.from_dict(json.loads((src / "config.json").read_text()))   # not its weights
    prompts = [list(range(1, 9)) for _ in range(gen_batch)]
    sample_batch(model, prompts, 4, temperature=0)      # warm-up
    _rss_peak_mb(reset=True)                             # the peak of generating, not of loading
    t0 = time.perf_counter()
    sample_batch(model, prompts, gen_tokens, temperature=0)
    gen_s = time.perf_counter() - t0
    peak = _rss_peak_mb()
    if val_cache is None:
        val = open_split(src_cfg, src, "val")
    else:
        from moekit.data.stream import PackedSplit
        val = PackedSplit.open(val_cache, "val", src_cfg.data.seq_len)
    loss = evaluate(model, val, src_cfg.train.batch_size, torch.device("cpu"), val_batches)
    per_byte = 2 if model.cfg.quant and model.cfg.quant["bits"] == 4 else 1   # packed int4: 2 per byte
    weights = sum(p.numel() for p in model.parameters()) + per_byte * sum(
        b.numel() for n, b in model.named_buffers() if n.endswith("_q"))
    out = {"params": weights,
           "weight_bytes": quantized_bytes(model)["total"], "disk_bytes": disk,
           "peak_rss_mb": peak, "rss_before_load_mb": base_rss, "peak_rss_load_mb": load_rss,
           "gen_tokens_per_s": gen_batch * gen_tokens / gen_s, "val_loss": loss, "val_ppl": math.exp(loss)}
    if getattr(val, "label_ids", None) is not None:
        from moekit.data.task_split import accuracy
        out["test_accuracy"] = accuracy(model, open_split(src_cfg, src, "test"), torch.device("cpu"),
                                        src_cfg.train.batch_size, None)
    return out


def distill_arms(src: Path, out: Path, steps: int | None) -> dict[str, Path]:
    done = {}
    for name, alpha in (("distill", "0.5"), ("dense-alone", "0")):
        run = out / name
        sets = ["--set", f"train.max_steps={steps}"] if steps else []
        compress(src, run, ["--method", "distill", "--alpha", alpha, *sets])
        done[name] = run
    return done


def table(rows: dict[str, dict]) -> str:
    head = (f"| model | params | weights MB | disk MB | peak RSS MB | gen tok/s | val loss | ppl |"
            f"{' test acc |' if any('test_accuracy' in r for r in rows.values()) else ''}")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in rows.items():
        acc = f" {r['test_accuracy']:.3f} |" if "test_accuracy" in r else ""
        lines.append(f"| {name} | {r['params'] / 1e6:.2f}M | {r['weight_bytes'] / 2**20:.1f} | "
                     f"{r['disk_bytes'] / 2**20:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['gen_tokens_per_s']:.0f} | "
                     f"{r['val_loss']:.4f} | {r['val_ppl']:.1f} |{acc}")
    return "\n".join(lines)


def plot(rows: dict[str, dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in rows.items():
        ax.scatter(r["weight_bytes"] / 2**20, r["val_loss"], s=25)
        ax.annotate(name, (r["weight_bytes"] / 2**20, r["val_loss"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("weights in memory (MiB)")
    ax.set_ylabel("validation loss (nats)")
    ax.set_title("Compression: quality against size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", nargs="?")
    ap.add_argument("--out", type=Path, default=Path("/tmp/compress"))
    ap.add_argument("--recover-steps", type=int, default=100)
    ap.add_argument("--distill-steps", type=int, help="default: SRC's own max_steps")
    ap.add_argument("--no-distill", action="store_true")
    ap.add_argument("--only", nargs="+", help="these arms only")
    ap.add_argument("--val-batches", type=int, default=16)
    ap.add_argument("--gen-batch", type=int, default=8)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--val-corpus", help="a source without a token cache: evaluate on this corpus's "
                                         "validation documents (tokenized with its tokenizer)")
    ap.add_argument("--val-docs", type=int, default=3000, help="--val-corpus: its first N documents")
    ap.add_argument("--val-cache", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(_measure_here(args.measure, Path(args.src), args.val_batches, args.gen_batch,
                                       args.gen_tokens, args.val_cache)))
        return 0
    from moekit.store.run_dir import load_run
    src = Path(args.src)
    model, _, cfg = load_run(src)
    todo = {k: v for k, v in arms(model.cfg.moe.num_experts, args.recover_steps).items()
            if not args.only or k in args.only}
    dirs = {"original": src}
    for name, argv_ in todo.items():
        compress(src, args.out / name, argv_)
        dirs[name] = args.out / name
    if not args.no_distill:
        dirs.update(distill_arms(src, args.out, args.distill_steps))
    from moekit.train.splits import has_cache
    val_cache = None
    if not has_cache(src):
        if not args.val_corpus:
            raise SystemExit(f"{src} has no token cache (data/): give --val-corpus to evaluate on")
        val_cache = val_cache_for(src, args.val_corpus, args.out, args.val_docs)
    rows = {name: measure(d, src, args.val_batches, args.gen_batch, args.gen_tokens, val_cache)
            for name, d in dirs.items()}
    if "distill" in rows:
        alone, student, moe = (rows[k]["val_loss"] for k in ("dense-alone", "distill", "original"))
        rows["distill"]["kept_share"] = (alone - student) / (alone - moe) if alone != moe else None
    print(table(rows))
    if "distill" in rows:
        print(f"distillation keeps {rows['distill']['kept_share']:.1%} of the MoE's gain over the dense "
              "model trained alone")
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": "python bench/bench_compress.py " + " ".join(argv or sys.argv[1:]),
                "source": str(src), "source_model": str(model.cfg)[:300]}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
