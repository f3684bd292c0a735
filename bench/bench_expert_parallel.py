"""Expert parallelism on CPU: EP=2 (two gloo processes) against EP=1, and the all-to-all's share.

    python bench/bench_expert_parallel.py          # 4096 tokens per rank, D=512, F=1024, E=8, top-2
    python bench/bench_expert_parallel.py --tokens 8192 --experts 16 --dtype bfloat16

EP=1: one process runs the MoE layer (forward + backward) on its T tokens with all E
experts. EP=2: two processes each run their own T tokens; each holds E/2 experts and the
tokens travel by all-to-all. Both are timed (median of --reps after warm-up), and inside
EP=2 every all-to-all (counts and rows of dispatch and combine in the forward pass, their
gradients in the backward pass) is timed, forward and backward apart. The analytic model
(docs/scaling.md) predicts the bytes each rank sends per step; the measured all-to-all
time over those bytes gives the effective bandwidth.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moekit import MoEConfig, MoELayer  # noqa: E402
from moekit.parallel.expert_parallel import shard_experts  # noqa: E402
from moekit.parallel.parallelize import leave_process_group  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_s  # noqa: E402


def a2a_bytes_per_rank(tokens: int, top_k: int, d_model: int, bytes_per: int, ep: int) -> float:
    """Bytes one rank sends per MoE layer per training step under uniform routing: rows to
    other ranks ((ep-1)/ep of its T*K assignments), D values each, twice forward (dispatch,
    combine) and twice backward (their gradients)."""
    return 4 * tokens * top_k * (ep - 1) / ep * d_model * bytes_per


def _worker(rank, world, port, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=args.d_model, d_ff=args.d_ff, num_experts=args.experts,
                               top_k=args.top_k, dtype=dtype))
    ep_layer = copy.deepcopy(layer)
    shard_experts(ep_layer)
    x = torch.randn(args.tokens, args.d_model, dtype=dtype, generator=torch.Generator().manual_seed(rank),
                    requires_grad=True)
    g = torch.randn_like(x)
    # every all-to-all goes through torch.distributed.all_to_all_single: the counts and rows of
    # the forward pass, and (inside the autograd Function's backward) the gradients' rows
    a2a = {"forward": 0.0, "backward": 0.0}
    phase = ["forward"]
    original = dist.all_to_all_single

    def timed(*a, **k):
        t0 = time.perf_counter()
        work = original(*a, **k)
        a2a[phase[0]] += time.perf_counter() - t0
        return work

    def step(module):
        for p in module.parameters():
            p.grad = None
        x.grad = None
        phase[0] = "forward"
        y, _ = module(x)
        phase[0] = "backward"
        y.backward(g)

    dist.barrier()
    ep2 = median_s(lambda: step(ep_layer), args.reps)
    dist.all_to_all_single = timed
    per_step = []
    for _ in range(args.reps):
        dist.barrier()          # both ranks start the step together: time waiting on a late peer is not comm
        a2a.update(forward=0.0, backward=0.0)
        step(ep_layer)
        per_step.append(dict(a2a))
    dist.all_to_all_single = original
    dist.barrier()
    ep1 = median_s(lambda: step(layer), args.reps) if rank == 0 else 0.0
    dist.barrier()
    if rank == 0:     # medians over steps: one slow step (the other rank descheduled) is noise
        out.put({"ep2_step_s": ep2, "ep1_step_s": ep1,
                 "a2a_forward_s": statistics.median(s["forward"] for s in per_step),
                 "a2a_backward_s": statistics.median(s["backward"] for s in per_step)})
    leave_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per process (2 cores: 1 each)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default="bench/results/expert_parallel.json")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    q = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(2, port, args, q), nprocs=2, join=True)
    r = q.get()
    bytes_per = 2 if args.dtype == "bfloat16" else 4
    model_bytes = a2a_bytes_per_rank(args.tokens, args.top_k, args.d_model, bytes_per, 2)
    a2a_s = r["a2a_forward_s"] + r["a2a_backward_s"]
    r.update({"predicted_bytes_per_rank_per_step": model_bytes,
              "effective_a2a_GBps": model_bytes / a2a_s / 1e9 if a2a_s else None,
              "a2a_share_of_ep2_step": a2a_s / r["ep2_step_s"]})
    print(f"tokens/rank {args.tokens}, D {args.d_model}, F {args.d_ff}, E {args.experts}, top-{args.top_k}, "
          f"{args.dtype}, {args.threads} thread(s)/process")
    print(f"EP=1 (1 process, all experts):   {r['ep1_step_s'] * 1e3:8.1f} ms/step per {args.tokens} tokens")
    print(f"EP=2 (2 processes, E/2 each):    {r['ep2_step_s'] * 1e3:8.1f} ms/step per rank "
          f"({2 * args.tokens} tokens in all)")
    fwd_ms, bwd_ms = r["a2a_forward_s"] * 1e3, r["a2a_backward_s"] * 1e3
    print(f"all-to-alls, forward / backward: {fwd_ms:8.1f} / {bwd_ms:.1f} ms/step "
          f"({model_bytes / 1e6:.1f} MB sent per rank: {r['effective_a2a_GBps']:.2f} GB/s)")
    print(f"all-to-all share of the EP=2 step: {r['a2a_share_of_ep2_step']:.1%}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["python"] + sys.argv), **vars(args)}
    out.write_text(json.dumps({"meta": meta, **r}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
