"""A model whose weights hold NaN or inf, from outside (an edited export, a damaged Hugging Face
directory): every command that reads it refuses in one line naming the tensor and the source,
and writes nothing."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit.cli.main import main

OLD = Path(__file__).parent.parent / "fixtures" / "wave2-dirs"
TENSOR = "blocks.1.ffn.experts.w_down_EFD"


def _poison(path: Path, key: str, value: float) -> None:
    state = load_file(str(path))
    assert key in state, sorted(state)[:8]
    state[key] = state[key].clone()
    state[key].view(-1)[3] = value
    save_file(state, str(path))


@pytest.fixture
def bad_export(tmp_path):
    out = tmp_path / "bad"
    shutil.copytree(OLD / "export", out)
    _poison(out / "model.safetensors", TENSOR, float("nan"))
    return out


@pytest.mark.parametrize("argv", [
    ["generate", "{src}", "--prompt", "Mr", "--max-new-tokens", "3"],
    ["generate", "{src}", "--prompt", "Mr", "--max-new-tokens", "3", "--temperature", "0"],
    ["eval", "{src}"],
    ["export", "{src}", "--format", "hf", "--out", "{out}"],
    ["compress", "{src}", "--method", "quantize", "--bits", "8", "--out", "{out}"],
    ["train", "--from", "{src}", "--set", f"data.corpus={OLD / 'corpus.txt'}", "--set", "data.seq_len=16",
     "--set", "train.max_steps=2", "--out", "{out}", "--no-progress"],
])
def test_every_command_refuses_nan_weights_and_writes_nothing(bad_export, tmp_path, capsys, argv):
    out = tmp_path / "out"
    code = main([a.format(src=bad_export, out=out) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert repr(TENSOR) in err and str(bad_export) in err and "1 NaN" in err, err
    assert not out.exists()


def test_an_infinite_weight_in_a_hugging_face_directory_is_named_on_import(tmp_path, capsys):
    hf = tmp_path / "hf"
    assert main(["export", str(OLD / "export"), "--format", "hf", "--out", str(hf)]) == 0
    weights = hf / "model.safetensors"
    key = next(k for k in load_file(str(weights)) if k.endswith("embed_tokens.weight"))
    _poison(weights, key, float("inf"))
    capsys.readouterr()
    out = tmp_path / "imported"
    assert main(["import", str(hf), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "'embed.weight' holds 0 NaN and 1 infinite" in err and str(hf) in err, err
    assert not out.exists()


def test_finite_weights_still_load():
    from moekit.store.run_dir import load_run
    model, _, _ = load_run(OLD / "export")
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())


def test_a_resume_from_a_checkpoint_holding_nan_is_refused_and_changes_nothing(tmp_path, capsys, monkeypatch):
    """It skipped every step as non-finite, then said "the checkpoint of step 3 is intact" (the
    damaged one), having raised config.json's max_steps and logged NaN rows."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(OLD / "corpus.txt", tmp_path / "corpus.txt")   # the run's recipe names it relatively
    run = tmp_path / "run"
    shutil.copytree(OLD / "run", run)
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    state["model"]["embed.weight"][0, 0] = float("nan")
    torch.save(state, run / "checkpoint.pt")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=6", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'embed.weight' holds 1 NaN" in err[0] and str(run) in err[0], err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
