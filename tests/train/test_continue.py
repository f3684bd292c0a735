"""A stage that continues instead of restarting: moekit upcycle / grow carry a run's AdamW state
into OUT/optimizer.safetensors, train --from OUT --set train.init_optimizer=true starts with it,
and train.schedule_start goes on with one learning-rate schedule."""

import pytest
import torch

from moekit.cli.main import main as cli
from moekit.config import TrainConfig
from moekit.store.checkpoint import Checkpoint
from moekit.store.run_dir import OPTIMIZER, load_optimizer_state, load_run
from moekit.train.optim import lr_at

from .test_faults import one_line_error
from .test_from import data_and_train


@pytest.fixture(scope="module")
def dense_run(parl_subset, tmp_path_factory):
    run = tmp_path_factory.mktemp("dense") / "run"
    assert cli(["train", "--out", str(run), "--no-progress", "--set", "data.vocab_size=512",
                "--set", "model.moe=false", "--set", "model.d_model=64", "--set", "model.n_layers=2",
                "--set", "model.d_ff=128", *data_and_train(parl_subset, max_steps=4)]) == 0
    return run


def steps_of(run):
    model, _, _ = load_run(run)
    state = Checkpoint(run).optimizer_state(dict(model.named_parameters()))
    return {n: float(e["step"]) for n, e in state.items()}


def test_upcycle_carries_the_state_and_the_next_stage_continues_it(dense_run, parl_subset, tmp_path, capsys):
    up = tmp_path / "up"
    assert cli(["upcycle", str(dense_run), "--experts", "4", "--top-k", "2", "--out", str(up)]) == 0
    assert "AdamW state carried (step 4)" in capsys.readouterr().out
    model, _, _ = load_run(up)
    optim = load_optimizer_state(up, model)
    assert set(optim) == {n for n, _ in model.named_parameters() if ".router." not in n}
    src_model, _, _ = load_run(dense_run)
    src = load_optimizer_state(dense_run, src_model)
    assert torch.equal(optim["blocks.0.attn.wq.weight"]["exp_avg"], src["blocks.0.attn.wq.weight"]["exp_avg"])
    assert torch.equal(optim["blocks.1.ffn.experts.w_up_EDF"]["exp_avg_sq"][3],
                       src["blocks.1.ffn.w_up.weight"]["exp_avg_sq"].t())

    out = tmp_path / "stage2"
    assert cli(["train", "--from", str(up), "--out", str(out), "--no-progress",
                *data_and_train(parl_subset, max_steps=2, init_optimizer="true", schedule_start=4)]) == 0
    steps = steps_of(out)
    assert steps["blocks.0.attn.wq.weight"] == 6.0 and steps["blocks.1.ffn.experts.w_up_EDF"] == 6.0
    assert steps["blocks.1.ffn.router.weight_ED"] == 2.0        # new: started fresh
    fresh = tmp_path / "fresh"
    assert cli(["train", "--from", str(up), "--out", str(fresh), "--no-progress",
                *data_and_train(parl_subset, max_steps=2)]) == 0
    assert steps_of(fresh)["blocks.0.attn.wq.weight"] == 2.0    # the default: a fresh optimizer


def test_grow_carries_the_state_and_no_optimizer_leaves_it(dense_run, tmp_path, capsys):
    assert cli(["grow", str(dense_run), "--n-layers", "3", "--out", str(tmp_path / "g")]) == 0
    assert "AdamW state carried (step 4)" in capsys.readouterr().out
    model, _, _ = load_run(tmp_path / "g")
    optim = load_optimizer_state(tmp_path / "g", model)
    assert "blocks.2.attn.wq.weight" in optim and "blocks.1.attn.wq.weight" not in optim   # new block 1
    assert cli(["grow", str(dense_run), "--n-layers", "3", "--no-optimizer", "--out",
                str(tmp_path / "g2")]) == 0
    assert "AdamW state" not in capsys.readouterr().out
    assert not (tmp_path / "g2" / OPTIMIZER).exists()


def test_init_optimizer_without_state_or_source_is_one_line(dense_run, parl_subset, tmp_path, capsys):
    assert cli(["upcycle", str(dense_run), "--experts", "4", "--no-optimizer", "--out",
                str(tmp_path / "u")]) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    assert cli(["train", "--from", str(tmp_path / "u"), "--out", str(out), "--no-progress",
                *data_and_train(parl_subset, max_steps=2, init_optimizer="true")]) == 2
    one_line_error(capsys, "train.init_optimizer=true", "holds no AdamW state")
    assert not out.exists()
    assert cli(["train", "--out", str(out), "--no-progress", "--set", "train.init_optimizer=true"]) == 2
    one_line_error(capsys, "train.init_optimizer=true needs --from SRC")
    (tmp_path / "u" / OPTIMIZER).write_bytes(b"not safetensors")
    assert cli(["train", "--from", str(tmp_path / "u"), "--out", str(out), "--no-progress",
                *data_and_train(parl_subset, max_steps=2, init_optimizer="true")]) == 2
    one_line_error(capsys, "optimizer.safetensors", "is unreadable")


def test_a_continued_schedule_goes_on_where_the_last_stage_stopped():
    whole = TrainConfig(lr=1.0, warmup_steps=10, max_steps=100, min_lr_ratio=0.1)
    stage = TrainConfig(lr=1.0, warmup_steps=10, max_steps=40, min_lr_ratio=0.1, schedule_start=60,
                        decay_steps=100)
    assert [lr_at(s, stage) for s in range(40)] == [lr_at(60 + s, whole) for s in range(40)]
    tail = TrainConfig(lr=1.0, warmup_steps=10, max_steps=40, min_lr_ratio=0.1, schedule_start=60)
    assert [lr_at(s, tail) for s in range(40)] == [lr_at(60 + s, whole) for s in range(40)]   # ends at 100
    assert lr_at(0, TrainConfig(lr=1.0, warmup_steps=10, max_steps=40)) < 0.2 < lr_at(0, tail)   # no re-warm


def test_eval_at_start_logs_where_the_curve_starts(dense_run, parl_subset, tmp_path):
    import json
    out = tmp_path / "run"
    assert cli(["train", "--from", str(dense_run), "--out", str(out), "--no-progress",
                *data_and_train(parl_subset, max_steps=2, eval_at_start="true", init_optimizer="true",
                                schedule_start=4)]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [(r["step"], r["loss/val"]) for r in rows if "loss/val" in r]
    src = [json.loads(x) for x in (dense_run / "metrics.jsonl").read_text().splitlines()]
    assert vals[0][0] == 0 and vals[-1][0] == 2
    assert vals[0][1] == pytest.approx([r["loss/val"] for r in src if "loss/val" in r][-1], abs=1e-4)


def test_a_lora_run_upcycles_without_state_and_no_stale_state_is_left(dense_run, parl_subset, tmp_path,
                                                                       capsys):
    lora = tmp_path / "lora"
    assert cli(["train", "--from", str(dense_run), "--out", str(lora), "--no-progress",
                "--set", "finetune.lora_rank=4", "--set", "finetune.lora_targets=[\"attention\"]",
                *data_and_train(parl_subset, max_steps=2)]) == 0
    up = tmp_path / "up"
    assert cli(["upcycle", str(dense_run), "--experts", "4", "--out", str(up)]) == 0
    assert (up / OPTIMIZER).exists()
    capsys.readouterr()
    # the same --out again from the LoRA run: its adapters' state does not map; none is left
    assert cli(["upcycle", str(lora), "--experts", "4", "--out", str(up)]) == 0
    assert "AdamW state" not in capsys.readouterr().out
    assert not (up / OPTIMIZER).exists()


def test_a_damaged_optimizer_file_is_one_line(dense_run, parl_subset, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    up = tmp_path / "up"
    assert cli(["upcycle", str(dense_run), "--experts", "4", "--out", str(up)]) == 0
    flat = load_file(str(up / OPTIMIZER))
    flat["blocks.0.attn.wq.weight:exp_avg"][0, 0] = float("nan")
    save_file(flat, str(up / OPTIMIZER))
    capsys.readouterr()
    out = tmp_path / "run"
    assert cli(["train", "--from", str(up), "--out", str(out), "--no-progress",
                *data_and_train(parl_subset, max_steps=2, init_optimizer="true")]) == 2
    one_line_error(capsys, "optimizer.safetensors", "'blocks.0.attn.wq.weight' has non-finite moments")
    assert not out.exists()
