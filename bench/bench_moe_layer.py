"""The MoE layer against its peers, forward+backward, each setting in a fresh process.

    python bench/bench_moe_layer.py                       # the whole grid (several minutes),
                                                          # table into docs/benchmarks.md
    python bench/bench_moe_layer.py --settings tuned --dtypes bfloat16 --experts 64 --no-docs

Settings, each run in its own process (the allocator tuning cannot be undone in a process):
  tuned     moekit.runtime.tune_cpu_allocator() first (what `moekit train` does)
  untuned   plain `import moekit`: what a library user who builds MoELayer gets
  busy      untuned, with a second process running a 2-thread dense FFN fwd+bwd loop on the
            same cores for the whole measurement (a shared machine)

Contenders, timed interleaved (one step of each per round), median of --reps rounds:
  dense         a dense SwiGLU FFN of the same active FLOPs (hidden d_ff * top_k): the baseline
  moekit        MoELayer, dropless, backend "auto" (the default a user gets)
  moekit_padded the same layer with backend "padded_mm" (one batched GEMM per projection over
                rows padded to the largest expert count): the choice for shared cores
  hf_mixtral    transformers' MixtralSparseMoeBlock with its grouped_mm experts
  deepspeed     deepspeed.moe.layer.MoE (drop_tokens=False, ep_size=1, a gloo group of one),
                SwiGLU experts of three nn.Linear (the `bench` extra installs it)
  experts_only  moekit's expert FFN alone on rows already grouped by expert (the same counts):
                the layer's ceiling; layer / experts_only - 1 is what routing, permutation and
                combine add
Ratios are tokens/s relative to the dense FFN in the same process (higher is better).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_layer_shape_args  # noqa: E402

DTYPES = ("float32", "bfloat16")
SETTINGS = ("tuned", "untuned", "busy")
PEERS = ("moekit", "hf_mixtral", "deepspeed", "moekit_padded")
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench_moe_layer:begin -->", "<!-- bench_moe_layer:end -->"


# ---------------------------------------------------------------- contenders (child process)

def hf_mixtral_block(D, F, E, K, dtype):
    import torch
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K)
    cfg._experts_implementation = "grouped_mm"   # its fastest CPU path ("eager" loops over experts)
    block = MixtralSparseMoeBlock(cfg).to(dtype)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=D ** -0.5)
    return block


def deepspeed_moe(D, F, E, K, dtype):
    from torch import nn
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("BENCH_DS_PORT", "29561"),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1)
    from deepspeed.moe.layer import MoE

    class SwiGLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(D, F, bias=False)
            self.up = nn.Linear(D, F, bias=False)
            self.down = nn.Linear(F, D, bias=False)

        def forward(self, x):
            return self.down(nn.functional.silu(self.gate(x)) * self.up(x))

    return MoE(hidden_size=D, expert=SwiGLU(), num_experts=E, ep_size=1, k=K, drop_tokens=False).to(dtype)


def build(E: int, dtype_name: str, args) -> tuple[dict, dict]:
    """({name: step function}, {name: why it is missing})."""
    import torch

    from moekit import DenseFFN, MoEConfig, MoELayer
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    T, D, F, K = args.tokens, args.d_model, args.d_ff, args.top_k
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    grad = torch.randn(T, D, dtype=dtype)
    layer = MoELayer(MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K, dtype=dtype))
    padded = copy.deepcopy(layer)       # the same weights and routing, batched expert GEMMs
    padded.experts.backend = "padded_mm"
    modules = {"dense": (DenseFFN(D, F * K, dtype=dtype), "plain"), "moekit": (layer, "first"),
               "moekit_padded": (padded, "first")}
    missing = {}
    for name, make in (("hf_mixtral", hf_mixtral_block), ("deepspeed", deepspeed_moe)):
        if name in args.skip:
            continue
        try:
            modules[name] = (make(D, F, E, K, dtype), "batch" if name == "hf_mixtral" else "first")
        except Exception as exc:   # not installed, or this dtype does not run: a '-' in the table
            missing[name] = _why(exc)
    steps = {n: step_fn(m, x, grad, kind) for n, (m, kind) in modules.items()}
    with torch.no_grad():   # the ceiling: the same expert FFN on rows grouped by the layer's routing
        plan = layer.dispatcher.plan(layer.router(x))
        x_RD = x[plan.token_R].detach().requires_grad_()
    grad_RD = torch.randn_like(x_RD)
    steps["experts_only"] = step_fn(lambda r: layer.experts(r, plan.counts_E), x_RD, grad_RD, "plain",
                                    params=list(layer.experts.parameters()))
    for name in list(steps):   # a peer that fails its first step is reported, not timed
        try:
            steps[name]()
        except Exception as exc:
            missing[name] = _why(exc)
            del steps[name]
    return steps, missing


def _why(exc: Exception) -> str:
    """One line on why a contender did not run."""
    first = str(exc).splitlines()[0][:120] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"


def step_fn(module, x, grad, kind: str, params=None):
    params = [p for p in (params if params is not None else module.parameters()) if p.requires_grad]
    shape = (1, *x.shape) if kind == "batch" else x.shape

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        out = module(x.view(shape))
        y = out[0] if kind == "first" or isinstance(out, tuple) else out
        y.backward(grad.view(shape))
    return step


def child(args) -> None:
    """One (setting, dtype, E) case: time every contender, print one JSON line."""
    if args.setting == "tuned":
        from moekit.runtime import tune_cpu_allocator
        if not tune_cpu_allocator():
            raise SystemExit("tune_cpu_allocator() did not apply (not glibc?)")
    import torch
    steps, missing = build(args.experts[0], args.dtypes[0], args)
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {n: [] for n in steps}
    for _ in range(args.reps):
        for n, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    print(json.dumps({"setting": args.setting, "dtype": args.dtypes[0], "num_experts": args.experts[0],
                      "threads": torch.get_num_threads(), "torch": torch.__version__, "missing": missing,
                      "contenders": {n: {"median_s": med[n], "tokens_per_s": args.tokens / med[n],
                                         "ratio_to_dense": med["dense"] / med[n], "runs_s": times[n]}
                                     for n in steps}}))


def load(args) -> None:
    """The co-runner of the busy setting: a 2-thread dense FFN forward+backward, forever."""
    import torch

    from moekit import DenseFFN
    ffn = DenseFFN(args.d_model, args.d_ff * args.top_k)
    x = torch.randn(args.tokens, args.d_model, requires_grad=True)
    while True:
        ffn(x).sum().backward()


# ---------------------------------------------------------------- driver

def run_case(setting: str, dtype: str, E: int, args) -> dict:
    shape = ["--tokens", str(args.tokens), "--d-model", str(args.d_model), "--d-ff", str(args.d_ff),
             "--top-k", str(args.top_k)]
    cmd = [sys.executable, __file__, "--child", "--setting", setting, "--dtypes", dtype, "--experts", str(E),
           "--reps", str(args.reps), "--warmup", str(args.warmup), *shape]
    if args.skip:
        cmd += ["--skip", *args.skip]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    co = None
    if setting == "busy":
        co = subprocess.Popen([sys.executable, __file__, "--load", *shape], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(3)   # let it reach its steady loop
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    finally:
        if co is not None:
            co.kill()
            co.wait()
    if out.returncode:
        raise SystemExit(f"case {setting} {dtype} E={E} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cell(case: dict, name: str, best: str | None) -> str:
    c = case["contenders"].get(name)
    if c is None:
        return "-"
    text = f"{c['ratio_to_dense']:.3f}"
    return f"**{text}**" if name == best else text


def table(cases: list[dict]) -> str:
    head = ("| setting | dtype | E | dense ms | moekit (auto) | transformers grouped_mm Mixtral | "
            "DeepSpeed-MoE | moekit padded_mm | moekit / experts only | routing + permutation + combine |")
    lines = [head, "|" + " --- |" * 10]
    for c in cases:
        ratios = {n: c["contenders"][n]["ratio_to_dense"] for n in PEERS if n in c["contenders"]}
        best = max(ratios, key=ratios.get) if ratios else None
        layer = c["contenders"]["moekit"]["median_s"]
        ceiling = c["contenders"].get("experts_only", {}).get("median_s")
        over = f"{layer / ceiling:.3f}" if ceiling else "-"
        share = f"{100 * (1 - ceiling / layer):.1f}%" if ceiling else "-"
        lines.append(f"| {c['setting']} | {c['dtype'].replace('float', 'f')} | "
                     f"{c['num_experts']} | {c['contenders']['dense']['median_s'] * 1e3:.1f} | "
                     f"{cell(c, 'moekit', best)} | {cell(c, 'hf_mixtral', best)} | "
                     f"{cell(c, 'deepspeed', best)} | {cell(c, 'moekit_padded', best)} | {over} | {share} |")
    return "\n".join(lines)


def bf16_slowdown() -> float:
    """How many times slower a bf16 GEMM runs than an f32 one here (~1 on CPUs with AMX or
    AVX512-BF16; ~90 on an AVX2-only CPU, where a bf16 row of the grid would take hours)."""
    import torch
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        torch.mm(x, y)
        t = time.perf_counter()
        torch.mm(x, y)
        times[dtype] = time.perf_counter() - t
    return times[torch.bfloat16] / times[torch.float32]


def write_docs(path: Path, text: str, command: str) -> None:
    doc = path.read_text()
    block = f"{BEGIN}\n```\n{command}\n```\n\n{text}\n{END}"
    if BEGIN in doc and END in doc:
        doc = doc[:doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    path.write_text(doc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_shape_args(ap)
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    ap.add_argument("--busy-dtypes", nargs="+", default=["float32"], choices=DTYPES,
                    help="dtypes of the busy setting (default float32: the slowest, and DeepSpeed runs)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--skip", nargs="*", default=[], choices=["hf_mixtral", "deepspeed"],
                    help="peers to leave out (dense, moekit and experts_only always run)")
    ap.add_argument("--out", default="bench/results/moe_layer.json")
    ap.add_argument("--doc", type=Path, default=DOC, help="the markdown file whose table block is rewritten")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite the table in --doc")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--setting", default="tuned", choices=SETTINGS, help=argparse.SUPPRESS)
    ap.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load:
        return load(args)
    if args.child:
        return child(args)

    command = " ".join(["python", "bench/bench_moe_layer.py", *sys.argv[1:]])
    skipped = {}
    if "bfloat16" in args.dtypes + args.busy_dtypes and (slow := bf16_slowdown()) > 4:
        skipped["bfloat16"] = f"this CPU runs a bf16 GEMM {slow:.0f}x slower than f32 (no AMX or AVX512-BF16)"
        print(f"bfloat16 rows skipped: {skipped['bfloat16']}", flush=True)
        args.dtypes = [d for d in args.dtypes if d != "bfloat16"]
        args.busy_dtypes = [d for d in args.busy_dtypes if d != "bfloat16"]
    cases = []
    for setting in args.settings:
        for dtype in (args.busy_dtypes if setting == "busy" else args.dtypes):
            for E in args.experts:
                case = run_case(setting, dtype, E, args)
                cases.append(case)
                row = "  ".join(f"{n} {v['median_s'] * 1e3:.0f} ms ({v['ratio_to_dense']:.3f})"
                                for n, v in case["contenders"].items())
                print(f"{setting:>7} {dtype:>8} E={E:<3} {row}", flush=True)
                for n, why in case["missing"].items():
                    print(f"        {n}: not run ({why})", flush=True)
    if not cases:
        raise SystemExit("no case left to run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    text = table(cases) + "".join(f"\n\n{k} rows not run: {v}." for k, v in skipped.items())
    print(text)
    meta = {"command": command, "machine": platform.processor() or platform.machine(),
            "cpu": _cpu_name(), "tokens": args.tokens, "d_model": args.d_model, "d_ff": args.d_ff,
            "top_k": args.top_k, "reps": args.reps, "warmup": args.warmup, "skipped": skipped}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": cases}, indent=1))
    print(f"wrote {out}")
    if not args.no_docs:
        where = f"Machine: {meta['cpu']}, {cases[0]['threads']} threads, torch {cases[0]['torch']}."
        write_docs(args.doc, f"{where}\n\n{text}", command)
        print(f"wrote the table into {args.doc}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
