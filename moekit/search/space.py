"""The search space: which config fields a search varies, and over what.

A space file is TOML with one ``[space]`` table; each key is a dotted config field (as for
``--set``) and each value a choice list or a range::

    [space]
    "model.moe.num_experts" = { choices = [4, 8, 16] }
    "model.moe.top_k" = { low = 1, high = 4 }                # ints: both bounds are ints
    "train.lr" = { low = 1e-4, high = 1e-2, log = true }

Unquoted dotted keys (``train.lr = { ... }``) are TOML sub-tables and read the same. Every
entry is checked up front against the config's fields, an integer field (``int`` in
moekit.config) against integer bounds and choices (``high = 10.0`` is refused, as ``--set
train.max_steps=10.0`` is); a sampled combination the config refuses (``top_k > num_experts``)
is the trial's problem: it is pruned (moekit.search.study).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from moekit.config import RunConfig
from moekit.recipe import load_toml

ENTRY_KEYS = ("choices", "low", "high", "log")
_EXAMPLE = ('e.g. "train.lr" = { low = 1e-4, high = 1e-2, log = true } or '
            '"model.moe.top_k" = { choices = [1, 2] }')


@dataclass(frozen=True)
class Param:
    """One searched field: ``choices`` or a ``low``..``high`` range (ints when both are ints)."""

    name: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False

    @property
    def is_int(self) -> bool:
        return self.choices is None and isinstance(self.low, int) and isinstance(self.high, int)

    def suggest(self, trial):
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.is_int:
            return trial.suggest_int(self.name, self.low, self.high, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def holds(self, value) -> bool:
        """Whether ``value`` lies in this parameter's space (the base recipe's, for trial 0)."""
        if self.choices is not None:
            return any(value == c and type(value) is type(c) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return self.low <= value <= self.high and (not self.is_int or isinstance(value, int))

    def to_dict(self) -> dict:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, "log": self.log}


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]

    def to_dict(self) -> dict:
        return {p.name: p.to_dict() for p in self.params}

    def fingerprint(self) -> str:
        """A canonical text of the space: what a study stores and compares on resume."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def default_name(self) -> str:
        return "moekit-" + hashlib.sha256(self.fingerprint().encode()).hexdigest()[:10]

    def suggest(self, trial) -> dict:
        return {p.name: p.suggest(trial) for p in self.params}

    def base_values(self, raw: dict) -> dict | None:
        """The base recipe's values of the searched fields, when every one lies in the space
        (then the base recipe is trial 0, the reference the others are measured against)."""
        full = RunConfig.from_dict(raw).to_dict()
        values = {p.name: _get(full, p.name) for p in self.params}
        return values if all(p.holds(values[p.name]) for p in self.params) else None


def apply(raw: dict, params: dict) -> dict:
    """The recipe ``raw`` with the sampled ``params`` ({"train.lr": 1e-3, ...}) set, as --set would."""
    raw = json.loads(json.dumps(raw))
    for name, value in params.items():
        node = raw
        for part in name.split(".")[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[name.split(".")[-1]] = value
    return raw


def load_space(path: str | Path) -> Space:
    """The space in a TOML file, every entry checked (one ValueError line naming the field,
    the value and the fix)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"space file {str(path)!r} not found; give a .toml with a [space] table")
    raw = load_toml(path)
    extra = sorted(set(raw) - {"space"})
    if "space" not in raw or not isinstance(raw["space"], dict) or not raw["space"]:
        raise ValueError(f"space file {str(path)!r} has no [space] table with entries; add one, {_EXAMPLE}")
    if extra:
        raise ValueError(f"space file {str(path)!r}: unknown top-level key {extra[0]!r}; only [space] is "
                         "read")
    try:
        return parse_space(raw["space"])
    except ValueError as err:           # the entry's own line, with the file it is in
        raise ValueError(f"space file {str(path)!r}: {err}") from None


def parse_space(table: dict) -> Space:
    entries: dict[str, dict] = {}
    _flatten(table, "", entries)
    return Space(tuple(_param(name, entry) for name, entry in sorted(entries.items())))


def _flatten(node: dict, prefix: str, out: dict) -> None:
    for key, value in node.items():
        name = prefix + key
        if isinstance(value, dict) and value and set(value) & set(ENTRY_KEYS):
            out[name] = value
        elif isinstance(value, dict) and value:
            _flatten(value, name + ".", out)
        else:
            raise ValueError(f"space entry {name!r} = {value!r} is not a choice list or a range; "
                             f"write {_EXAMPLE}")


def _param(name: str, entry: dict) -> Param:
    integer = _check_field(name)
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise ValueError(f"space entry {name!r}: unknown key {unknown[0]!r} in {entry!r}; use "
                         "choices = [...], or low, high and optionally log")
    if "choices" in entry:
        return _choices(name, entry, integer)
    low, high, log = entry.get("low"), entry.get("high"), entry.get("log", False)
    if "low" not in entry or "high" not in entry:
        raise ValueError(f"space entry {name!r} = {entry!r} needs both low and high (or choices = [...])")
    for bound, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"space entry {name!r}: {bound} = {value!r} is not a number; give a number, "
                             "or choices = [...] for other values")
        if not math.isfinite(value):
            raise ValueError(f"space entry {name!r}: {bound} = {value!r} is not finite; give a finite bound")
        if integer and not isinstance(value, int):
            raise ValueError(f"space entry {name!r}: {bound} = {value!r} is not an integer, and {name} is an "
                             "integer field (every trial would be refused and pruned); use integer bounds, "
                             f"e.g. {bound} = {(math.ceil if bound == 'low' else math.floor)(value)}")
    if not isinstance(log, bool):
        raise ValueError(f"space entry {name!r}: log = {log!r} must be true or false")
    if low > high:
        raise ValueError(f"space entry {name!r}: low = {low!r} > high = {high!r} is an empty range; "
                         "swap them or give low <= high")
    if log and low <= 0:
        raise ValueError(f"space entry {name!r}: log = true needs low > 0, got low = {low!r}; raise low or "
                         "set log = false")
    if isinstance(low, int) != isinstance(high, int):   # one float bound: a float range
        low, high = float(low), float(high)
    return Param(name, low=low, high=high, log=log)


def _choices(name: str, entry: dict, integer: bool) -> Param:
    choices = entry["choices"]
    if len(entry) > 1:
        raise ValueError(f"space entry {name!r} = {entry!r}: give choices or a range (low, high), "
                         "not both")
    if not isinstance(choices, list) or not choices:
        raise ValueError(f"space entry {name!r}: choices = {choices!r} must be a non-empty list, "
                         "e.g. choices = [4, 8]")
    bad = [c for c in choices if not isinstance(c, (str, int, float, bool))]
    if bad:
        raise ValueError(f"space entry {name!r}: choice {bad[0]!r} is not a string, number or boolean; "
                         "give plain values")
    not_int = [c for c in choices if integer and isinstance(c, (float, bool, str))]
    if not_int:
        example = round(not_int[0]) if isinstance(not_int[0], float) else 4
        raise ValueError(f"space entry {name!r}: choice {not_int[0]!r} is not an integer, and {name} is an "
                         "integer field (its trials would be refused and pruned); give integer choices, "
                         f"e.g. {example}")
    if len({json.dumps(c) for c in choices}) != len(choices):
        raise ValueError(f"space entry {name!r}: choices = {choices!r} repeats a value; give each once")
    return Param(name, choices=tuple(choices))


def _check_field(name: str) -> bool:
    """``name`` must be a field of RunConfig (walked through its sections), not a section;
    whether the field takes integers only (annotated ``int`` or ``int | None``: the config
    refuses 10.0 and true there, as it does from --set)."""
    node, done, parent = RunConfig(), [], None
    for part in name.split("."):
        fields = {f.name for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else set()
        where = ".".join(done) or "the top level"
        if not fields:
            raise ValueError(f"space entry {name!r}: {'.'.join(done)!r} is a field, not a section; "
                             f"search {'.'.join(done)!r} itself")
        if part not in fields:
            raise ValueError(f"space entry {name!r}: unknown config field; known in {where}: "
                             f"{', '.join(sorted(fields))}")
        parent, node = node, getattr(node, part)
        done.append(part)
    if dataclasses.is_dataclass(node):
        raise ValueError(f"space entry {name!r} is a config section, not a field; search its fields, "
                         f"e.g. {name}.{dataclasses.fields(node)[0].name}")
    kind = next(f.type for f in dataclasses.fields(parent) if f.name == done[-1])
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    return {t.strip() for t in kind.split("|")} - {"None"} == {"int"}


def _get(raw: dict, name: str):
    node = raw
    for part in name.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node
