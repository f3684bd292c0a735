"""Recipes: TOML files and ``--set key=value`` overrides -> a checked RunConfig.

    raw = load_toml("configs/tiny-moe.toml")                 # nested dict
    raw = apply_overrides(raw, ["train.max_steps=200"])      # values parsed as TOML
    cfg = build(RunConfig, raw)                              # typed and checked

A section left out takes its defaults; an MoE section given in part takes the recipe's
default MoE (``default_moe``) for the rest. Keys written by older moekit versions are
translated (``router_dtype``, which had one legal value; ``moe_layers = "none"``, now
``moe = false``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found; give an existing .toml "
                                "(see configs/)")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"config file {str(path)!r} is not valid TOML: {err}; fix the syntax") from None


def parse_set(item: str) -> tuple[str, object]:
    """``"train.lr=1e-3"`` -> ("train.lr", 0.001); values are TOML, else kept as strings."""
    if "=" not in item:
        raise ValueError(f"--set {item!r}: expected key=value, e.g. train.max_steps=200")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ValueError(f"--set {item!r}: the key is empty; write section.field=value, e.g. train.lr=1e-3")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``["train.max_steps=200", "model.moe.num_experts=16"]`` onto a nested dict (a copy).
    A key given twice is refused: which one was meant is not ours to guess."""
    raw = json.loads(json.dumps(raw))   # a deep copy of plain data
    seen: dict[str, str] = {}
    for item in overrides:
        key, value = parse_set(item)
        if key in seen:
            raise ValueError(f"--set {key} given twice ({seen[key]!r} and {item!r}); give each key once")
        seen[key] = item
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {p!r} is a value, not a section")
        node[parts[-1]] = value
    return raw


def _legacy(cls_name: str, raw: dict) -> dict:
    """Keys of configs saved by older moekit versions, in today's terms."""
    raw = dict(raw)
    if cls_name == "MoEConfig" and raw.get("router_dtype", "float32") in ("float32", "torch.float32"):
        raw.pop("router_dtype", None)
    if cls_name == "ModelConfig" and raw.get("moe_layers") == "none":
        raw["moe"], raw["moe_layers"] = None, "all"
    return raw


def _schedule_start(raw: dict) -> dict:
    """A recipe with train.expert_schedule and no model.moe.num_experts starts with the
    schedule's count at step 0 (a bad schedule is left for TrainConfig to name)."""
    from moekit.config import parse_expert_schedule
    train, model = raw.get("train"), raw.get("model", {})
    text = train.get("expert_schedule") if isinstance(train, dict) else None
    moe = model.get("moe", {}) if isinstance(model, dict) else None
    if text is None or not isinstance(moe, dict) or "num_experts" in moe:
        return raw
    try:
        start = parse_expert_schedule(text)[0][1]
    except ValueError:
        return raw
    top_k = moe.get("top_k", 2)
    if not isinstance(top_k, int) or start < top_k:
        return raw                      # check_schedule names the schedule's too-small start
    return {**raw, "model": {**model, "moe": {**moe, "num_experts": start}}}


def build(cls, raw: dict, prefix: str = ""):
    """A dataclass (RunConfig and its sections) from a nested dict, naming unknown keys."""
    from moekit.config import (
        DataConfig,
        DistillConfig,
        FinetuneConfig,
        ModelConfig,
        MoEConfig,
        ParallelConfig,
        RunConfig,
        TrainConfig,
    )
    from moekit.moe.config import default_moe
    if not isinstance(raw, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or '(top)'} must be a table, got {raw!r}")
    raw = _legacy(cls.__name__, raw)
    if cls is RunConfig:
        raw = _schedule_start(raw)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ValueError(f"unknown config key {prefix + unknown[0]!r}; known keys in "
                         f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))}")
    sections = {RunConfig: {"model": ModelConfig, "data": DataConfig, "train": TrainConfig,
                            "parallel": ParallelConfig, "finetune": FinetuneConfig,
                            "distill": DistillConfig},
                ModelConfig: {"moe": MoEConfig}}.get(cls, {})
    kwargs = {}
    d_model = raw.get("d_model", names["d_model"].default) if cls is ModelConfig else None
    for key, value in raw.items():
        sub = sections.get(key)
        if sub is MoEConfig:
            if value is None or value is False:
                kwargs[key] = None
                continue
            if isinstance(value, dict):
                defaults = dataclasses.asdict(default_moe(d_model)) if isinstance(d_model, int) else {}
                value = {k: defaults[k] for k in ("d_model", "d_ff", "num_experts", "top_k")
                         if k in defaults} | value
        kwargs[key] = build(sub, value, f"{prefix}{key}.") if sub else value
    if cls is ModelConfig and "moe" not in raw and isinstance(d_model, int):   # the recipe default is MoE
        kwargs["moe"] = default_moe(d_model) if d_model > 0 else None
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"config section {prefix.rstrip('.') or '(top)'}: {err}") from None


def dump_toml(raw: dict) -> str:
    """A nested dict of plain values (``RunConfig.to_dict()``) as TOML that :func:`load_toml`
    reads back into the same dict: sections as tables, lists of tables inline. TOML has no
    null: a None field is left out (it then takes its default) except ``model.moe``, written
    ``false`` (a dense model, as :func:`build` reads it)."""
    lines: list[str] = []

    def table(node: dict, path: str) -> None:
        scalars = {k: v for k, v in node.items() if not isinstance(v, dict)}
        if path and scalars:
            lines.append(f"\n[{path}]")
        for key, value in scalars.items():
            if value is None and key == "moe":
                value = False
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        for key, value in node.items():
            if isinstance(value, dict):
                table(value, f"{path}.{key}" if path else key)

    table(raw, "")
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)              # repr: a float reads back bit-exact (inf, nan are TOML too)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)   # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None) + " }"
    raise ValueError(f"cannot write {value!r} ({type(value).__name__}) as TOML")
