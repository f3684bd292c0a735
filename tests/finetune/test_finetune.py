"""moekit finetune: a run of the one engine on a task, with freezing, ESFT and LoRA; every
output a normal run dir (eval, report, export, resume)."""

import json

import pytest
import torch

from moekit.cli.main import main as cli
from moekit.store.checkpoint import Checkpoint
from moekit.store.run_dir import load_run

from ..train.test_faults import one_line_error


@pytest.fixture(scope="module")
def lang_task(parl_subset, tmp_path_factory):
    """Language identification on real speeches: {"text": first 160 chars, "label": language}."""
    path = tmp_path_factory.mktemp("task") / "lang.jsonl"
    rows = [json.loads(line) for line in parl_subset.read_text().splitlines()]
    path.write_text("".join(json.dumps({"text": r["text"][:160], "label": r["tag"]}) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def src(parl_subset, tmp_path_factory):
    run = tmp_path_factory.mktemp("src") / "run"
    sets = {"data.corpus": f'"{parl_subset}"', "data.vocab_size": 512, "data.seq_len": 32,
            "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 2, "model.d_ff": 128,
            "model.moe.d_ff": 32, "model.moe.num_experts": 4, "train.batch_size": 8, "train.max_steps": 6,
            "train.eval_every": 1000, "train.eval_batches": 1}
    assert cli(["train", "--out", str(run), "--no-progress",
                *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]) == 0
    return run


def finetune(src, task, out, *sets, steps=6, stop_at=None):
    base = {"train.max_steps": steps, "train.batch_size": 8, "train.eval_every": 3,
            "train.eval_batches": 1, "train.log_every": 1, "train.save_every": 3,
            "finetune.eval_examples": 16, "data.seq_len": 48}
    pairs = [*(f"{k}={v}" for k, v in base.items()), *sets]
    argv = ["finetune", str(src), "--task", str(task), "--out", str(out), "--no-progress",
            *[a for s in pairs for a in ("--set", s)]]
    return cli(argv + (["--stop-at", str(stop_at)] if stop_at else []))


def weights(run):
    model, _, _ = load_run(run)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_finetune_logs_accuracy_and_is_a_run_dir(src, lang_task, tmp_path, capsys):
    out = tmp_path / "ft"
    assert finetune(src, lang_task, out) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "acc/val" in r]
    assert [r["step"] for r in val] == [3, 6] and "acc/test" in val[-1]
    assert 0.0 <= val[-1]["acc/test"] <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scores"]["acc/test"] == val[-1]["acc/test"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["dropout"] == 0.1 and cfg["model"]["moe"]["expert_dropout"] == 0.4   # the recipe
    assert cfg["train"]["init_from"] == str(src) and cfg["data"]["task"] == str(lang_task)
    capsys.readouterr()
    assert cli(["eval", str(out)]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["test_accuracy"] == pytest.approx(val[-1]["acc/test"])
    assert cli(["report", str(out)]) == 0 and (out / "report.html").exists()


def test_resume_is_exact(src, lang_task, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert finetune(src, lang_task, whole, "finetune.freeze=esft") == 0
    assert finetune(src, lang_task, parts, "finetune.freeze=esft", stop_at=3) == 0
    assert cli(["finetune", "--resume", str(parts), "--no-progress"]) == 0
    a, b = weights(whole), weights(parts)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((whole / "config.json").read_text())["finetune"]["esft_experts"] == \
        json.loads((parts / "config.json").read_text())["finetune"]["esft_experts"]


def test_resume_reads_the_runs_own_cache_not_the_moved_file(src, lang_task, tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text(lang_task.read_text())
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert finetune(src, task, whole) == 0
    assert finetune(src, task, parts, stop_at=3) == 0
    task.write_text('{"prompt": "other", "completion": " data"}\n' * 40)   # changed after the start
    assert cli(["finetune", "--resume", str(parts), "--no-progress"]) == 0
    a, b = weights(whole), weights(parts)
    assert all(torch.equal(a[k], b[k]) for k in a)
    task.unlink()                                                         # or gone
    assert cli(["eval", str(parts)]) == 0


def test_esft_trains_only_the_chosen_experts(src, lang_task, tmp_path):
    out = tmp_path / "esft"
    assert finetune(src, lang_task, out, "finetune.freeze=esft", "finetune.esft_share=0.4") == 0
    saved = json.loads((out / "config.json").read_text())["finetune"]["esft_experts"]
    chosen = {int(k): v for k, v in saved.items()}
    assert chosen and all(0 < len(v) < 4 for v in chosen.values())
    before, after = weights(src), weights(out)
    for k in before:
        layer = int(k.split(".")[1]) if k.startswith("blocks.") else None
        if ".experts." in k and layer in chosen:
            for e in range(4):
                same = torch.equal(before[k][e], after[k][e])
                assert same == (e not in chosen[layer]), (k, e)  # chosen rows move, the rest stay bit-equal
        else:
            assert torch.equal(before[k], after[k]), k                # everything else is frozen


@pytest.mark.parametrize("freeze, frozen, trained", [
    ("router", [".router."], [".experts.", ".attn."]),
    ("moe", [".router.", ".experts."], [".attn.", "embed"]),
    ("non_expert", [".attn.", "embed", "norm"], [".experts.", ".router."]),
])
def test_freeze_groups(src, lang_task, tmp_path, freeze, frozen, trained):
    out = tmp_path / freeze
    assert finetune(src, lang_task, out, f"finetune.freeze={freeze}", "train.weight_decay=0.1") == 0
    before, after = weights(src), weights(out)
    for k in before:
        if any(f in k for f in frozen):
            assert torch.equal(before[k], after[k]), k
        if any(t in k for t in trained) and k.endswith(("weight", "_EDF", "_EFD", "weight_ED")):
            assert not torch.equal(before[k], after[k]), k


def test_lora_reaches_every_expert_and_merges_on_export(src, lang_task, tmp_path):
    out = tmp_path / "lora"
    assert finetune(src, lang_task, out, "finetune.lora_rank=4", "finetune.lora_targets=experts") == 0
    keys = Checkpoint(out).model_state({}).keys()            # the run keeps base weights and adapters
    assert any(k.endswith("experts.parametrizations.w_up_EDF.0.B") for k in keys)
    before, merged = weights(src), weights(out)               # load_run merges the adapters
    assert set(before) == set(merged)
    for k in before:
        if ".experts." in k:
            for e in range(4):                                # every expert's slice moved
                assert not torch.equal(before[k][e], merged[k][e]), (k, e)
        else:
            assert torch.equal(before[k], merged[k]), k
    exp = tmp_path / "lora-export"
    assert cli(["export", str(out), "--out", str(exp)]) == 0
    exported = weights(exp)
    assert all(torch.equal(exported[k], merged[k]) for k in merged)


def test_lora_also_trains_the_embeddings_beside_the_adapters(src, lang_task, tmp_path):
    out = tmp_path / "lora-embed"
    assert finetune(src, lang_task, out, "finetune.lora_rank=4", "finetune.lora_also=embeddings") == 0
    before, after = weights(src), weights(out)
    assert not torch.equal(before["embed.weight"], after["embed.weight"])
    assert torch.equal(before["norm.weight"], after["norm.weight"])            # not asked for
    assert not torch.equal(before["blocks.0.attn.wq.weight"], after["blocks.0.attn.wq.weight"])  # merged


@pytest.mark.parametrize("sets, needles", [
    (["finetune.lora_rank=0"], ["lora_rank", ">= 1"]),
    (["finetune.freeze=everything"], ["freeze", "esft"]),
    (["finetune.freeze=esft", "finetune.esft_experts={}"], ["nothing to train"]),
    (["finetune.lora_rank=4", "finetune.freeze=router"], ["LoRA"]),
    (["finetune.lora_also=embeddings"], ["lora_also", "needs LoRA"]),
    (["finetune.freeze=esft", "finetune.esft_experts={1=[9]}"], ["esft_experts[1]", "experts 0..3"]),
    (["finetune.freeze=esft", "finetune.esft_experts={5=[1]}"], ["layer 5", "MoE layers are [0, 1]"]),
    (["finetune.esft_experts={1=[1]}"], ["esft_experts", "freeze='esft'"]),
    (["finetune.lora_rank=4", "finetune.lora_also=heads"], ["lora_also", "embeddings"]),
])
def test_bad_finetune_settings_leave_nothing(src, lang_task, tmp_path, capsys, sets, needles):
    out = tmp_path / "bad"
    capsys.readouterr()
    assert finetune(src, lang_task, out, *sets) != 0
    one_line_error(capsys, *needles)
    assert not out.exists()


def test_finetune_needs_src_task_and_out(lang_task, src, tmp_path, capsys):
    assert cli(["finetune", str(src), "--out", str(tmp_path / "x")]) != 0
    one_line_error(capsys, "--task")
    assert cli(["finetune", "--task", str(lang_task), "--out", str(tmp_path / "x")]) != 0
    one_line_error(capsys, "SRC")
    missing = str(tmp_path / "none.jsonl")
    assert cli(["finetune", str(src), "--task", missing, "--out", str(tmp_path / "x")]) != 0
    one_line_error(capsys, "none.jsonl")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("tie", [True, False])
def test_lora_also_logs_the_parameters_that_train(tie, caplog):
    """One line, one count: adapters + the groups trained in full = what requires grad (a tied
    embedding once)."""
    import logging

    from moekit.config import FinetuneConfig
    from moekit.finetune.adapt import apply
    from moekit.model.config import ModelConfig
    from moekit.model.transformer import MoETransformer
    model = MoETransformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, tie_embeddings=tie))
    cfg = FinetuneConfig(lora_rank=2, lora_also=["embeddings"])
    with caplog.at_level(logging.INFO, logger="moekit"):
        apply(model, cfg)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("LoRA rank 2"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    embeddings = 64 * 32 * (1 if tie else 2)
    adapters = trainable - embeddings
    assert adapters > 0
    assert f"trainable: {adapters:,} adapter parameters + {embeddings:,} of embeddings in full = " \
           f"{trainable:,} of" in line, line


def test_a_label_longer_than_the_window_is_refused_before_training(src, parl_subset, tmp_path, capsys):
    """It trained, then failed at the first accuracy in Python's terms, leaving the run behind."""
    rows = [json.loads(line) for line in parl_subset.read_text().splitlines()][:60]
    long = "Herr Präsident " * 40
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"text": r["text"][:80], "label": long if i % 2 else "short"}) + "\n"
                            for i, r in enumerate(rows)))
    out = tmp_path / "ft"
    assert finetune(src, path, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokens, and data.seq_len=48 leaves no room for its prompt" in err[0], err
    assert not out.exists()
