"""Recipes as plain nested dicts: TOML files and ``--set key=value`` overrides.

    raw = load_toml("configs/tiny-moe.toml")                 # nested dict
    raw = apply_overrides(raw, ["train.max_steps=200"])      # values parsed as TOML
    cfg = RunConfig.from_dict(raw)                           # typed and checked (moekit.config)

This module knows no config class: moekit.config builds the typed, checked RunConfig from
these dicts (and translates keys written by older moekit versions).
"""

from __future__ import annotations

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


def dump_toml(raw: dict) -> str:
    """A nested dict of plain values (``RunConfig.to_dict()``) as TOML that :func:`load_toml`
    reads back into the same dict: sections as tables, lists of tables inline. TOML has no
    null: a None field is left out (it then takes its default) except ``model.moe``, written
    ``false`` (a dense model, as ``RunConfig.from_dict`` reads it)."""
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
