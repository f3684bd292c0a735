"""``moekit compress``: a smaller model from a trained one (distill, merge, prune, quantize).

    compress(CompressRequest(src="runs/moe", out="runs/moe-q8", method="quantize", bits=8))

SRC is only read. merge, prune and quantize are functions of moekit.transform on the loaded
model, written as an export directory through moekit.store (staged beside OUT and moved into
place whole); ``distill`` and ``--recover-steps`` are runs of the one engine entry
(:func:`moekit.train.launch.train_command`), the first with the distillation objective. An
export made from a run carries the run's token cache (data/), so eval and report see the same
validation windows as the source.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moekit.config import RunConfig
from moekit.data.catalog import load_documents
from moekit.data.tokenizer import eos_id
from moekit.model.transformer import count_params
from moekit.recipe import apply_overrides
from moekit.store.checkpoint import find_checkpoint
from moekit.store.run_dir import check_export_target, check_fresh, create, load_run, save_export
from moekit.train.launch import train_command
from moekit.train.splits import has_cache, open_split
from moekit.transform.calibrate import check_target
from moekit.transform.merge import merge_experts
from moekit.transform.prune import prune_experts
from moekit.transform.quantize import quantize_model, quantized_bytes

# MoEConfig's fields of a dynamic number of experts per token (docs/dynamic_routing.md)
DYNAMIC_FIELDS = ("dynamic_k", "top_p", "min_k", "max_k", "num_null_experts", "relu_l1", "target_k",
                  "budget_rate")


@dataclass
class CompressRequest:
    """What ``moekit compress`` was asked (its flags; checked by the command)."""

    src: str
    out: str
    method: str                         # distill, merge, prune, quantize
    experts: int | None = None          # merge / prune: experts per MoE layer to keep
    prune_by: str = "reconstruction"    # prune: usage or reconstruction (NAEE)
    similarity: str = "expert-output"   # merge: expert-output (HC-SMoE) or router-logits
    router: str = "mean"                # merge: mean or dominant router row
    align: bool = True                  # merge: align hidden units before averaging
    bits: int | None = None             # quantize: 8 or 4
    group_size: int = 64
    attention: bool = False             # quantize the attention projections too
    calib: str | None = None            # calibration text (default: SRC's training windows)
    calib_tokens: int = 16384
    recover_steps: int = 0              # merge / prune: train this many steps afterwards
    temperature: float = 1.0            # distill
    alpha: float = 0.5                  # distill
    sets: list[str] = field(default_factory=list)   # distill / recovery: the student's recipe
    seed: int = 0
    progress: bool = True


def compress(req: CompressRequest) -> int:
    """Read ``req.src`` (never modified) and write the smaller model to ``req.out``: an export
    (merge, prune, quantize) or a run (distill, ``recover_steps``); prints what was done."""
    src, out = Path(req.src), Path(req.out)
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise ValueError(f"--out {str(out)!r} is the source itself; writing there would overwrite it: "
                         "choose another --out")
    if req.method == "distill" or req.recover_steps:
        check_fresh(out)
    else:
        check_export_target(out, "compress --out", src=src)
    if req.method == "distill":
        return _distill(req, src, out)
    model, tok, cfg = load_run(src)
    if req.recover_steps:               # a bad --set is found before the work, not after it
        RunConfig.from_dict(_recover_raw(req, cfg))
    small, info = _transform(req, model, tok, cfg, src)
    if req.recover_steps:
        _recover(req, small, tok, cfg, out, info)
    else:
        _write(small, tok, cfg, src, out, info)
    _report(info, out)
    return 0


def _check_float(req, model, src: Path) -> None:
    """What compress cannot do to this model, in the command's own terms (the transformations
    say it in Python's: dequantize_model(model), attention=True)."""
    quant = model.cfg.quant
    if quant is not None:
        came_from = _quantized_from(src)
        raise ValueError(f"compress {src}: the model is already quantized ({quant['bits']}-bit); "
                         f"{req.method} the full-precision model{came_from} instead"
                         + (", then quantize the result" if req.method != "quantize" else ""))
    if req.method == "quantize" and model.cfg.moe is None and not req.attention:
        raise ValueError(f"compress --method quantize: {src} is a dense model, with no experts to quantize; "
                         "add --attention to quantize its attention projections")


def _quantized_from(src: Path) -> str:
    try:
        return f" it came from ({json.loads((src / 'compress.json').read_text())['source']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _transform(req, model, tok, cfg, src: Path):
    """(the compressed model, what was done) for merge, prune and quantize."""
    info = {"method": req.method, "source": str(src), "params": {"source": count_params(model)}}
    _check_float(req, model, src)
    if req.method == "quantize":
        small = quantize_model(model, req.bits, req.group_size, req.attention)
        info.update(bits=req.bits, group_size=req.group_size, attention=req.attention,
                    bytes={"source": quantized_bytes(model), "compressed": quantized_bytes(small)})
    else:
        check_target(model, req.experts, f"{req.method}_experts")   # before the calibration text is read
        batches = calibration(req, model, tok, cfg, src)
        if req.method == "prune":
            small, kept = prune_experts(model, batches, req.experts, method=req.prune_by)
            info.update(prune_by=req.prune_by, kept={str(i): k for i, k in kept.items()})
        else:
            small, groups = merge_experts(model, batches, req.experts, similarity=req.similarity,
                                          align=req.align, router=req.router)
            info.update(similarity=req.similarity, router=req.router, align=req.align,
                        groups={str(i): g for i, g in groups.items()})
        info.update(experts={"source": model.cfg.moe.num_experts, "compressed": req.experts},
                    calib_tokens=sum(b.numel() for b in batches))
    # quantized weights are buffers, not parameters: the same count, fewer bytes
    quantized = req.method == "quantize"
    info["params"]["compressed"] = info["params"]["source"] if quantized else count_params(small)
    return small, info


def calibration(req, model, tok, cfg, src: Path) -> list:
    """Calibration batches [B, S] of ``--calib-tokens`` tokens: SRC's own training windows by
    default (never its validation windows, which eval reports on; a task's training examples,
    padded), else the text of --calib (or SRC's corpus), tokenized with SRC's tokenizer and cut
    into windows; seeded."""
    S = min(cfg.data.seq_len, model.cfg.max_seq_len)
    n_windows = max(1, -(-req.calib_tokens // S))
    g = torch.Generator().manual_seed(req.seed)
    if req.calib is None and has_cache(src):
        train = open_split(cfg, src, "train")
        idx = torch.randperm(len(train), generator=g)[:n_windows].tolist()
        windows = train.batch(idx)[0]
    else:
        windows = _text_windows(req.calib or cfg.data.corpus, cfg.data.text_column, tok, S, n_windows, g)
    return list(windows.split(8))


def _text_windows(source, text_column: str, tok, S: int, n: int, g):
    docs = load_documents(source, text_column)
    order = torch.randperm(len(docs), generator=g).tolist()
    eos, ids = eos_id(tok, required=False), []
    for i in order:
        ids += tok.encode(docs[i].text).ids + ([eos] if eos is not None else [])
        if len(ids) >= n * S:
            break
    if len(ids) < S:
        raise ValueError(f"--calib {str(source)!r} yields {len(ids)} tokens, fewer than one window of {S}; "
                         "give a larger corpus or file")
    usable = len(ids) // S * S
    return torch.tensor(ids[:usable]).view(-1, S)[:n]


def _write(small, tok, cfg, src: Path, out: Path, info: dict) -> None:
    """OUT: the export with SRC's token cache and compress.json, written beside OUT first and
    moved into place whole, so a failure (a full disk) leaves no half-written OUT."""
    out = out.resolve()                     # "." or a link to an earlier export: the real place
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_export(small, tok, cfg, staging)
        if has_cache(src):
            shutil.copytree(src / "data", staging / "data")
        (staging / "compress.json").write_text(json.dumps(info, indent=1))
        _replace(staging, out)
    except (OSError, ValueError) as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, ValueError):     # save_export's one line, about the staging directory
            raise ValueError(str(err).replace(repr(str(staging)), repr(str(out)))) from None
        # shutil.Error (copytree) lists (src, dst, why) per file: the first why says it
        reason = err.strerror or (str(err.req[0][0][-1]).split(": ")[0] if isinstance(err, shutil.Error)
                                  else str(err))
        raise ValueError(f"writing {str(out)!r} failed: {reason}; free space or choose another "
                         "--out") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace(new: Path, out: Path) -> None:
    """Move ``new`` to ``out``; an earlier export there (check_export_target allowed it) is
    moved aside first and removed only once ``new`` is in place, else put back."""
    old = out.parent / f".{out.name}.old" if out.exists() else None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    try:
        new.rename(out)
    except OSError:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _recover_raw(req, cfg) -> dict:
    """The recovery run's recipe: SRC's data, a short schedule at a tenth of SRC's LR, --set."""
    raw = {"data": dataclasses.asdict(cfg.data),
           "train": {"max_steps": req.recover_steps, "lr": cfg.train.lr / 10,
                     "batch_size": cfg.train.batch_size, "seed": req.seed}}
    return apply_overrides(raw, req.sets)


def _recover(req, small, tok, cfg, out: Path, info: dict) -> None:
    """OUT: a run trained from the compressed model, which stays in OUT/init (its init_from),
    with compress.json beside it; a resume (moekit train --resume OUT) continues it."""
    made = create(out)
    try:
        save_export(small, tok, cfg, out / "init")
        info = {**info, "recover_steps": req.recover_steps}
        (out / "compress.json").write_text(json.dumps(info, indent=1))
        train_command(raw=_recover_raw(req, cfg), out=out, init_from=str((out / "init").resolve()),
                      progress=req.progress)
    except BaseException:
        if made is not None and find_checkpoint(out) is None:   # nothing to resume: leave nothing
            shutil.rmtree(made, ignore_errors=True)
        raise


def _report(info: dict, out: Path) -> None:
    p = info["params"]
    what = {"quantize": lambda: f"{info['bits']}-bit weights, groups of {info['group_size']}; weight bytes "
                                f"{info['bytes']['source']['total']:,} -> "
                                f"{info['bytes']['compressed']['total']:,}",
            "prune": lambda: f"{info['experts']['compressed']} of {info['experts']['source']} experts per "
                             f"layer "
                             f"(by {info['prune_by']})",
            "merge": lambda: f"{info['experts']['source']} -> {info['experts']['compressed']} experts per "
                             f"layer "
                             f"(by {info['similarity']})"}[info["method"]]()
    print(f"compressed {info['source']} into {out} ({info['method']}: {what}); parameters {p['source']:,} -> "
          f"{p['compressed']:,}")
    print(json.dumps(info))


def _distill(req, src: Path, out: Path) -> int:
    """The student run: the teacher's data and train sections, its dense baseline as the model
    (unless --set model.* says otherwise), and the distill section."""
    teacher, _, cfg = load_run(src)
    base = cfg.to_dict()
    dropped = ("init_from", "expert_schedule", "warmup_steps")
    train = {k: v for k, v in base["train"].items() if k not in dropped}
    if any(item.split("=", 1)[0].strip().startswith("model.moe.") for item in req.sets):
        # an MoE student (e.g. --set model.moe.dynamic_k=top_p): the teacher's architecture, or the
        # recipe's default MoE on a dense teacher's
        arch = dataclasses.replace(cfg, model=teacher.cfg).to_dict()["model"]
        model = {k: v for k, v in arch.items() if k not in ("quant", "dropout")}
        if not isinstance(model.get("moe"), dict):
            model["moe"] = {}
        if any(item.split("=", 1)[0].strip() == "model.moe.dynamic_k" for item in req.sets):
            # another mode for the student: the teacher's mode fields go (TOML cannot unset them;
            # the --set ones are applied below)
            for name in DYNAMIC_FIELDS:
                model["moe"].pop(name, None)
    else:
        student = teacher.cfg.dense_baseline() if teacher.cfg.moe is not None else teacher.cfg
        model = {k: v for k, v in dataclasses.asdict(student).items() if k not in ("quant", "dropout")}
    raw = {"model": model, "data": base["data"], "train": {**train, "seed": req.seed},
           "distill": {"teacher": str(src), "temperature": req.temperature, "alpha": req.alpha}}
    raw = apply_overrides(raw, req.sets)
    del teacher
    return train_command(raw=raw, out=out, progress=req.progress)
