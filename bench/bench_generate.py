"""Generation speed: ``moekit generate`` (KV cache) against its uncached twin and against
transformers' ``generate`` on the same model exported with ``moekit export --format hf``.

    python bench/bench_generate.py RUN [RUN ...] --batch 1 8 --max-new-tokens 64 \
        --json bench/results/generate.json

For each run and batch size: the same prompts (the first --prompt-tokens tokens of real text,
left-padded where they differ), greedy decoding, exactly --max-new-tokens new tokens (no
stop on end-of-text, so both sides do the same work), median of --reps timed calls after a
warm-up. Reported: new tokens/s of each contender, the ratio to transformers, and whether the
greedy tokens agree with transformers' (the same model through two implementations).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moekit.serve.generate import sample_batch  # noqa: E402
from moekit.store.run_dir import export_hf, load_run  # noqa: E402

TEXTS = [
    "Mr Speaker, the Government has made it clear that the budget for next year",
    "The committee met on Tuesday to discuss the report on public health and",
    "Meine Damen und Herren, wir haben heute über die Zukunft unserer Schulen",
    "Señor Presidente, el Gobierno ha presentado un proyecto de ley que",
    "Voorzitter, het kabinet heeft vandaag een brief gestuurd over de",
    "The President said on Monday that the new trade agreement would",
    "Officials in Brussels warned that the economy could slow down if",
    "In a statement released late on Friday, the company said that",
]


def prompts_of(tok, batch: int, length: int) -> list[list[int]]:
    ids = [tok.encode(TEXTS[i % len(TEXTS)]).ids[:length] for i in range(batch)]
    return [p if p else [0] for p in ids]


def timed(fn, reps: int) -> tuple[float, object]:
    out = fn()                                   # warm-up (allocations, kernels)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def hf_generate(hf, prompts: list[list[int]], new: int, pad: int) -> list[list[int]]:
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=pad, eos_token_id=None)
    return out[:, longest:].tolist()


def bench_run(run: Path, batches: list[int], new: int, length: int, reps: int, uncached: bool) -> dict:
    from transformers import AutoModelForCausalLM
    model, tok, _ = load_run(run)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(run, Path(tmp) / "hf")
        hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval()
    m = model.cfg
    rows = []
    for batch in batches:
        prompts = prompts_of(tok, batch, length)
        contenders = {
            "moekit": lambda p=prompts: sample_batch(model, p, new, temperature=0),
            "transformers": lambda p=prompts: hf_generate(hf, p, new, pad=0),
        }
        if uncached:
            contenders["moekit-uncached"] = lambda p=prompts: sample_batch(model, p, new, temperature=0,
                                                                            use_cache=False)
        row = {"batch": batch}
        outs = {}
        for name, fn in contenders.items():
            s, outs[name] = timed(fn, reps)
            row[name] = {"median_s": s, "tokens_per_s": batch * new / s}
        base = row["transformers"]["tokens_per_s"]
        for name in contenders:
            row[name]["ratio_to_transformers"] = row[name]["tokens_per_s"] / base
        same = [a == b for a, b in zip(outs["moekit"], outs["transformers"])]
        row["greedy_rows_equal_transformers"] = f"{sum(same)}/{len(same)}"
        rows.append(row)
    kind = "dense" if m.moe is None else f"MoE {m.moe.num_experts}x top-{m.moe.top_k}"
    params = sum(p.numel() for p in model.parameters())
    return {"run": str(run), "model": f"{kind}, d_model {m.d_model}, {m.n_layers} layers, {params:,} params",
            "hf_class": type(hf).__name__, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=12)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-uncached", action="store_true", help="skip the slow uncached twin")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    results = [bench_run(Path(r), args.batch, args.max_new_tokens, args.prompt_tokens, args.reps,
                         not args.no_uncached) for r in args.runs]
    print(f"{'model':<58} {'batch':>5} {'moekit tok/s':>13} {'uncached':>9} {'HF tok/s':>9} "
          f"{'moekit/HF':>9} {'same greedy':>11}")
    for res in results:
        for row in res["rows"]:
            unc = row.get("moekit-uncached", {}).get("tokens_per_s")
            print(f"{res['model'][:58]:<58} {row['batch']:>5} {row['moekit']['tokens_per_s']:>13.1f} "
                  f"{unc if unc is None else round(unc, 1)!s:>9} {row['transformers']['tokens_per_s']:>9.1f} "
                  f"{row['moekit']['ratio_to_transformers']:>9.2f} "
                  f"{row['greedy_rows_equal_transformers']:>11}")
    if args.json:
        import transformers
        meta = {"command": "python bench/bench_generate.py " + " ".join(argv or sys.argv[1:]),
                "torch": torch.__version__, "transformers": transformers.__version__,
                "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                "max_new_tokens": args.max_new_tokens, "prompt_tokens": args.prompt_tokens}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
