"""``moekit train --from SRC``: a new run that starts from another model's weights.

SRC is anything :func:`moekit.store.run_dir.load_run` reads: a run directory, an export, a
Hugging Face directory or a catalog model (``smollm2-135m``). The run takes SRC's
architecture, weights and tokenizer (the corpus is tokenized with it) and starts at step 0
with a fresh optimizer and schedule (``train.init_optimizer``: with SRC's AdamW state, a run's
or the one ``moekit upcycle`` / ``grow`` carried; ``train.schedule_start``: the LR schedule
going on); the recipe's train and data sections apply. The recipe
may not contradict SRC's architecture: a model field it sets to another value than SRC's is
one error line. Settings that change no weight (:data:`RUNTIME_FIELDS`) may differ.

``train.init_from`` records SRC in config.json; a resume reads the run's own checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from moekit.config import RunConfig
from moekit.data.catalog import MODELS
from moekit.model.config import ModelConfig
from moekit.store.run_dir import OPTIMIZER, load_optimizer_state, load_run

# model fields a run may set differently from SRC: they size buffers, steer routing or set
# training-only dropout (fine-tuning), but hold no weights
RUNTIME_FIELDS = ("max_seq_len", "dropout", "moe.backend", "moe.aux_loss_scope", "moe.bias_update_rate",
                  "moe.capacity_factor", "moe.drop_policy", "moe.expert_dropout", "moe.jitter_eps")


@dataclass
class Initial:
    """What a run started with ``--from`` begins with."""

    state: dict[str, Tensor] | None  # SRC's weights, moekit names (float32, CPU); None: fresh weights
    tokenizer: object
    partial: bool = False            # state holds some of the tensors (a federated round's); the rest
                                     # keep the seed's weights (a new run) or the checkpoint's (a resume)
    optim: dict | None = None        # SRC's AdamW state by parameter name (train.init_optimizer)


def load_source(cfg: RunConfig, model_section: dict | None = None) -> tuple[RunConfig, Initial]:
    """(the run's config with SRC's architecture, SRC's weights and tokenizer) for
    ``cfg.train.init_from``. ``model_section``: the model fields the recipe (and --set) gave,
    checked against SRC; None = compare ``cfg.model`` itself, unless it is the default."""
    src = cfg.train.init_from
    if not Path(src).exists():
        if src not in MODELS:
            raise FileNotFoundError(f"train.init_from (--from) {src!r}: no such directory or catalog "
                                    "model; give a run, export or Hugging Face directory, or one of "
                                    f"{sorted(MODELS)}")
    model, tok, _ = load_run(Path(src))
    theirs = model.cfg
    given = _flat(dataclasses.asdict(cfg.model)) if model_section is None else _flat(model_section)
    if model_section is None and cfg.model == ModelConfig():
        given = {}
    clashes = _contradictions(given, theirs)
    if len(clashes) == 1:
        key, value, have = clashes[0]
        raise ValueError(f"model.{key}={value!r} contradicts --from {src} ({key}={have!r}); drop it from "
                         "the recipe: a run started from weights takes their architecture")
    if clashes:
        listed = ", ".join(f"{k}={v!r} (theirs {h!r})" for k, v, h in clashes[:4])
        more = f" and {len(clashes) - 4} more" if len(clashes) > 4 else ""
        raise ValueError(f"{len(clashes)} model fields contradict --from {src}: {listed}{more}; remove the "
                         "recipe's [model] section: a run started from weights takes their architecture")
    runtime = {"dropout": 0.0, **({"moe.expert_dropout": 0.0} if theirs.moe is not None else {}),
               **{k: given[k] for k in RUNTIME_FIELDS if k in given}}   # SRC's dropout is not inherited
    model_cfg = _with_runtime(theirs, runtime, cfg.data.seq_len)
    if model_cfg.quant is not None and model_cfg.moe is not None and model_cfg.moe.expert_dropout > 0:
        raise ValueError(f"model.moe.expert_dropout={model_cfg.moe.expert_dropout}: the experts of {src} are "
                         f"quantized ({model_cfg.quant['bits']}-bit constants that only infer); set "
                         "--set model.moe.expert_dropout=0 (the rest of the model trains), or start from "
                         "the full-precision model")
    optim = None
    if cfg.train.init_optimizer:
        optim = load_optimizer_state(Path(src), model)
        if optim is None:
            hint = (" (a moekit pipeline directory: give its last stage, DIR/stages/<n>-<name>)"
                    if (Path(src) / "pipeline.json").exists() else "")
            raise ValueError(f"train.init_optimizer=true, but --from {src} holds no AdamW state (a run's "
                             f"checkpoint or an {OPTIMIZER} from moekit upcycle / grow of a run){hint}; drop "
                             "train.init_optimizer to start a fresh optimizer")
    return dataclasses.replace(cfg, model=model_cfg), Initial(state=model.state_dict(), tokenizer=tok,
                                                              optim=optim)


def _contradictions(given: dict, theirs: ModelConfig) -> list[tuple[str, object, object]]:
    """(field, the recipe's value, SRC's) for each model field the recipe sets otherwise than SRC,
    comparing what the values mean (moe_layers as layer ids, n_kv_heads None as n_heads)."""
    mine = _flat(dataclasses.asdict(theirs))
    out = []
    for key, value in given.items():
        if key in RUNTIME_FIELDS or key in ("vocab_size", "moe.d_model"):
            continue
        if key == "moe":                     # moe = false: a dense model
            if value not in (None, False) or theirs.moe is not None:
                out.append((key, value, "an MoE model" if theirs.moe is not None else None))
            continue
        if key not in mine and not (key.startswith("moe.") and theirs.moe is None):
            continue
        have = mine.get(key, "(dense: no moe section)")
        if key == "moe_layers" and theirs.moe is not None:
            try:
                same = dataclasses.replace(theirs, moe_layers=value).moe_layer_ids() == theirs.moe_layer_ids()
            except ValueError:
                same = False
        elif key in ("n_kv_heads", "head_dim"):
            default = theirs.n_heads if key == "n_kv_heads" else theirs.d_model // theirs.n_heads
            same = _norm(default if value is None else value) == _norm(default if have is None else have)
        else:
            same = _norm(value) == _norm(have)
        if not same:
            out.append((key, value, have))
    return out


def _with_runtime(model_cfg: ModelConfig, runtime: dict, seq_len: int) -> ModelConfig:
    top = {k: v for k, v in runtime.items() if "." not in k}
    moe = {k.split(".", 1)[1]: v for k, v in runtime.items() if k.startswith("moe.")}
    if moe and model_cfg.moe is not None:
        top["moe"] = dataclasses.replace(model_cfg.moe, **moe)
    top["max_seq_len"] = max(top.get("max_seq_len", model_cfg.max_seq_len), seq_len)
    return dataclasses.replace(model_cfg, **top)


def _flat(section, prefix: str = "") -> dict:
    out = {}
    for key, value in (section or {}).items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _norm(value):
    """Equal values that TOML and dataclasses spell differently: dtypes, tuples, ints as floats."""
    text = str(value).replace("torch.", "")
    if isinstance(value, bool) or value is None:
        return text
    if isinstance(value, (int, float)):
        return float(value)
    return text
