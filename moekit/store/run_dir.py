"""Run directories: what one holds, and the one loader every command that reads a model uses.

A run directory (``moekit train``)::

    config.json      the RunConfig in use (layout included)
    tokenizer.json   the BPE the model reads
    checkpoint.pt    single process: model, optimizer, data position, RNG (or checkpoint/,
                     a sharded torch.distributed.checkpoint directory, from a parallel run)
    metrics.jsonl    one JSON object per logged step;  tensorboard/  the same as event files
    data/            the token cache of the corpus;    summary.json  written at the end

An export directory (``moekit export``) holds ``model.safetensors``, ``config.json`` and
``tokenizer.json``. :func:`load_model` and :func:`load_run` read either. One written by
``moekit upcycle`` or ``moekit grow`` from a run also holds ``optimizer.safetensors``, the
run's AdamW state carried through the transformation (:func:`load_optimizer_state` reads it,
or a run's checkpoint; ``train.init_optimizer`` starts a run with it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from tokenizers import Tokenizer

from moekit.config import RunConfig
from moekit.data.catalog import MODELS
from moekit.data.tokenizer import eos_id, load_tokenizer, save_tokenizer
from moekit.interop.hf import catalog_model_dir, load_hf_dir, read_json, save_hf_dir, to_hf_config
from moekit.model.config import ModelConfig
from moekit.model.transformer import MoETransformer
from moekit.runtime import readable_like_umask, write_text_atomic
from moekit.store.checkpoint import CHECKPOINT, SHARDED, Checkpoint, find_checkpoint
from moekit.transform.lora import add_lora, merge_lora
from moekit.transform.quantize import dequantize_model, quantize_structure

EXPORT_WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"     # AdamW state by parameter name: NAME:step, NAME:exp_avg, ...
# everything a run writes: a directory holding any of these belongs to a run
RUN_FILES = ("config.json", "tokenizer.json", "metrics.jsonl", "summary.json", "tensorboard", "data",
             "report.html", CHECKPOINT, CHECKPOINT + ".tmp", SHARDED, SHARDED + ".tmp", SHARDED + ".old",
             SHARDED + ".trash", EXPORT_WEIGHTS, OPTIMIZER)
# what a kill mid-save leaves behind (checkpoint.old/ is not among them: it may be the newest)
LEFTOVERS = (CHECKPOINT + ".tmp", SHARDED + ".tmp", SHARDED + ".trash")


def _unwritable(run_dir: Path, err: OSError, flag: str = "--out") -> ValueError:
    fix = "choose a writable path" if flag == "--out" else "make it writable (or copy the run elsewhere)"
    return ValueError(f"{flag} {str(run_dir)!r}: cannot write the run directory ({err.strerror or err}); "
                      f"{fix}")


def build_model(mcfg: ModelConfig, device="cpu") -> MoETransformer:
    """The model a directory's weights load into: built on the meta device with its structure
    (a quantized model's quantized modules, ``model.quant``), then allocated once on ``device``
    and initialized (the RoPE tables are computed, not stored), as gpt-fast's loader builds an
    empty shell. The model imports no transformation; the loader applies them."""
    structure = None
    if mcfg.quant is not None:
        def structure(model):
            return quantize_structure(model, mcfg.quant)
    return MoETransformer.build(mcfg, device=device, structure=structure)


def check_fresh(run_dir: Path) -> None:
    """A new run may not go into a directory that holds another run (or its leftovers), nor
    onto a file. Creates nothing."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {str(run_dir)!r} is a file, not a directory; choose another --out")
    if (found := find_checkpoint(run_dir)) is not None:
        raise ValueError(f"{str(run_dir)!r} already holds a run ({found.name}); resume it with "
                         f"--resume {run_dir} or choose another --out")
    if run_dir.is_dir():
        held = [name for name in RUN_FILES if (run_dir / name).exists()]
        if held:
            raise ValueError(f"--out {str(run_dir)!r} holds files of another run ({', '.join(held[:4])}) but "
                             "no checkpoint to resume; remove them or choose another --out")


def create(run_dir: Path, flag: str = "--out") -> Path | None:
    """Make the run directory (and its parents); returns the outermost directory it made (None
    if the run directory existed), which :func:`discard` removes again. An unwritable place
    (under a file, read-only, /proc) is one clear line naming ``flag``, how the user gave it."""
    run_dir = Path(run_dir)
    made = None
    for candidate in (run_dir, *run_dir.parents):
        if candidate.exists():
            break
        made = candidate
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".moekit-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        _remove_empty(run_dir, made)
        raise _unwritable(run_dir, err, flag) from None
    return made


def _remove_empty(run_dir: Path, made: Path | None) -> None:
    """rmdir the run directory and its parents up to ``made`` while they are empty: a directory
    another run has written into meanwhile (a sweep's parent) stays."""
    if made is None:
        return
    for d in (run_dir, *run_dir.parents):
        try:
            d.rmdir()
        except OSError:
            return
        if d == made:
            return


def discard(run_dir: Path, created: Path | None) -> None:
    """Undo a new run's setup that failed: the run files it wrote go, then the directories it
    made if they are empty. Nothing else is touched."""
    run_dir = Path(run_dir)
    for name in RUN_FILES:
        _remove(run_dir / name)
    _remove_empty(run_dir, created)


def _remove(path: Path) -> bool:
    """Delete a file, link or directory tree; whether there was one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        return False
    return True


def remove_leftovers(run_dir: Path) -> list[str]:
    """Temporary checkpoint files a kill or a full disk left behind (they can keep a disk full)."""
    return [name for name in LEFTOVERS if _remove(Path(run_dir) / name)]


def write_json(path: Path, obj) -> None:
    """Atomically: a temporary file, then a rename."""
    write_text_atomic(path, json.dumps(obj, indent=1))


def model_config_for(cfg: RunConfig, vocab_size: int):
    """The model a run builds: the recipe's, with the tokenizer's vocabulary and room for seq_len.
    A run started from weights (train.init_from) keeps their vocabulary, which may be padded
    past the tokenizer's; so does a distilled student (distill.teacher) the teacher's."""
    if cfg.train.init_from is not None or cfg.distill.teacher is not None:
        vocab_size = max(cfg.model.vocab_size, vocab_size)
    return dataclasses.replace(cfg.model, vocab_size=vocab_size,
                               max_seq_len=max(cfg.model.max_seq_len, cfg.data.seq_len))


def load_run(run_dir: Path):
    """(model in eval mode, tokenizer, config) of a run directory (either checkpoint container),
    a ``moekit export`` or a Hugging Face directory, on one process. Weights that are not all
    finite are refused here, before any command reads or writes anything with them."""
    model, tok, cfg = _load_any(_catalog_or_path(run_dir))
    check_finite(model, run_dir)
    return model, tok, cfg


def check_finite(model, source) -> None:
    """One line naming the first tensor of ``source`` holding NaN or inf (moekit's name for it):
    such a model generates garbage, trains to NaN, and would be written out as it is."""
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        tensor = (tensor.to_local() if hasattr(tensor, "to_local") else tensor).detach()   # a rank's shard
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            nan, bad = int(torch.isnan(tensor).sum()), int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{str(source)!r}: weight {name!r} holds {nan} NaN and {bad - nan} infinite "
                             f"values of {tensor.numel():,}; the model is damaged: give an earlier "
                             "checkpoint or export of it")


def _load_any(run_dir: Path):
    if not run_dir.exists():
        raise FileNotFoundError(f"{str(run_dir)!r} does not exist; give a run, export or Hugging Face "
                                f"directory, or a catalog model ({', '.join(sorted(MODELS))})")
    if not run_dir.is_dir():
        raise ValueError(f"{str(run_dir)!r} is a file; give a run, export or Hugging Face directory")
    if find_checkpoint(run_dir) is None and _is_hf_dir(run_dir):
        return _load_hf(run_dir)
    if (run_dir / EXPORT_WEIGHTS).exists() and find_checkpoint(run_dir) is None:
        return _load_export(run_dir)
    ckpt = Checkpoint(run_dir)
    cfg = RunConfig.from_dict(ckpt.meta["config"])
    if "tokenizer" in ckpt.meta:   # the one the model was trained with, whatever tokenizer.json holds now
        tok = Tokenizer.from_str(ckpt.meta["tokenizer"])
    else:
        tok = load_tokenizer(run_dir / "tokenizer.json")
    model = build_model(model_config_for(cfg, tok.get_vocab_size()))
    ft = cfg.finetune
    if ft.lora_rank is not None:            # the checkpoint holds base weights and adapters: merged here
        add_lora(model, ft.lora_rank, ft.lora_alpha, tuple(ft.lora_targets))
    try:
        model.load_state_dict(ckpt.model_state(model.state_dict()))
    except RuntimeError as err:
        raise ValueError(f"the checkpoint in {str(run_dir)!r} does not fit its config and tokenizer "
                         f"({str(err).splitlines()[0][:160]}); restore the run's tokenizer.json") from None
    if ft.lora_rank is not None:
        merge_lora(model)
        model.requires_grad_(True)
        cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(ft, lora_rank=None, lora_also=[]))
    return model.eval(), tok, cfg


def load_model(path: str | Path) -> tuple[MoETransformer, Tokenizer]:
    """The model (eval mode, CPU) and tokenizer of any run or export directory.

    Example:
        >>> model, tok = load_model("runs/tiny-moe-20261201-101500")     # doctest: +SKIP
        >>> model(torch.tensor([tok.encode("Mr Speaker,").ids])).logits.shape   # doctest: +SKIP
    """
    model, tok, _ = load_run(Path(path))
    return model, tok


def export_run(run_dir: Path, out_dir: Path) -> Path:
    """A consolidated single-device copy of a run's model (from either checkpoint container):
    ``model.safetensors``, ``config.json`` and ``tokenizer.json`` in ``out_dir``, which
    :func:`load_run` (so ``moekit generate`` / ``eval``) reads like a run directory."""
    check_export_target(out_dir, src=run_dir)
    model, tok, cfg = load_run(run_dir)
    return save_export(model, tok, cfg, out_dir)


def check_export_target(out_dir: Path, flag: str = "export --out", src=None, hf: bool = False) -> None:
    """An export (or import, upcycle, grow) may go into a new or empty directory, or replace an
    earlier moekit export of the same format; never onto a file, its own source, a run
    directory or another model directory (a Hugging Face download is not ours to overwrite)."""
    out_dir = Path(out_dir)
    same = src is not None and Path(src).exists() and out_dir.exists()
    if same and out_dir.resolve() == Path(src).resolve():
        raise ValueError(f"{flag} {str(out_dir)!r} is the source itself; writing there would overwrite it: "
                         "choose another --out")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{flag} {str(out_dir)!r} is a file, not a directory; choose another --out")
    if not out_dir.is_dir():
        return
    run_data = (out_dir / "data").exists() and not (out_dir / EXPORT_WEIGHTS).exists()   # an export's: eval
    if find_checkpoint(out_dir) is not None or run_data or any((out_dir / n).exists() for n in RUN_ONLY):
        held = [n for n in RUN_FILES if (out_dir / n).exists()]
        raise ValueError(f"{flag} {str(out_dir)!r} holds a run ({', '.join(held[:3])}); writing there "
                         "would overwrite it: choose an empty or new --out")
    model_files = [n for n in ("config.json", EXPORT_WEIGHTS, "model.safetensors.index.json")
                   if (out_dir / n).exists()]
    if model_files and _export_format(out_dir) != ("hf" if hf else "moekit"):
        kind = "Hugging Face export" if hf else "export"
        raise ValueError(f"{flag} {str(out_dir)!r} holds another model ({', '.join(model_files)}), not an "
                         f"earlier moekit {kind}; choose an empty or new --out")


# what only a run directory (not an export) holds
RUN_ONLY = ("metrics.jsonl", "summary.json", "tensorboard")


def _export_format(path: Path) -> str | None:
    """"moekit" (a moekit export), "hf" (a Hugging Face directory moekit exported) or None."""
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(cfg, dict):
        return None
    if "model_type" in cfg:
        return "hf" if cfg.get("exported_by") == "moekit" else None
    return "moekit" if isinstance(cfg.get("model"), dict) else None


def save_export(model: MoETransformer, tok: Tokenizer, cfg: RunConfig, out_dir: Path,
                optim: dict | None = None) -> Path:
    """Write ``model`` as an export directory (the weights under moekit's names, the run config
    with the model's own config, the tokenizer, and ``optim``, AdamW's state by parameter name,
    when given); files are replaced atomically."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    made = create(out_dir)
    # the vocabulary and length the weights have; a saved model has no growth ahead of it
    train = dataclasses.replace(cfg.train, expert_schedule=None)
    cfg = dataclasses.replace(cfg, model=model.cfg, train=train)
    # tied embeddings share storage: safetensors stores each tensor once, so save the
    # untied keys and let the model re-tie on load
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
    tmp = out_dir / (EXPORT_WEIGHTS + ".tmp")
    with _writing(out_dir, tmp, made):
        save_file(state, str(tmp), metadata={"format": "moekit"})
        readable_like_umask(tmp)
        os.replace(tmp, out_dir / EXPORT_WEIGHTS)
        if optim is not None:
            flat = {f"{name}:{k}": torch.as_tensor(v).detach().float().contiguous()
                    for name, entry in optim.items() for k, v in entry.items()}
            save_file(flat, str(tmp), metadata={"format": "moekit-adamw"})
            readable_like_umask(tmp)
            os.replace(tmp, out_dir / OPTIMIZER)
        else:                                    # not another model's state left from before
            (out_dir / OPTIMIZER).unlink(missing_ok=True)
        write_json(out_dir / "config.json", cfg.to_dict())
        save_tokenizer(tok, out_dir / "tokenizer.json")
    return out_dir


def load_optimizer_state(path: Path, model: MoETransformer) -> dict | None:
    """AdamW's state {parameter name: {"step", "exp_avg", "exp_avg_sq"}} of ``model`` (as
    :func:`load_run` read it from ``path``): a run's newest checkpoint's, or an export's
    ``optimizer.safetensors``; None where there is none (an export without it, a Hugging Face
    directory, a catalog model, a LoRA run, whose state is its adapters', not the merged
    weights'). A file that is damaged or not this model's is one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = _catalog_or_path(path)
    params = dict(model.named_parameters())
    if find_checkpoint(path) is not None:
        ckpt = Checkpoint(path)
        if (ckpt.meta["config"].get("finetune") or {}).get("lora_rank") is not None:
            return None
        optim = ckpt.optimizer_state(params)
        where = str(path)
    elif (path / OPTIMIZER).exists():
        where = str(path / OPTIMIZER)
        try:
            flat = load_file(where)
        except (OSError, SafetensorError) as err:
            raise ValueError(f"{where!r} is unreadable ({str(err).splitlines()[0][:120]}); make it again "
                             f"with moekit upcycle or grow, or start without it ({_WITHOUT})") from None
        optim = {}
        for key, value in flat.items():
            name, _, part = key.rpartition(":")
            optim.setdefault(name, {})[part] = value
    else:
        return None
    if optim is None:
        return None
    for name, entry in optim.items():
        p = params.get(name)
        if p is None or set(entry) != {"step", "exp_avg", "exp_avg_sq"} or any(
                tuple(entry[k].shape) != tuple(p.shape) for k in ("exp_avg", "exp_avg_sq")):
            raise ValueError(f"{where!r}: the optimizer state of {name!r} does not fit the model's "
                             f"parameters; make it again from this model, or start without it ({_WITHOUT})")
        step, m, v = (torch.as_tensor(entry[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
        bad = ("a step count below 0" if float(step) < 0 else "non-finite moments"
               if not (bool(torch.isfinite(m).all()) and bool(torch.isfinite(v).all()))
               else "a negative second moment" if bool((v < 0).any()) else None)
        if bad:
            raise ValueError(f"{where!r}: the optimizer state of {name!r} has {bad}; it is damaged: make it "
                             f"again, or start without it ({_WITHOUT})")
    return optim


_WITHOUT = "--no-optimizer for upcycle / grow, no train.init_optimizer for train"


def has_optimizer_state(path: Path) -> bool:
    """Whether :func:`load_optimizer_state` finds state at ``path`` (without reading it): an
    export with ``optimizer.safetensors``, or a run (not LoRA) with a checkpoint."""
    path = Path(path)
    if (path / OPTIMIZER).exists():
        return True
    if find_checkpoint(path) is None:
        return False
    ckpt = Checkpoint(path)
    return not ckpt.legacy and (ckpt.meta["config"].get("finetune") or {}).get("lora_rank") is None


@contextmanager
def _writing(out_dir: Path, tmp: Path | None = None, made: Path | None = None):
    """A failed write into an output directory (a full disk) is one line; ``tmp`` goes, and so
    does ``made``, the directory this write created."""
    from safetensors import SafetensorError
    try:
        yield
    except (OSError, SafetensorError) as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        reason = getattr(err, "strerror", None) or str(err).split(": ")[-1]
        raise ValueError(f"writing {str(out_dir)!r} failed: {reason}; free space or "
                         "choose another --out") from None


def _load_export(out_dir: Path):
    from safetensors.torch import load_file
    try:
        cfg = RunConfig.from_dict(json.loads((out_dir / "config.json").read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(out_dir / 'config.json')!r} is missing or not JSON ({type(err).__name__}); "
                         "export the run again") from None
    tok = load_tokenizer(out_dir / "tokenizer.json")
    try:
        state = load_file(str(out_dir / EXPORT_WEIGHTS))
        _check_fits(tok, state["embed.weight"].shape[0], out_dir)
        # the weights' vocabulary (an imported model's may be padded past its tokenizer's)
        model = build_model(model_config_for(cfg, state["embed.weight"].shape[0]))
        if cfg.model.tie_embeddings:
            state["lm_head.weight"] = state["embed.weight"]
        model.load_state_dict(state)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors' and load_state_dict's errors mean the same here
        raise ValueError(f"{str(out_dir / EXPORT_WEIGHTS)!r} is corrupt or not this model's "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
                         "export the run again") from None
    return model.eval(), tok, cfg


def _catalog_or_path(path) -> Path:
    """A catalog model name (``smollm2-135m``) is its cached Hugging Face directory."""
    if not Path(path).exists() and str(path) in MODELS:
        return catalog_model_dir(str(path))
    return Path(path)


def _is_hf_dir(path: Path) -> bool:
    """A Hugging Face model directory: its config.json names a model_type (moekit's has sections).
    A config.json that is not JSON is one line saying so (not a later "export again")."""
    if not (path / "config.json").is_file():
        return False
    cfg = read_json(path / "config.json")
    return isinstance(cfg, dict) and "model_type" in cfg


def _load_hf(path: Path):
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} has no tokenizer.json (moekit reads the fast-tokenizer "
                                "file); save it there with transformers: AutoTokenizer.from_pretrained(...)"
                                ".save_pretrained(DIR)")
    model = load_hf_dir(path)
    tok = load_tokenizer(path / "tokenizer.json")
    _check_fits(tok, model.cfg.vocab_size, path)
    return model, tok, RunConfig(model=model.cfg)


def _check_fits(tok: Tokenizer, vocab_size: int, path: Path) -> None:
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"{str(path / 'tokenizer.json')!r} has {tok.get_vocab_size()} tokens but the "
                         f"model's vocabulary is {vocab_size}; give the model's own tokenizer")


def export_hf(run_dir: Path, out_dir: Path) -> Path:
    """A run (or export, or Hugging Face directory) as a Hugging Face directory that
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads, with the tokenizer."""
    check_export_target(out_dir, "export --format hf --out", src=run_dir, hf=True)
    model, tok, _ = load_run(run_dir)
    if model.cfg.quant is not None:     # Hugging Face has no layout for these: the float weights
        model = dequantize_model(model)
    to_hf_config(model.cfg, model.state_dict())   # refusals before anything is written
    create(out_dir)
    with _writing(out_dir):
        save_hf_dir(model, out_dir)
        save_tokenizer(tok, Path(out_dir) / "tokenizer.json")
        _hf_tokenizer_files(tok, model.cfg.max_seq_len, Path(out_dir))
        _mark_hf_export(Path(out_dir))
    return Path(out_dir)


def _hf_tokenizer_files(tok: Tokenizer, max_len: int, out_dir: Path) -> None:
    """tokenizer_config.json (so ``AutoTokenizer`` reads tokenizer.json) and the end-of-text
    token in config.json and generation_config.json (so ``generate`` stops there)."""
    eos = eos_id(tok, required=False)
    special = {} if eos is None else {"eos_token": tok.id_to_token(eos), "bos_token": tok.id_to_token(eos)}
    write_json(out_dir / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                                    "model_max_length": max_len,
                                                    "clean_up_tokenization_spaces": False, **special})
    if eos is None:
        return
    for name in ("config.json", "generation_config.json"):
        path = out_dir / name
        cfg = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        write_json(path, {**cfg, "eos_token_id": eos, "bos_token_id": eos})


def _mark_hf_export(out_dir: Path) -> None:
    """config.json says moekit wrote it, so a later export may replace it (and nothing else)."""
    path = out_dir / "config.json"
    write_json(path, {**json.loads(path.read_text(encoding="utf-8")), "exported_by": "moekit"})


def import_hf(src: Path, out_dir: Path) -> Path:
    """A Hugging Face model directory as a moekit export directory (moekit's weight names, a run
    config, the model's own tokenizer), which every command that reads a model reads."""
    check_export_target(out_dir, "import --out", src=src)
    src = _catalog_or_path(src)
    if not Path(src).is_dir():
        raise FileNotFoundError(f"import: {str(src)!r} is not a directory; give a Hugging Face model "
                                "directory (config.json, model.safetensors, tokenizer.json)")
    if not _is_hf_dir(Path(src)):
        raise ValueError(f"import: {str(src / 'config.json')!r} is missing or names no model_type; "
                         "give a Hugging Face model directory")
    model, tok, cfg = _load_hf(Path(src))
    check_finite(model, src)
    return save_export(model, tok, cfg, out_dir)
