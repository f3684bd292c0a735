"""The house's order holds: no import cycle, no room importing a room above it
(tools/check_layers.py, whose LAYERS declare the order)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _checker():
    spec = importlib.util.spec_from_file_location("check_layers", ROOT / "tools" / "check_layers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_cycles_and_no_upward_imports():
    found = _checker().check(ROOT / "moekit")
    assert found == {"file_cycles": [], "room_cycles": [], "upward": [], "unknown_rooms": []}


def test_the_check_finds_a_cycle_and_an_upward_import(tmp_path):
    """It would fail: a model file importing train (upward), and two data files importing each
    other (a cycle), inside a function too."""
    pkg = tmp_path / "moekit"
    for room in ("data", "model", "train"):
        (pkg / room).mkdir(parents=True)
        (pkg / room / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "a.py").write_text("from moekit.data import b\n")
    (pkg / "data" / "b.py").write_text("def f():\n    from . import a\n")
    (pkg / "model" / "m.py").write_text("def g():\n    import moekit.train.t\n")
    (pkg / "train" / "t.py").write_text("from moekit.model.m import g\n")
    found = _checker().check(pkg)
    assert ["moekit.data.a", "moekit.data.b"] in found["file_cycles"]
    assert any("moekit.model.m (model) imports moekit.train.t (train)" in u for u in found["upward"])
    assert ["model", "train"] in found["room_cycles"]
