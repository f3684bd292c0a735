"""Where the MoE layer's time goes: each stage's forward+backward, timed alone.

    python bench/bench_moe_phases.py                  # E in {8, 64}, bf16, 8192 tokens
    python bench/bench_moe_phases.py --experts 8 --dtype float32

Stages (as MoELayer runs them): router (float32 logits, softmax, stable top-k), plan (sort
by expert, counts, inverse permutation), gather (rows to expert order), experts (the
grouped FFN), combine (weighted sum back to tokens, float32), aux (balancing + z-loss).
The dense FFN of equal active FLOPs and the whole layer are timed in the same run; the
stages are timed alone, so their sum differs from the whole by what runs between them
(autograd's accumulation of the two gradients of x, and cache effects: a stage timed alone
finds its inputs warmer than in the layer).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moekit import DenseFFN, MoEConfig, MoELayer  # noqa: E402
from moekit.moe.balance import load_balancing_loss, z_loss  # noqa: E402
from moekit.runtime import tune_cpu_allocator  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_layer_shape_args, median_s  # noqa: E402


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def stages(E: int, dtype: torch.dtype, args) -> dict[str, float]:
    torch.manual_seed(0)
    T, D, F, K = args.tokens, args.d_model, args.d_ff, args.top_k
    layer = MoELayer(MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K, dtype=dtype, backend=args.backend))
    dense = DenseFFN(D, F * K, dtype=dtype)
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    grad_TD = torch.randn(T, D, dtype=dtype)
    with torch.no_grad():
        routing = layer.router(x)
        plan = layer.dispatcher.plan(routing)
        x_RD = x[plan.token_R]
        y_RD = layer.experts(x_RD, plan.counts_E)
    grad_RD = torch.randn_like(x_RD)

    def clear(*tensors):
        for t in tensors:
            t.grad = None

    def run_dense():
        clear(x, *dense.parameters())
        dense(x).backward(grad_TD)

    def run_layer():
        clear(x, *layer.parameters())
        layer(x)[0].backward(grad_TD)

    def run_router():
        clear(x, *layer.router.parameters())
        r = layer.router(x)
        r.weights_TK.backward(torch.ones_like(r.weights_TK))

    def run_plan():
        layer.dispatcher.plan(routing).counts_E.tolist()

    xg = leaf(x)

    def run_gather():
        clear(xg)
        layer.dispatcher.dispatch(xg, routing)[0].backward(grad_RD)

    xr = leaf(x_RD)

    def run_experts():
        clear(xr, *layer.experts.parameters())
        layer.experts(xr, plan.counts_E).backward(grad_RD)

    yr, w = leaf(y_RD), leaf(routing.weights_TK)
    plan_w = dataclasses.replace(plan, weights_TK=w)

    def run_combine():
        clear(yr, w)
        layer.dispatcher.combine(yr, plan_w).backward(grad_TD)

    logits = leaf(routing.logits_TE)

    def run_aux():
        clear(logits)
        (load_balancing_loss(torch.softmax(logits, -1), routing.experts_TK) + z_loss(logits)).backward()

    fns = {"dense FFN": run_dense, "MoE layer": run_layer, "router": run_router, "plan": run_plan,
           "gather": run_gather, "experts": run_experts, "combine": run_combine, "aux losses": run_aux}
    return {name: median_s(fn, args.reps) * 1e3 for name, fn in fns.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_shape_args(ap)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--out", default="bench/results/moe_phases.json")
    args = ap.parse_args()
    tuned = tune_cpu_allocator()
    dtype = getattr(torch, args.dtype)
    results = {E: stages(E, dtype, args) for E in args.experts}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
          f"malloc tuned: {tuned}")
    print(f"{'stage (fwd+bwd)':<16}" + "".join(f"{f'E={E} ms':>11}" for E in args.experts))
    for stage in next(iter(results.values())):
        print(f"{stage:<16}" + "".join(f"{results[E][stage]:11.1f}" for E in args.experts))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["python"] + sys.argv), "torch": torch.__version__, "dtype": args.dtype,
            "tokens": args.tokens, "d_model": args.d_model, "d_ff": args.d_ff, "top_k": args.top_k,
            "backend": args.backend, "malloc_tuned": tuned}
    out.write_text(json.dumps({"meta": meta, "stages_ms": {str(E): r for E, r in results.items()}}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
