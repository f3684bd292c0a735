"""Directories written before the wave-3 move (store/, transform/) still load, to the same logits.

The fixture (tests/fixtures/wave2-dirs, see its README) was written by moekit at commit 75cea5c:
a run, its export, an 8-bit quantized export and a LoRA fine-tuning run.
"""

import shutil
from pathlib import Path

import pytest
import torch

import moekit
from moekit.store.run_dir import load_run

OLD = Path(__file__).parent.parent / "fixtures" / "wave2-dirs"
EXPECTED = torch.load(OLD / "expected_logits.pt", weights_only=True)


@pytest.mark.parametrize("name", ["run", "export", "q8", "lora"])
def test_an_old_directory_loads_to_the_same_logits(name):
    model, tok = moekit.load_model(OLD / name)
    with torch.no_grad():
        logits = model(EXPECTED["ids"]).logits.float()
    assert torch.equal(logits, EXPECTED[name]), f"{name}: max diff {(logits - EXPECTED[name]).abs().max()}"
    if name == "q8":
        assert type(model.blocks[0].ffn.experts).__name__ == "QuantizedExperts"   # built with its structure


def test_an_old_run_resumes_and_trains_on(tmp_path, monkeypatch):
    """The saved run continues (optimizer, data position, RNG from the old checkpoint.pt); its
    recipe names its corpus by a relative path, corpus.txt."""
    from moekit.config import RunConfig
    from moekit.train.launch import launch
    monkeypatch.chdir(tmp_path)
    shutil.copy(OLD / "corpus.txt", tmp_path / "corpus.txt")
    run = tmp_path / "run"
    shutil.copytree(OLD / "run", run)
    summary = launch(RunConfig(), run, resume=True, progress=False, changes={"max_steps": 4})
    assert summary["steps"] == 4 and summary["steps_run"] == 1
    assert (run / "summary.json").exists()
    _, _, cfg = load_run(run)
    assert cfg.train.max_steps == 4


def test_a_run_from_the_old_quantized_export_trains_and_resumes(tmp_path):
    """--from a quantized model: the engine builds it through the loader's build_model (the
    quantized experts, whose weights stay as they are; the float rest trains), and a resume
    builds it the same way."""
    from moekit.config import RunConfig
    from moekit.train.launch import launch
    raw = {"data": {"corpus": str(OLD / "corpus.txt"), "seq_len": 16},
           "train": {"max_steps": 2, "batch_size": 2, "eval_every": 2, "eval_batches": 1,
                     "init_from": str(OLD / "q8")}}
    run = tmp_path / "from-q8"
    summary = launch(RunConfig.from_dict(raw), run, progress=False, model_section={})
    assert summary["steps"] == 2 and summary["final_val_loss"] == summary["final_val_loss"]
    summary = launch(RunConfig(), run, resume=True, progress=False, changes={"max_steps": 3})
    assert summary["steps"] == 3
    model, _, cfg = load_run(run)
    assert cfg.model.quant == {"bits": 8, "group_size": 8, "attention": False}
    assert type(model.blocks[0].ffn.experts).__name__ == "QuantizedExperts"


def test_written_weights_are_readable_by_others_as_the_umask_says(tmp_path):
    """safetensors writes 0600; every model.safetensors moekit writes (export, HF export) gets
    the mode of the other files, 0644 under umask 022."""
    import os
    import stat

    from moekit.store.run_dir import export_hf, export_run
    old = os.umask(0o022)
    try:
        export_run(OLD / "run", tmp_path / "export")
        export_hf(OLD / "export", tmp_path / "hf")
    finally:
        os.umask(old)
    for d in ("export", "hf"):
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / d).iterdir() if p.is_file()}
        assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


def test_expert_dropout_on_quantized_experts_is_one_line_before_anything_is_written(tmp_path, capsys):
    """finetune's recipe sets model.moe.expert_dropout=0.4; quantized experts only infer: it
    failed at the first step (in Python's terms) and left config.json and data/ behind."""
    from moekit.cli.main import main
    out = tmp_path / "ft"
    code = main(["train", "--from", str(OLD / "q8"), "--out", str(out), "--no-progress",
                 "--set", f"data.corpus={OLD / 'corpus.txt'}", "--set", "data.seq_len=16",
                 "--set", "train.max_steps=1", "--set", "model.moe.expert_dropout=0.4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "model.moe.expert_dropout=0.4: the experts of" in err[0] and "expert_dropout=0 " in err[0], err
    assert not out.exists()
