"""A staged recipe (EfficientScale) as one command: ``moekit pipeline --config F --out DIR``.

    [data]                          # every stage's data, as in any recipe
    corpus = "parlspeech"
    [train]                         # every stage's training settings; the LR schedule (one warmup,
    lr = 1.5e-3                     # one cosine) runs over all the stages' steps together
    warmup_steps = 150
    [model]                         # stage 1's model (or train.init_from: start from SRC)
    moe = false
    d_model = 128
    ...
    [[stage]]
    name = "small"
    steps = 500
    [[stage]]
    name = "grow"
    grow = { d_model = 256, n_layers = 4, n_heads = 4 }    # moekit.transform.grow's arguments
    steps = 150
    [[stage]]
    name = "moe"
    upcycle = { experts = 8, top_k = 2 }                  # moekit.transform.upcycle's arguments
    steps = 400

Each stage after the first starts from the previous stage's final model, transformed by its
``grow``, ``upcycle`` or ``experts`` (more experts: moekit.transform.grow_experts) table if
it has one, with the previous stage's AdamW state carried through the transformation (mapped
like the weights) and the schedule going on (``train.init_optimizer``,
``train.schedule_start``, ``train.decay_steps`` = all the stages' steps). Each stage's data
order has its own seed (``train.seed`` + the stage's index), so no stage replays another's
batches.

``DIR/stages/<n>-<name>/`` is each stage's run directory (a transformed model first goes to
``DIR/stages/<n>-<name>.model/``). When the last stage ends, ``DIR`` holds the final model as
an export (``model.safetensors``, ``config.json``, ``tokenizer.json``: every command that
reads a model reads it), ``metrics.jsonl`` with every stage's rows on one step axis (each
stage's first row marks its start: ``stage/index``, ``stage/name``) and ``pipeline.json``
(the stages, their steps, boundaries, training FLOPs and final validation losses).

Run the same command again after a kill -9 (or any stop): finished stages are kept, a stage
with a checkpoint resumes from it, a stage or transform that had not saved anything starts
over. The whole recipe is checked before anything trains (each transform is made once on
the first stage's untrained model, so a bad table is one line then, not after an hour).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from moekit.checks import is_int
from moekit.config import RunConfig
from moekit.data.tokenizer import load_tokenizer
from moekit.model.transformer import model_flops
from moekit.moe.config import MoEConfig
from moekit.runtime import write_text_atomic
from moekit.store import run_dir as rd
from moekit.store.checkpoint import Checkpoint, find_checkpoint
from moekit.train.launch import launch, precheck, recipe_config
from moekit.train.optim import grow_optimizer_state
from moekit.transform.grow import grow, grown_optimizer_state
from moekit.transform.grow_experts import grow_experts, last_loads
from moekit.transform.upcycle import SET_BY_UPCYCLE, upcycle, upcycled_optimizer_state

log = logging.getLogger("moekit")

TRANSFORMS = ("grow", "upcycle", "experts")
STAGE_KEYS = ("name", "steps", *TRANSFORMS)
# settings the pipeline sets for each stage itself
OWNED = ("max_steps", "schedule_start", "decay_steps", "init_from", "init_optimizer", "eval_at_start")
DONE = "DONE"      # written last into a transformed model's directory


@dataclass
class Stage:
    index: int                       # 1-based
    name: str
    steps: int
    transform: str | None = None     # "grow" | "upcycle" | "experts" | None
    args: dict = field(default_factory=dict)

    @property
    def dirname(self) -> str:
        return f"{self.index}-{self.name}"


def parse_stages(raw: dict, where: str = "the pipeline") -> list[Stage]:
    """The ``[[stage]]`` tables of ``raw`` as :class:`Stage` s; one line for each bad table."""
    tables = raw.get("stage")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise ValueError(f"{where}: no [[stage]] tables; give at least one, e.g. [[stage]] steps = 500")
    stages, names = [], set()
    for i, table in enumerate(tables, 1):
        at = f"{where}: stage {i}"
        unknown = [k for k in table if k not in STAGE_KEYS]
        if unknown:
            raise ValueError(f"{at}: {unknown[0]!r} is not a stage field; use {', '.join(STAGE_KEYS)}")
        name = table.get("name", f"stage{i}")
        if not isinstance(name, str) or not name or not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"{at}: name={name!r} must be letters, digits, - or _; e.g. name = \"grow\"")
        if name in names:
            raise ValueError(f"{at}: name={name!r} is used by an earlier stage; give each stage its own name")
        names.add(name)
        steps = table.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"{at} ({name}): steps={steps!r} must be an integer >= 1; e.g. steps = 500")
        given = [k for k in TRANSFORMS if k in table]
        if len(given) > 1:
            raise ValueError(f"{at} ({name}): {' and '.join(given)} in one stage; one transformation per "
                             "stage (add a stage for the other)")
        transform = given[0] if given else None
        args = table.get(transform, {}) if transform else {}
        if transform == "experts":
            args = {"num_experts": args} if not isinstance(args, dict) else args
        if not isinstance(args, dict):
            raise ValueError(f"{at} ({name}): {transform} = {args!r} must be a table, e.g. "
                             f"{transform} = {{ {_example(transform)} }}")
        if transform == "upcycle":
            if "experts" in args and "num_experts" in args:
                raise ValueError(f"{at} ({name}): upcycle has both experts and num_experts; give experts")
            args = {("num_experts" if k == "experts" else k): v for k, v in args.items()}
        if transform is not None:
            _check_arg_names(transform, args, f"{at} ({name}): {transform}")
        if i == 1 and transform is not None and not raw.get("train", {}).get("init_from"):
            raise ValueError(f"{at} ({name}): {transform} at the first stage needs a model to transform; "
                             "set train.init_from (a run, export or catalog model), or move it to a later "
                             "stage")
        stages.append(Stage(i, name, steps, transform, args))
    return stages


def _example(transform: str) -> str:
    return {"grow": "d_model = 256, n_layers = 4", "upcycle": "experts = 8, top_k = 2",
            "experts": "num_experts = 16"}[transform]


def _function(transform: str):
    return {"grow": grow, "upcycle": upcycle, "experts": grow_experts}[transform]


def _check_arg_names(transform: str, args: dict, at: str) -> None:
    params = inspect.signature(_function(transform)).parameters
    allowed = [n for n in params if n not in ("model", "_moments", "moe_options", "loads")]
    if transform == "upcycle":           # its own arguments and the MoE's router options
        allowed = ["experts" if n == "num_experts" else n for n in allowed]
        allowed += [f.name for f in dataclasses.fields(MoEConfig) if f.name not in SET_BY_UPCYCLE]
    for key in args:
        shown = "experts" if transform == "upcycle" and key == "num_experts" else key
        if shown not in allowed:
            raise ValueError(f"{at}: {key!r} is not one of its arguments ({', '.join(allowed)})")
    if transform == "upcycle" and ("num_experts" not in args or "top_k" not in args):
        raise ValueError(f"{at}: needs experts and top_k, e.g. upcycle = {{ experts = 8, top_k = 2 }}")
    if transform == "experts" and "num_experts" not in args:
        raise ValueError(f"{at}: needs num_experts, e.g. experts = 16")


def apply(stage: Stage, model, optim: dict | None, loads: dict | None = None):
    """(``model`` transformed by ``stage``, its AdamW state carried; None when ``optim`` is);
    ``loads``: the experts' last loads, for ``experts = { which = "most_loaded" }``."""
    args = dict(stage.args)
    try:
        if stage.transform == "grow":
            return grow(model, **args), None if optim is None else grown_optimizer_state(optim, model, **args)
        if stage.transform == "upcycle":
            n, k = args.pop("num_experts"), args.pop("top_k")
            new = upcycle(model, n, k, **args)
            return new, None if optim is None else upcycled_optimizer_state(optim, model, n, k, **args)
        if stage.transform == "experts":
            if args.get("which") == "most_loaded" and loads is not None:
                args["loads"] = loads
            new, mapping = grow_experts(model, **args)
            return new, None if optim is None else grow_optimizer_state(optim, model, new, mapping)
    except TypeError as err:             # a wrong value type inside the transform
        raise ValueError(f"stage {stage.index} ({stage.name}): {stage.transform}: {err}") from None
    return model, optim


def _check(stages: list[Stage], cfg: RunConfig) -> None:
    """Every transformation made once on an untrained model of the recipe's first stage (or
    SRC): a bad size or option is one line before anything trains."""
    import torch
    if cfg.train.init_from is not None:
        model, _, _ = rd.load_run(Path(cfg.train.init_from))
    else:
        with torch.random.fork_rng():
            model = rd.build_model(dataclasses.replace(cfg.model, vocab_size=cfg.data.vocab_size))
    for stage in stages:
        if stage.transform is None:
            continue
        loads = None               # an untrained model's: even (the real ones come from the run's log)
        if stage.transform == "experts" and model.cfg.moe is not None:
            loads = {i: [1.0] * model.cfg.moe.num_experts for i in model.moe_layers()}
        try:
            model, _ = apply(stage, model, None, loads)
        except ValueError as err:
            text = str(err)
            prefix = f"stage {stage.index} ({stage.name})"
            raise ValueError(text if text.startswith(prefix) else f"{prefix}: {text}") from None


def _base(raw: dict) -> dict:
    """The recipe without its stages, checked: the pipeline sets OWNED itself."""
    base = {k: v for k, v in raw.items() if k != "stage"}
    train = base.get("train", {})
    for key in OWNED:
        if key in train and key != "init_from":      # the recipe's source is stage 1's
            raise ValueError(f"train.{key} is set by the pipeline for each stage (from the stages' steps); "
                             "drop it from the recipe (and --set)")
    return base


def stage_raw(base: dict, stages: list[Stage], stage: Stage, source: Path | None) -> dict:
    """The recipe one stage trains with."""
    raw = json.loads(json.dumps(base))
    train = raw.setdefault("train", {})
    total = sum(s.steps for s in stages)
    start = sum(s.steps for s in stages[:stage.index - 1])
    train.update(max_steps=stage.steps, schedule_start=start, decay_steps=total, eval_at_start=True)
    seed = train.get("seed", 0)
    if is_int(seed):                     # else TrainConfig says what is wrong with it
        train["seed"] = seed + stage.index - 1
    train.setdefault("warmup_steps", total // 5)
    if source is not None:
        train["init_from"] = str(source)
        train["init_optimizer"] = stage.index > 1 and rd.has_optimizer_state(source)   # not a LoRA run's
        raw.pop("model", None)           # the architecture is the source's
    return raw


def run_pipeline(raw: dict, out: Path, progress: bool = True) -> dict:
    """Run (or continue) the staged recipe ``raw`` in ``out``; returns pipeline.json's content."""
    stages = parse_stages(raw)
    base = _base(raw)
    first, model_section = recipe_config(raw=stage_raw(base, stages, stages[0], None))
    _check(stages, first)
    out = Path(out)
    _check_out(out, raw)
    if not _started(out):              # stage 1's corpus and source, before anything is written
        precheck(first, model_section=model_section)
    rd.create(out / "stages", "--out")
    write_text_atomic(out / "recipe.json", json.dumps(raw, indent=1))
    prev: Path | None = Path(first.train.init_from) if first.train.init_from else None
    for stage in stages:
        run_dir = out / "stages" / stage.dirname
        if not _finished(run_dir, stage):
            source = prev
            if stage.transform is not None:
                source = _transformed(stage, prev, out / "stages" / f"{stage.dirname}.model")
            _train(base, stages, stage, source, run_dir, progress)
        prev = run_dir
    return _finish(out, stages)


def _started(out: Path) -> bool:
    """Whether a stage of the pipeline in ``out`` has begun (a run directory or a transform)."""
    return (out / "stages").is_dir() and any((out / "stages").iterdir())


def _check_out(out: Path, raw: dict) -> None:
    """A new pipeline goes into a new (or empty) directory; an existing one continues only
    with the recipe it started with (before any stage began, another recipe may replace it)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; give a directory for the pipeline")
    if not out.exists() or not any(out.iterdir()):
        return
    saved = out / "recipe.json"
    if not saved.exists():
        raise ValueError(f"--out {str(out)!r} holds files but no pipeline; choose a new directory")
    if _started(out) and json.loads(saved.read_text()) != json.loads(json.dumps(raw)):
        raise ValueError(f"--out {str(out)!r} holds a pipeline of another recipe (its recipe.json); "
                         "continue it with that recipe, or choose a new directory")


def _finished(run_dir: Path, stage: Stage) -> bool:
    """The stage ran all its steps: its summary says so, or its checkpoint (a stop between the
    last save and the summary)."""
    path = run_dir / "summary.json"
    if path.exists() and json.loads(path.read_text()).get("steps") == stage.steps:
        return True
    return find_checkpoint(run_dir) is not None and Checkpoint(run_dir).meta["step"] >= stage.steps


def _transformed(stage: Stage, prev: Path, target: Path) -> Path:
    """``prev``'s final model transformed by ``stage`` into ``target`` (made again unless a
    DONE marker says it was finished)."""
    if (target / DONE).exists():
        return target
    if target.exists():
        shutil.rmtree(target)            # a transform killed mid-write: made again
    model, tok, cfg = rd.load_run(prev)
    optim = rd.load_optimizer_state(prev, model)
    loads = last_loads(prev) if stage.args.get("which") == "most_loaded" else None
    new, carried = apply(stage, model, optim, loads)
    rd.save_export(new, tok, cfg, target, optim=carried)
    (target / DONE).write_text("")
    log.info("stage %d (%s): %s of %s -> %s%s", stage.index, stage.name, stage.transform, prev, target,
             ", AdamW state carried" if carried else "")
    return target


def _train(base: dict, stages: list[Stage], stage: Stage, source: Path | None, run_dir: Path,
           progress: bool) -> None:
    if find_checkpoint(run_dir) is not None:
        log.info("stage %d (%s): resuming %s", stage.index, stage.name, run_dir)
        launch(RunConfig(), run_dir, resume=True, progress=progress)
        return
    if run_dir.exists():
        shutil.rmtree(run_dir)           # stopped before its first checkpoint: nothing to keep
    cfg, model_section = recipe_config(raw=stage_raw(base, stages, stage, source))
    log.info("stage %d (%s): %d steps from %s", stage.index, stage.name, stage.steps,
             source or "a new model")
    launch(cfg, run_dir, progress=progress, model_section=model_section)


def _finish(out: Path, stages: list[Stage]) -> dict:
    """The final model as an export in ``out``, every stage's metrics on one step axis, and
    pipeline.json."""
    rows, info, offset, flops = [], [], 0, 0.0
    for stage in stages:
        run_dir = out / "stages" / stage.dirname
        cfg = json.loads((run_dir / "config.json").read_text())
        text = (run_dir / "metrics.jsonl").read_text()
        stage_rows = [json.loads(x) for x in text.splitlines() if x.strip()]
        vocab = load_tokenizer(run_dir / "tokenizer.json").get_vocab_size()
        model_cfg = rd.model_config_for(RunConfig.from_dict(cfg), vocab)    # the tokenizer's vocabulary
        per_step = (model_flops(model_cfg, cfg["data"]["seq_len"])["flops_per_token"]
                    * cfg["train"]["batch_size"] * cfg["data"]["seq_len"] * cfg["train"]["grad_accum"])
        for j, r in enumerate(stage_rows):
            row = {**r, "step": r["step"] + offset}
            if j == 0:
                row.update({"stage/index": stage.index, "stage/name": stage.name})
            rows.append(row)
        vals = [r["loss/val"] for r in stage_rows if "loss/val" in r]
        info.append({"index": stage.index, "name": stage.name, "transform": stage.transform,
                     "args": stage.args, "steps": stage.steps, "first_step": offset,
                     "flops": per_step * stage.steps, "flops_before": flops,
                     "val_start": vals[0] if vals else None, "val_final": vals[-1] if vals else None,
                     "run_dir": str(run_dir)})
        offset += stage.steps
        flops += per_step * stage.steps
    last = out / "stages" / stages[-1].dirname
    model, tok, cfg = rd.load_run(last)
    rd.save_export(model, tok, cfg, out)
    write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    result = {"stages": info, "steps": offset, "flops": flops, "final_val": info[-1]["val_final"],
              "final_model": str(out)}
    write_text_atomic(out / "pipeline.json", json.dumps(result, indent=1))
    return result
