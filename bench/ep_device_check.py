"""The expert-parallel code path on one device: NCCL on a GPU (gloo on CPU for a dry run).

    torchrun --nproc-per-node 1 bench/ep_device_check.py                        # CUDA + NCCL, bf16
    torchrun --nproc-per-node 2 bench/ep_device_check.py                        # two GPUs
    python bench/ep_device_check.py --device cpu --dtype float32                # gloo, here

Each rank builds the same MoE layer, keeps E / world experts behind the all-to-all
dispatcher (moekit.parallel.expert_parallel) and runs forward + backward on its own tokens.
It checks the output, the input gradient and its experts' gradients against the full
single-device layer on the same tokens (expert gradients summed over ranks), then times
both (median of --reps) and the all-to-alls, and writes JSON. Started without torchrun it
joins a one-process group itself.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moekit import MoEConfig, MoELayer  # noqa: E402
from moekit.parallel.expert_parallel import shard_experts  # noqa: E402
from moekit.parallel.parallelize import leave_process_group  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per rank")
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--d-ff", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default="bench/results/ep_device_check.json")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("ep_device_check: no CUDA device visible; use --device cpu for a gloo dry run")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    full = MoELayer(MoEConfig(d_model=args.d_model, d_ff=args.d_ff, num_experts=args.experts,
                              top_k=args.top_k, dtype=dtype)).to(device)
    ep = copy.deepcopy(full)
    shard_experts(ep)
    gen = torch.Generator(device=device).manual_seed(100 + rank)
    x = torch.randn(args.tokens, args.d_model, generator=gen, device=device, dtype=dtype)
    g = torch.randn(args.tokens, args.d_model, generator=gen, device=device, dtype=dtype)

    def step(layer):
        xx = x.clone().requires_grad_()
        y, _ = layer(xx)
        y.backward(g)
        return y.detach(), xx.grad

    # correctness: the EP layer against the full layer on this rank's tokens
    y_full, gx_full = step(full)
    y_ep, gx_ep = step(ep)
    lo, hi = ep.expert_range
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y_ep, y_full, **tol)
    torch.testing.assert_close(gx_ep, gx_full, **tol)
    for name in ("w_gate_EDF", "w_up_EDF", "w_down_EFD"):
        summed = getattr(full.experts, name).grad.float().clone()
        dist.all_reduce(summed)
        torch.testing.assert_close(getattr(ep.experts, name).grad.float(), summed[lo:hi], **tol)

    # timing: steps, and every all-to-all inside the EP step
    a2a = [0.0]
    original = dist.all_to_all_single

    def timed(*a, **k):
        _sync(device)
        t0 = time.perf_counter()
        work = original(*a, **k)
        _sync(device)
        a2a[0] += time.perf_counter() - t0
        return work

    def median_ms(layer):
        times, comm = [], []
        for i in range(args.reps + 2):
            dist.barrier()
            for p in layer.parameters():
                p.grad = None
            a2a[0] = 0.0
            _sync(device)
            t0 = time.perf_counter()
            step(layer)
            _sync(device)
            if i >= 2:                       # two warm-up steps
                times.append(time.perf_counter() - t0)
                comm.append(a2a[0])
        return statistics.median(times) * 1e3, statistics.median(comm) * 1e3

    full_ms, _ = median_ms(full)
    dist.all_to_all_single = timed
    ep_ms, a2a_ms = median_ms(ep)
    dist.all_to_all_single = original
    result = {"backend": dist.get_backend(), "world": world, "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "full_layer_ms": full_ms, "ep_layer_ms": ep_ms,
              "a2a_ms": a2a_ms}
    if rank == 0:
        print(f"{result['backend']} x {world} on {result['device']}, {args.dtype}, T {args.tokens}/rank, "
              f"D {args.d_model}, F {args.d_ff}, E {args.experts}, top-{args.top_k}")
        print("EP layer equals the full layer (outputs, x grads, expert grads summed over ranks)")
        print(f"full layer {full_ms:8.2f} ms/step | EP layer {ep_ms:8.2f} ms/step | "
              f"all-to-alls {a2a_ms:6.2f} ms")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": " ".join(["python"] + sys.argv), **vars(args)}
        out.write_text(json.dumps({"meta": meta, **result}, indent=1))
        print(f"wrote {out}")
    leave_process_group()


if __name__ == "__main__":
    main()
