"""The real launcher: gloo processes through torchrun train a model and write a sharded
torch.distributed.checkpoint; it resumes exactly on the same layout, resumes as one process,
and exports a consolidated single-device model."""

import json
import os
import subprocess
import sys

import pytest
import torch

COMMON = ["--set", "data.vocab_size=512", "--set", "data.seq_len=32", "--set", "model.d_model=64",
          "--set", "model.n_layers=2", "--set", "model.d_ff=128", "--set", "model.moe.d_ff=64",
          "--set", "model.moe.num_experts=4", "--set", "train.batch_size=4", "--set", "train.eval_every=4",
          "--set", "train.eval_batches=2", "--set", "train.log_every=1", "--set", "train.warmup_steps=2",
          "--set", "train.save_every=2"]      # a mid-run save, then more steps


def _losses(run):
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    return {r["step"]: r["loss/lm"] for r in rows if "loss/lm" in r}


def _moekit(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "moekit", *args], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _in_process(capsys, *args) -> str:
    """A one-process command (export, generate, eval) through the CLI in this process: the
    same code as ``python -m moekit`` without a fresh interpreter's imports; its stdout."""
    from moekit.cli.main import main as cli
    capsys.readouterr()
    assert cli(list(args)) == 0
    return capsys.readouterr().out


def _train(run, corpus, *args):
    return _moekit("train", "--no-progress", "--out", str(run), "--set", f'data.corpus="{corpus}"',
                   *COMMON, *args)


@pytest.mark.parametrize("layout", [[],          # no layout given: data parallel over the processes
                                    ["--set", "parallel.ep=2", "--set", 'parallel.sharding="fsdp"']])
def test_two_ranks_then_one(tmp_path, parl_subset, layout):
    run = tmp_path / "run"
    _train(run, parl_subset, "--nproc", "2", "--stop-at", "4", "--set", "train.max_steps=8", *layout)
    assert sorted(_losses(run)) == [1, 2, 3, 4]
    shards = sorted(p.name for p in (run / "checkpoint").iterdir())
    assert ".metadata" in shards and sum(s.endswith(".distcp") for s in shards) == 2, shards
    assert not (run / "checkpoint.pt").exists()
    recorded = json.loads((run / "config.json").read_text())["parallel"]     # the layout in use
    assert recorded == ({"dp": 2, "ep": 1, "sharding": "none"} if not layout else
                        {"dp": 1, "ep": 2, "sharding": "fsdp"})
    if layout:   # a layout of the user's choice on resume: ep=2 + FSDP -> dp=2 (DDP)
        _moekit("train", "--resume", str(run), "--no-progress", "--nproc", "2", "--stop-at", "6",
                "--set", "parallel.dp=2", "--set", "parallel.ep=1", "--set", 'parallel.sharding="none"')
        saved = json.loads((run / "config.json").read_text())["parallel"]
        assert saved == {"dp": 2, "ep": 1, "sharding": "none"}
    proc = _moekit("train", "--resume", str(run), "--no-progress")
    assert "resuming a 2-process run on 1 process(es); the global batch is batch_size x 1 = 4 " \
           "sequences (it was 8)" in proc.stderr
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 9))
    assert losses[8] < losses[1]
    assert (run / "checkpoint.pt").exists() and not (run / "checkpoint").exists()   # the newer one only


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp on one process
def test_sharded_resume_is_exact_and_exports(tmp_path, parl_subset, capsys):
    layout = ["--nproc", "2", "--set", "parallel.ep=2", "--set", "train.max_steps=6",
              "--set", "model.moe.jitter_eps=0.01"]          # per-rank RNG streams must resume too
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(straight, parl_subset, *layout)
    _train(resumed, parl_subset, "--stop-at", "3", *layout)
    _moekit("train", "--resume", str(resumed), "--no-progress", "--nproc", "2")
    assert _losses(resumed) == _losses(straight)     # exact: model, AdamW moments, data position, RNG
    # each rank has its own random stream (jitter must not be the same draw on every rank)
    import pickle

    import torch.distributed.checkpoint as dcp
    rng = {"rng": {"rank0": b"", "rank1": b""}}
    dcp.load(rng, checkpoint_id=resumed / "checkpoint")
    states = [pickle.loads(rng["rng"][f"rank{r}"])["torch"] for r in (0, 1)]
    assert not torch.equal(states[0], states[1])
    # a consolidated copy for one device: the same model
    _in_process(capsys, "export", str(resumed), "--out", str(tmp_path / "export"))
    assert (tmp_path / "export" / "model.safetensors").exists()
    from moekit.store.run_dir import load_run
    model, tok, _ = load_run(resumed)
    exported, _, _ = load_run(tmp_path / "export")
    x = torch.tensor([tok.encode("Frau Präsidentin, meine Damen und Herren").ids])
    with torch.no_grad():
        torch.testing.assert_close(exported(x).logits, model(x).logits, rtol=0, atol=0)
    out = _in_process(capsys, "generate", str(tmp_path / "export"), "--prompt", "Frau",
                      "--max-new-tokens", "5")
    assert out.startswith("Frau")
    # validation is layout-independent: one process on the final checkpoint (and on the
    # export, whose token cache is rebuilt) gives the loss the two ranks logged
    logged = [json.loads(line) for line in open(resumed / "metrics.jsonl")]
    val = [r["loss/val"] for r in logged if r["step"] == 6 and "loss/val" in r][0]
    for where in (resumed, tmp_path / "export"):
        got = json.loads(_in_process(capsys, "eval", str(where), "--batches", "2"))["val_loss"]
        assert got == pytest.approx(val, rel=1e-5), where


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp on one process
def test_experts_grow_under_expert_parallelism_and_fsdp_and_resume_exactly(tmp_path, parl_subset):
    """Two ranks, ep=2 with FSDP2: every rank gathers, grows and takes its piece; a run stopped
    at the growth step grows on resume exactly as the uninterrupted one did."""
    layout = ["--nproc", "2", "--set", "parallel.ep=2", "--set", 'parallel.sharding="fsdp"',
              "--set", "train.max_steps=6", "--set", 'train.expert_schedule="4@0, 8@3"']
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(straight, parl_subset, *layout)
    _train(resumed, parl_subset, "--stop-at", "3", *layout)
    assert json.loads((resumed / "config.json").read_text())["model"]["moe"]["num_experts"] == 4
    _moekit("train", "--resume", str(resumed), "--no-progress", "--nproc", "2")
    assert _losses(resumed) == _losses(straight)
    rows = [json.loads(line) for line in open(straight / "metrics.jsonl")]
    (grew,) = [r for r in rows if "growth/jump" in r]
    assert grew["step"] == 3 and grew["moe/num_experts"] == 8 and abs(grew["growth/jump"]) < 0.1
    assert len([r for r in rows if "moe/layer0/load" in r][-1]["moe/layer0/load"]) == 8
    from moekit.store.run_dir import load_run
    model, _, cfg = load_run(resumed)                  # the sharded checkpoint holds the grown model
    assert cfg.model.moe.num_experts == 8 and model.moe_layers()[0].experts.w_gate_EDF.shape[0] == 8
