"""The real launcher: two gloo processes through torchrun train a model; the run stops with
a consolidated checkpoint and resumes as one process."""

import json
import os
import subprocess
import sys

import pytest


def _losses(run):
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    return {r["step"]: r["loss/lm"] for r in rows if "loss/lm" in r}


@pytest.mark.parametrize("layout", [["--set", "parallel.dp=2"], ["--set", "parallel.ep=2"]])
def test_two_ranks_then_one(tmp_path, parl_subset, layout):
    run = tmp_path / "run"
    common = ["--set", f'data.corpus="{parl_subset}"', "--set", "data.vocab_size=512",
              "--set", "data.seq_len=32", "--set", "model.d_model=64", "--set", "model.n_layers=2",
              "--set", "model.d_ff=128",
              "--set", "model.moe.d_ff=64", "--set", "model.moe.num_experts=4", "--set", "train.batch_size=4",
              "--set", "train.max_steps=8", "--set", "train.eval_every=4", "--set", "train.eval_batches=2",
              "--set", "train.log_every=1", "--set", "train.warmup_steps=2",
              "--set", "train.save_every=2"]      # a mid-run save, then more steps (EP gathers state)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "moekit.cli.main", "train", "--nproc", "2", "--no-progress",
                          "--out", str(run), "--stop-at", "4", *common, *layout],
                         capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    first = _losses(run)
    assert sorted(first) == [1, 2, 3, 4]
    one = subprocess.run([sys.executable, "-m", "moekit.cli.main", "train", "--resume", str(run),
                          "--no-progress"], capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 9))
    assert losses[8] < losses[1]
