"""MoE layer forward+backward throughput against baselines in the same process.

    python bench/bench_moe_layer.py                      # the issue's grid, ~8 minutes on 2 cores
    python bench/bench_moe_layer.py --experts 8 --dtypes bfloat16 --reps 5

Contenders, timed interleaved (one run of each per round) and reported as the median:
  dense        a dense SwiGLU FFN with the same active FLOPs (hidden d_ff * top_k)
  moekit       MoELayer, dropless, backend "auto" (the default a user gets: grouped_mm)
  segment_mm   MoELayer with backend "segment_mm" (one GEMM per expert, one autograd Function)
  loop         MoELayer with backend "reference" (plain autograd loop over experts)
  hf_mixtral   transformers' MixtralSparseMoeBlock with its grouped_mm experts (if installed)
With --compile, also dense_compiled and moekit_compiled (torch.compile of the dense FFN and
of MoELayer with backend "grouped_mm", bf16 only: f32 _grouped_mm does not compile).
Ratios are tokens/s relative to the dense FFN of equal active FLOPs (higher is better).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moekit import DenseFFN, MoEConfig, MoELayer  # noqa: E402
from moekit.runtime import tune_cpu_allocator  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_layer_shape_args  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def hf_mixtral_block(cfg: MoEConfig, dtype: torch.dtype):
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    hf_cfg = MixtralConfig(hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                           num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k)
    # transformers 5.x: its fastest experts path on CPU ("eager" is a loop over experts)
    hf_cfg._experts_implementation = "grouped_mm"
    block = MixtralSparseMoeBlock(hf_cfg).to(dtype)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=cfg.d_model ** -0.5)
    return block


def step_fn(module, x, grad, returns_aux: bool):
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        out = module(x)
        y = out[0] if returns_aux else out
        y.backward(grad)
    return step


def run_case(num_experts: int, dtype: torch.dtype, args) -> dict:
    torch.manual_seed(0)
    T, D, F, K = args.tokens, args.d_model, args.d_ff, args.top_k
    cfg = MoEConfig(d_model=D, d_ff=F, num_experts=num_experts, top_k=K, dtype=dtype)
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    grad = torch.randn(T, D, dtype=dtype)
    contenders = {
        "dense": (DenseFFN(D, F * K, dtype=dtype), False),
        "moekit": (MoELayer(cfg), True),
        "segment_mm": (MoELayer(MoEConfig(**{**cfg.__dict__, "backend": "segment_mm"})), True),
        "loop": (MoELayer(MoEConfig(**{**cfg.__dict__, "backend": "reference"})), True),
    }
    hf = hf_mixtral_block(cfg, dtype)
    if hf is not None:
        contenders["hf_mixtral"] = (hf, False)
    if args.compile and dtype == torch.bfloat16:
        contenders["dense_compiled"] = (torch.compile(contenders["dense"][0]), False)
        gmm_layer = MoELayer(MoEConfig(**{**cfg.__dict__, "backend": "grouped_mm"}))
        contenders["moekit_compiled"] = (torch.compile(gmm_layer), True)
    for name in args.skip:
        contenders.pop(name, None)
    steps = {n: step_fn(m, x.view(1, T, D) if n == "hf_mixtral" else x,
                        grad.view(1, T, D) if n == "hf_mixtral" else grad, aux)
             for n, (m, aux) in contenders.items()}
    for _ in range(args.warmup):   # warm-up: the heap grows to its steady size
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {n: [] for n in steps}
    for _ in range(args.reps):
        for n, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    active_flops = 3 * 2 * T * D * F * K * (3 if cfg.activation == "swiglu" else 2)
    rows = {n: {"median_s": med[n], "tokens_per_s": T / med[n], "ratio_to_dense": med["dense"] / med[n],
                "gflops": active_flops / med[n] / 1e9, "runs_s": times[n]} for n in steps}
    return {"num_experts": num_experts, "dtype": str(dtype).replace("torch.", ""), "contenders": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_shape_args(ap)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=sorted(DTYPES))
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--skip", nargs="*", default=[], help="contenders to leave out, e.g. loop hf_mixtral")
    ap.add_argument("--out", default="bench/results/moe_layer.json")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="add torch.compile'd dense and MoE (bf16)")
    ap.add_argument("--no-tune-malloc", action="store_true",
                    help="leave glibc's allocator as it is (every large tensor page-faults again)")
    args = ap.parse_args()
    tuned = False if args.no_tune_malloc else tune_cpu_allocator()

    results = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, malloc tuned: {tuned}")
    print(f"{'E':>3} {'dtype':>8} {'contender':>11} {'ms':>8} {'tok/s':>9} {'GFLOP/s':>8} {'vs dense':>8}")
    for dtype_name in args.dtypes:
        for E in args.experts:
            case = run_case(E, DTYPES[dtype_name], args)
            results.append(case)
            for n, r in case["contenders"].items():
                print(f"{E:>3} {dtype_name:>8} {n:>11} {r['median_s'] * 1e3:8.1f} {r['tokens_per_s']:9.0f} "
                      f"{r['gflops']:8.1f} {r['ratio_to_dense']:8.3f}", flush=True)
    meta = {"command": " ".join(["python"] + sys.argv), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
            "tokens": args.tokens, "d_model": args.d_model, "d_ff": args.d_ff, "top_k": args.top_k,
            "reps": args.reps, "warmup": args.warmup, "malloc_tuned": tuned}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
