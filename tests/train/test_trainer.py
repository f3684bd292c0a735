"""End to end: real text -> tokenizer -> MoE LM -> loss goes down; exact resume; clear errors."""

import json
import math
import subprocess
import sys

import pytest
import torch

from moekit.cli.main import main as cli
from moekit.config import RunConfig, apply_overrides
from moekit.train.trainer import train


def tiny(corpus, moe=None, **train_kw) -> RunConfig:
    raw = {"data": {"corpus": str(corpus), "vocab_size": 512, "seq_len": 32},
           "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128,
                     "moe": {"d_ff": 64, "num_experts": 4, "top_k": 2, **(moe or {})}},
           "train": {"batch_size": 8, "max_steps": 40, "warmup_steps": 5, "lr": 3e-3, "eval_every": 20,
                     "eval_batches": 4, "log_every": 1, "save_every": 1000, **train_kw}}
    return RunConfig.from_dict(raw)


def losses(run_dir):
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return {r["step"]: r["loss/lm"] for r in rows if "loss/lm" in r}


def test_short_run_lowers_the_loss_and_writes_a_run_directory(tmp_path, parl_subset):
    summary = train(tiny(parl_subset), tmp_path / "run", progress=False)
    lm = losses(tmp_path / "run")
    assert summary["steps"] == 40
    assert sum(list(lm.values())[-5:]) / 5 < sum(list(lm.values())[:5]) / 5 - 0.5
    for name in ("checkpoint.pt", "tokenizer.json", "config.json", "metrics.jsonl", "tensorboard"):
        assert (tmp_path / "run" / name).exists(), name
    assert summary["final_val_loss"] < 6.0   # ln(512) = 6.24 for a uniform guess


def test_resume_follows_the_uninterrupted_trajectory(tmp_path, parl_subset):
    # jitter puts RNG in the forward: the resume must restore the RNG state
    cfg = tiny(parl_subset, moe={"jitter_eps": 0.01}, max_steps=16, eval_every=8)
    train(cfg, tmp_path / "full", progress=False)
    train(cfg, tmp_path / "cut", progress=False, stop_at=9)
    assert max(losses(tmp_path / "cut")) == 9
    train(cfg, tmp_path / "cut", progress=False, resume=True)
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(cut) == sorted(full)
    for step in full:
        assert cut[step] == full[step], (step, cut[step], full[step])


def test_cli_train_generate_eval(tmp_path, parl_subset, capsys):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--no-progress", "--set", f'data.corpus="{parl_subset}"',
            "--set", "data.vocab_size=512", "--set", "data.seq_len=32", "--set", "model.d_model=64",
            "--set", "model.n_layers=1", "--set", "model.d_ff=128", "--set", "model.moe.d_ff=64",
            "--set", "train.max_steps=5", "--set", "train.batch_size=4", "--set", "train.eval_batches=2"]
    assert cli(args) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 5
    assert cli(["generate", str(out), "--prompt", "Herr Präsident", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    assert "Herr Präsident" in printed
    # eval says over which windows; --batches train.eval_batches gives the run's final_val_loss again
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_val_windows"] == 8 < summary["of_val_windows"]
    assert cli(["eval", str(out), "--batches", "2"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["val_loss"] == pytest.approx(summary["final_val_loss"], rel=1e-6)
    assert (same["val_windows"], same["of_val_windows"]) == (8, summary["of_val_windows"])
    assert cli(["eval", str(out)]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert whole["val_windows"] == whole["of_val_windows"] == summary["of_val_windows"]
    assert whole["val_loss"] != same["val_loss"]


@pytest.mark.parametrize("args, message", [
    (["train", "--set", "train.lr_max=1"], "unknown config key 'train.lr_max'"),
    (["train", "--config", "no/such/recipe.toml"], "not found"),
    (["train", "--set", "train.max_steps=0"], "train.max_steps=0"),
    (["eval", "no/such/run"], "does not exist; give a run, export"),
    (["export", "no/such/run"], "does not exist; give a run, export"),
    (["train", "--nproc", "2", "--set", "parallel.dp=3"],
     "parallel.dp x parallel.ep = 3 x 1 = 3 but 2 processes"),
    (["train", "--nproc", "0"], "--nproc 0"),
    (["train", "--set", "parallel.ep=3"], "does not divide model.moe.num_experts=8"),
    (["train", "--resume", "no/such/run", "--set", "train.lr=9"], "only parallel.* (the layout)"),
])
def test_bad_input_is_one_line(args, message, capsys):
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_several_processes_need_one_run_directory(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")      # as under torchrun: every rank would pick its own
    assert cli(["train"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pass --out DIR" in err and len(err.splitlines()) == 1


def test_empty_corpus_and_corrupt_checkpoint_lose_nothing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    assert cli(["train", "--out", str(tmp_path / "r"), "--set", f'data.corpus="{empty}"']) == 2
    assert "holds no text" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()            # a run that could not start leaves no directory
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert cli(["train", "--resume", str(run)]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert (run / "checkpoint.pt").read_bytes() == b"not a checkpoint"     # untouched
    assert cli(["train", "--out", str(run), "--set", 'data.corpus="x.txt"']) == 2
    assert "already holds a run" in capsys.readouterr().err
    sharded = tmp_path / "sharded"
    (sharded / "checkpoint").mkdir(parents=True)
    (sharded / "checkpoint" / ".metadata").write_bytes(b"truncated")
    assert cli(["export", str(sharded)]) == 2
    err = capsys.readouterr().err.strip()
    assert "corrupt" in err and len(err.splitlines()) == 1
    assert (sharded / "checkpoint" / ".metadata").read_bytes() == b"truncated"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp on one process
def test_a_crash_between_the_sharded_swap_renames_keeps_the_old_checkpoint(tmp_path, parl_subset):
    """save_sharded_checkpoint renames checkpoint/ -> checkpoint.old/, then checkpoint.tmp/ ->
    checkpoint/: a crash in between leaves checkpoint.old/, which a resume must find."""
    import torch.distributed.checkpoint as dcp

    from moekit.parallel.checkpointing import training_state
    from moekit.store.checkpoint import Checkpoint
    from moekit.store.run_dir import load_run
    run = tmp_path / "run"
    train(tiny(parl_subset, max_steps=2, eval_every=2), run, progress=False)
    model, _, cfg = load_run(run)
    full = torch.load(run / "checkpoint.pt", weights_only=False)
    opt = torch.optim.AdamW(model.parameters())
    state = training_state(model, opt)
    dcp.save({**state, "meta": full["meta"], "rng": full["rng"]}, checkpoint_id=run / "checkpoint.old")
    (run / "checkpoint.pt").unlink()
    ckpt = Checkpoint(run)
    assert ckpt.path.name == "checkpoint.old" and ckpt.meta["step"] == 2
    train(cfg, run, resume=True, progress=False)      # resumes from it (max_steps 2: nothing to do)


def test_overrides_parse_toml_values():
    raw = apply_overrides({}, ["train.lr=1e-3", "model.moe_layers=[0, 2]", "data.corpus=news-en",
                               "model.tie_embeddings=false"])
    assert raw == {"train": {"lr": 1e-3}, "model": {"moe_layers": [0, 2], "tie_embeddings": False},
                   "data": {"corpus": "news-en"}}


def test_recipes_in_configs_load_and_the_default_matches_the_code():
    from pathlib import Path
    root = Path(__file__).resolve().parents[2] / "configs"
    default = RunConfig.from_toml(root / "tiny-moe.toml")
    assert default == RunConfig()
    dense = RunConfig.from_toml(root / "tiny-dense.toml")
    assert dense.model.moe is None and dense.model == default.model.dense_baseline()
    RunConfig.from_toml(root / "gpu-moe.toml")


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "moekit.cli.main", "data", "list"], capture_output=True,
                          text=True, timeout=60, check=True)
    assert "parlspeech" in proc.stdout


def test_aux_loss_free_bias_moves_after_optimizer_steps(tmp_path, parl_subset):
    cfg = tiny(parl_subset, moe={"router": "sigmoid", "aux_loss_free": True, "bias_update_rate": 0.01},
               max_steps=6, eval_every=6)
    train(cfg, tmp_path / "run", progress=False)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    bias = state["model"]["blocks.0.ffn.router.expert_bias_E"]
    assert bias.abs().sum() > 0
    assert float(bias.abs().max()) <= 6 * 0.01 + 1e-6     # at most one rate-sized move per step
    assert "tokenizer" in json.loads(state["meta"])


def test_gradient_accumulation_and_bf16_autocast_train(tmp_path, parl_subset):
    cfg = tiny(parl_subset, max_steps=12, batch_size=4, grad_accum=2, precision="bf16", eval_every=12)
    summary = train(cfg, tmp_path / "run", progress=False)
    lm = list(losses(tmp_path / "run").values())
    assert summary["steps"] == 12 and all(map(math.isfinite, lm))
    assert sum(lm[-3:]) / 3 < sum(lm[:3]) / 3


def test_compiled_training_checkpoints_a_plain_state_dict(tmp_path, parl_subset):
    train(tiny(parl_subset, max_steps=2, eval_every=2, compile=True), tmp_path / "run", progress=False)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert not any(k.startswith("_orig_mod") for k in state["model"])


def test_an_older_moekit_checkpoint_evaluates_and_refuses_resume_clearly(tmp_path, parl_subset, capsys):
    """checkpoint.pt files before sharded checkpoints held model/optimizer/step/config at the top."""
    run = tmp_path / "run"
    train(tiny(parl_subset, max_steps=2, eval_every=2), run, progress=False)
    new = torch.load(run / "checkpoint.pt", weights_only=False)
    meta = json.loads(new["meta"])
    torch.save({"model": new["model"], "optimizer": {"state": {}, "param_groups": []}, "step": meta["step"],
                "sampler": meta["sampler"], "config": meta["config"], "tokenizer": meta["tokenizer"]},
               run / "checkpoint.pt")
    assert cli(["eval", str(run), "--batches", "1"]) == 0
    assert '"val_loss"' in capsys.readouterr().out
    assert cli(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "older moekit" in err and len(err.splitlines()) == 1


def test_only_complete_checkpoints_are_found(tmp_path):
    """A sharded directory without its .metadata (written last) is torn: the intact file wins,
    even when the directory is newer (a crash while deleting it)."""
    from moekit.store.checkpoint import find_checkpoint
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "__0_0.distcp").write_bytes(b"x")
    assert find_checkpoint(tmp_path).name == "checkpoint.pt"
    (tmp_path / "checkpoint" / ".metadata").write_bytes(b"x")
    assert find_checkpoint(tmp_path).name == "checkpoint"         # complete and newer
    (tmp_path / "checkpoint.pt").unlink()
    (tmp_path / "checkpoint" / ".metadata").unlink()
    assert find_checkpoint(tmp_path).name == "checkpoint"         # torn and alone: the reader reports it



def test_a_loss_spike_is_warned_only_when_it_is_large(caplog):
    """1.5x the recent mean and 0.5 nats above it: a fine-tuning loss of 0.03 -> 0.12 is not one."""
    import logging
    from types import SimpleNamespace

    from moekit.config import TrainConfig
    from moekit.train.step import StepStats
    from moekit.train.trainer import _LoopState, _watch
    cfg = SimpleNamespace(train=TrainConfig(warmup_steps=0))
    run = SimpleNamespace(cfg=cfg, history=[], main=True, step=5)
    for ema, loss, warned in ((0.03, 0.12, False), (2.0, 3.2, True), (2.0, 2.6, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="moekit"):
            _watch(run, StepStats(losses={"lm": loss, "total": loss}, grad_norm=1.0, lr=1e-3, tokens=1),
                   _LoopState(saved_step=None, loss_ema=ema))
        assert ("loss spike" in caplog.text) == warned, (ema, loss)


def test_on_eval_sees_every_evaluation_and_can_stop_the_run_with_a_checkpoint(tmp_path, parl_subset):
    from moekit.store.checkpoint import Checkpoint
    seen = []

    def on_eval(step, val_loss):
        seen.append((step, val_loss))
        return step >= 10                       # stop at the second evaluation

    summary = train(tiny(parl_subset, max_steps=20, eval_every=5), tmp_path / "run", progress=False,
                    on_eval=on_eval)
    assert [s for s, _ in seen] == [5, 10] and all(math.isfinite(v) for _, v in seen)
    assert summary["steps"] == 10 and summary["final_val_loss"] == seen[-1][1]
    assert Checkpoint(tmp_path / "run").meta["step"] == 10
    assert max(losses(tmp_path / "run")) == 10
