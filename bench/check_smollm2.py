"""The whole SmolLM2-135M: moekit's logits against transformers' own, both ways.

    python bench/check_smollm2.py            # ~1 min on 2 cores; writes bench/results/smollm2_logits.json

1. transformers reads the cached catalog directory; moekit imports the same directory: logits
   on real news sentences (float32), max abs difference and the argmax agreement.
2. moekit exports its model as a Hugging Face directory; transformers loads that: logits again.
3. The copy upcycle (8 experts, top-2) and the virtual-group upcycle (16 x d_ff/4, top-4):
   their logits against the dense model's (the function-preserving claim on the real model).
The tests do the same on the first layers only (a full forward is seconds here).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from moekit.data.catalog import load_documents  # noqa: E402
from moekit.data.tokenizer import load_tokenizer  # noqa: E402
from moekit.interop.hf import catalog_model_dir, load_hf_dir, save_hf_dir  # noqa: E402
from moekit.transform.upcycle import upcycle  # noqa: E402


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {"max_abs_diff": float((a - b).abs().max()), "logit_std": float(b.std()),
            "argmax_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--json", type=Path, default=ROOT / "bench/results/smollm2_logits.json")
    args = ap.parse_args()
    import transformers
    hf_dir = catalog_model_dir("smollm2-135m")
    tok = load_tokenizer(hf_dir / "tokenizer.json")
    text = " ".join(d.text for d in load_documents("news-en")[:3])
    ids = torch.tensor([tok.encode(text).ids[: args.tokens]])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ours = load_hf_dir(hf_dir)
    rows = {}
    with torch.no_grad():
        t0 = time.perf_counter()
        want = theirs(ids).logits
        t1 = time.perf_counter()
        got = ours(ids).logits
        t2 = time.perf_counter()
        rows["import"] = {**compare(got, want), "transformers_s": t1 - t0, "moekit_s": t2 - t1}
        with tempfile.TemporaryDirectory() as tmp:
            save_hf_dir(ours, tmp)
            back = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
            rows["export"] = compare(back(ids).logits, got)
        for name, kw in {"copy_8x_top2": dict(num_experts=8, top_k=2),
                         "virtual_group_16x_top4": dict(num_experts=16, top_k=4, method="virtual-group",
                                                        granularity=4)}.items():
            moe = upcycle(ours, **kw).eval()
            rows[name] = compare(moe(ids).logits, got)
            del moe
    print(f"SmolLM2-135M, all {ours.cfg.n_layers} layers, {ids.shape[1]} real tokens (news-en), float32")
    print(f"{'check':26s} {'max |diff|':>11s} {'logit std':>10s} {'argmax =':>9s}")
    for name, r in rows.items():
        print(f"{name:26s} {r['max_abs_diff']:11.2e} {r['logit_std']:10.3f} {r['argmax_agree']:9.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": "python bench/check_smollm2.py", "tokens": ids.shape[1],
                                     "torch": torch.__version__, "transformers": transformers.__version__,
                                     "results": rows}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
