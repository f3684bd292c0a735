"""The expert GEMMs alone: how GEMM throughput falls as the same FLOPs split over more experts.

    python bench/bench_expert_gemm.py            # R=16384 rows, D=512, F=1024, bf16, E in {1, 8, 64}

For each E the R rows are split evenly over E experts with their own [D, F] weights, and
the three GEMMs of one linear layer are timed: forward (x @ w), input gradient
(g @ w^T) and weight gradient (x^T @ g), each as one torch._grouped_mm call and as one
torch.mm per expert. E=1 is the dense baseline (the dense FFN runs [T, D] x [D, k*F], the
same FLOPs). TFLOP/s is printed; the weights (E * D * F) grow with E while the FLOPs do not,
so the weight traffic per FLOP grows E-fold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moekit.runtime import tune_cpu_allocator  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_s  # noqa: E402


def time_case(E: int, x: torch.Tensor, g: torch.Tensor, reps: int):
    """(kernel, [fwd, dgrad, wgrad] TFLOP/s, weight MiB) for R rows split over E experts."""
    (R, D), F = x.shape, g.shape[1]
    n = R // E
    w = torch.randn(E, D, F, dtype=x.dtype) * D ** -0.5
    offs = torch.arange(n, R + 1, n, dtype=torch.int32)
    out_f, out_d, out_w = x.new_empty(R, F), x.new_empty(R, D), torch.empty_like(w)
    rows = [slice(e * n, (e + 1) * n) for e in range(E)]

    def loop_fwd():
        for e, r in enumerate(rows):
            torch.mm(x[r], w[e], out=out_f[r])

    def loop_dgrad():
        for e, r in enumerate(rows):
            torch.mm(g[r], w[e].t(), out=out_d[r])

    def loop_wgrad():
        for e, r in enumerate(rows):
            torch.mm(x[r].t(), g[r], out=out_w[e])

    kernels = {"mm per exp": (loop_fwd, loop_dgrad, loop_wgrad)}
    if hasattr(torch, "_grouped_mm"):
        kernels["grouped_mm"] = (lambda: torch._grouped_mm(x, w, offs=offs),
                                 lambda: torch._grouped_mm(g, w.transpose(1, 2), offs=offs),
                                 lambda: torch._grouped_mm(x.t(), g, offs=offs))
    flops = 2 * R * D * F
    weight_mib = w.numel() * w.element_size() / 2**20
    return [(name, [flops / median_s(fn, reps) / 1e12 for fn in fns], weight_mib)
            for name, fns in kernels.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--experts", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--out", default="bench/results/expert_gemm.json")
    args = ap.parse_args()
    tune_cpu_allocator()
    dtype = getattr(torch, args.dtype)
    R, D, F = args.rows, args.d_model, args.d_ff
    x = torch.randn(R, D, dtype=dtype)
    g = torch.randn(R, F, dtype=dtype)
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, R={R} D={D} F={F}")
    print(f"{'E':>4} {'kernel':>11} {'fwd TF/s':>9} {'dgrad':>7} {'wgrad':>7} {'weights MiB':>12}")
    for E in args.experts:
        for name, tf, weight_mib in time_case(E, x, g, args.reps):
            rows.append({"experts": E, "kernel": name, "fwd_tflops": tf[0], "dgrad_tflops": tf[1],
                         "wgrad_tflops": tf[2], "weight_mib": weight_mib})
            print(f"{E:>4} {name:>11} {tf[0]:9.2f} {tf[1]:7.2f} {tf[2]:7.2f} {weight_mib:12.0f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["python"] + sys.argv), "torch": torch.__version__, "dtype": args.dtype,
            "rows": R, "d_model": D, "d_ff": F}
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
