"""moekit finetune: supervised fine-tuning of a model on a task (moekit.finetune).

``moekit finetune SRC --task rotten-tomatoes --out RUN`` is ``moekit train --from SRC`` with
``data.task`` set and the fine-tuning recipe below under the user's ``--config`` and ``--set``:
the same engine, run directory, checkpoints, resume, eval, generate, report and export.
"""

from __future__ import annotations

import copy

# The fine-tuning recipe (the user's --config and --set go on top). Switch Transformer's best
# fine-tuning dropout: 0.1 outside the experts, 0.4 inside them; ST-MoE: keep the aux loss
# (turning it off cost little either way). lr 1e-3 suits moekit's small models (measured on
# rotten-tomatoes from a 4.7M-active news model: 1e-4 stayed at the majority class for 300
# steps, 3e-3 was unstable); a 100M+ pretrained model (SmolLM2) wants ~5e-5.
FINETUNE_DEFAULTS = {
    "data": {"seq_len": 128},
    "model": {"dropout": 0.1, "moe": {"expert_dropout": 0.4}},
    "train": {"max_steps": 300, "lr": 1e-3, "min_lr_ratio": 0.1, "batch_size": 16, "eval_every": 50,
              "eval_batches": 8, "save_every": 100, "log_every": 10, "aux_loss_coef": 0.01},
}


def register(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model on a task (classification or prompt/completion)",
                       allow_abbrev=False,
                       description="Fine-tune SRC (a run, export, Hugging Face directory or catalog model) "
                                   "on a task: the loss is on the completions; classification tasks report "
                                   "validation accuracy while training and test accuracy at the end.")
    p.add_argument("src", nargs="?", help="the model to start from (not with --resume)")
    p.add_argument("--task", help="a catalog task (rotten-tomatoes) or a JSONL file of {prompt, completion} "
                                  "or {text, label} objects (data.task)")
    p.add_argument("--config", help="a TOML recipe on top of the fine-tuning defaults")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set finetune.freeze=esft --set finetune.lora_rank=8")
    p.add_argument("--out", help="the run directory")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the fine-tuning run in RUN_DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--stop-at", type=int, metavar="STEP", help="stop with a checkpoint after STEP")
    p.set_defaults(run=run)


def recipe(config: str | None, sets: list[str], task: str) -> dict:
    """The raw recipe: the fine-tuning defaults, then --config, then --set, then data.task."""
    from moekit.recipe import apply_overrides, load_toml
    raw = copy.deepcopy(FINETUNE_DEFAULTS)
    _merge(raw, load_toml(config) if config else {})
    raw = apply_overrides(raw, sets)
    raw.setdefault("data", {})["task"] = task
    return raw


def _merge(base: dict, top: dict) -> None:
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def run(args) -> int:
    from moekit.train.launch import train_command
    if args.resume:
        if args.src or args.task or args.config:
            raise ValueError("--resume continues a run with its saved config; drop SRC, --task and --config")
        return train_command(sets=args.set, resume=args.resume, progress=not args.no_progress,
                             stop_at=args.stop_at)
    if not args.src:
        raise ValueError("moekit finetune: give SRC, the model to start from (a run, export or Hugging Face "
                         "directory, or smollm2-135m), or --resume RUN_DIR")
    if not args.task:
        raise ValueError("moekit finetune: give --task, a catalog task (rotten-tomatoes) or a JSONL file")
    if not args.out:
        raise ValueError("moekit finetune: give --out, the new run directory")
    return train_command(raw=recipe(args.config, args.set, args.task), out=args.out, init_from=args.src,
                         progress=not args.no_progress, stop_at=args.stop_at)
