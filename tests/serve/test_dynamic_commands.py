"""Every command that reads or transforms a model, on tiny trained runs with a dynamic number of
experts per token (model.moe.dynamic_k top_p, null, relu): moekit's own export keeps the model
exactly (the budget controller's knob and the null experts' rows included); generate, eval and
report read it; compress (quantize, prune, merge, distill), grow and extract work; what cannot
hold it (a Hugging Face export, growing top_p or null experts) refuses in one line and writes
nothing; the source run is never modified."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from moekit.cli.main import main as cli
from moekit.config import RunConfig
from moekit.moe.dynamic import initial_control
from moekit.store.run_dir import load_run
from moekit.train.trainer import train

from .test_compress_cli import digest, one_line_error

MODES = {"top_p": dict(dynamic_k="top_p", target_k=2),
         "null": dict(dynamic_k="null", num_null_experts=2, target_k=1),
         "relu": dict(dynamic_k="relu", target_k=2)}
HF_ALL = "llama, mistral, qwen2, qwen3, mixtral, qwen2_moe, olmoe, qwen3_moe"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """120 short documents of two made-up languages, each tagged (de, en)."""
    rng = random.Random(0)
    words = {"de": "der die das und ist nicht ein eine zu von mit dem den auf für sich".split(),
             "en": "the and is not a an to of with on for it this that we you they".split()}
    rows = [{"text": " ".join(rng.choice(words[tag]) for _ in range(60)), "tag": tag}
            for tag in ("de", "en") * 60]
    path = tmp_path_factory.mktemp("corpus") / "two.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """{mode: a run of 4 steps}: 2 MoE layers of 4 experts, a budget controller (target_k)."""
    root = tmp_path_factory.mktemp("dynamic")
    out = {}
    for mode, moe in MODES.items():
        raw = {"data": {"corpus": str(corpus), "vocab_size": 300, "seq_len": 16},
               "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64,
                         "moe": {"d_ff": 32, "num_experts": 4, "top_k": 2, **moe}},
               "train": {"batch_size": 4, "max_steps": 4, "eval_every": 4, "eval_batches": 1, "log_every": 2,
                         "save_every": 1000}}
        train(RunConfig.from_dict(raw), root / mode, progress=False)
        out[mode] = root / mode
    return out


def tokens(n=12):
    return torch.randint(0, 300, (2, n), generator=torch.Generator().manual_seed(5))


def logits_of(model, x=None):
    with torch.no_grad():
        return model.eval()(tokens() if x is None else x).logits


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", sorted(MODES))
def test_moekit_export_keeps_the_dynamic_model_exactly(runs, tmp_path, capsys, mode):
    before = digest(runs[mode])
    assert cli(["export", str(runs[mode]), "--out", str(tmp_path / "x")]) == 0
    src, _, _ = load_run(runs[mode])
    out, _, cfg = load_run(tmp_path / "x")
    assert cfg.model.moe == src.cfg.moe and out.cfg.moe.dynamic_k == mode
    a, b = src.state_dict(), out.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    moved = [float(layer.router.k_control) != initial_control(src.cfg.moe)
             for layer in src.moe_layers().values()]
    assert any(moved)                                  # the controller moved the knob: its value travels
    if mode == "null":
        assert all(layer.router.null_ND.shape == (2, 32) for layer in out.moe_layers().values())
    assert torch.equal(logits_of(out), logits_of(src))
    assert digest(runs[mode]) == before
    capsys.readouterr()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_hugging_face_export_is_refused_in_one_line(runs, tmp_path, capsys, mode):
    before = digest(runs[mode])
    assert cli(["export", str(runs[mode]), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"moekit export: error: export to Hugging Face: dynamic_k={mode!r} (a dynamic number of "
                   f"experts per token) has no equivalent in any Hugging Face model type ({HF_ALL}); "
                   "export a fixed top-k model (dynamic_k='none'), or keep moekit's own format (moekit "
                   "export RUN)")
    assert not (tmp_path / "hf").exists() and digest(runs[mode]) == before


@pytest.mark.parametrize("mode", sorted(MODES))
def test_generate_eval_and_report_read_a_dynamic_run(runs, tmp_path, capsys, mode):
    before = digest(runs[mode])
    argv = ["generate", str(runs[mode]), "--prompt", "der die", "--prompt", "the and",
            "--max-new-tokens", "8", "--temperature", "0"]
    assert cli(argv) == 0
    cached = capsys.readouterr().out
    assert cli(argv + ["--no-cache"]) == 0
    assert capsys.readouterr().out == cached and cached.count("der die") == 1
    assert cli(["eval", str(runs[mode]), "--batches", "2"]) == 0
    assert math.isfinite(last_json(capsys)["val_loss"])
    assert cli(["report", str(runs[mode]), "--windows", "8", "--out", str(tmp_path / "r.html")]) == 0
    assert "experts per token" in capsys.readouterr().out and (tmp_path / "r.html").stat().st_size > 0
    assert digest(runs[mode]) == before


def val_loss(capsys, run_dir) -> float:
    assert cli(["eval", str(run_dir), "--batches", "2"]) == 0
    return last_json(capsys)["val_loss"]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_quantize_prune_and_merge_a_dynamic_run(runs, tmp_path, capsys, mode):
    before = digest(runs[mode])
    src, _, _ = load_run(runs[mode])
    original = val_loss(capsys, runs[mode])
    for argv, experts in ((["--method", "quantize", "--bits", "8", "--group-size", "16"], 4),
                          (["--method", "prune", "--experts", "3"], 3),
                          (["--method", "prune", "--experts", "2", "--prune-by", "usage"], 2),
                          (["--method", "merge", "--experts", "2"], 2)):
        out = tmp_path / f"{argv[1]}{experts}"
        assert cli(["compress", str(runs[mode]), "--out", str(out), *argv]) == 0, argv
        info = last_json(capsys)
        small, _, cfg = load_run(out)
        m = small.cfg.moe
        assert (m.dynamic_k, m.num_experts, m.target_k) == (mode, experts, src.cfg.moe.target_k)
        assert cfg.model.moe == m
        for i, layer in small.moe_layers().items():        # the knob, the null rows: as they were
            old = src.moe_layers()[i].router
            assert torch.equal(layer.router.k_control, old.k_control)
            if mode == "null":
                assert torch.equal(layer.router.null_ND, old.null_ND)
        loss = val_loss(capsys, out)
        assert math.isfinite(loss)
        if info["method"] == "quantize":                   # experts only: close to the float model
            assert abs(loss - original) < 0.01 and small.cfg.quant["bits"] == 8
    assert digest(runs[mode]) == before


@pytest.mark.parametrize("mode", sorted(MODES))
def test_grow_a_dynamic_run(runs, tmp_path, capsys, mode):
    before = digest(runs[mode])
    src, _, _ = load_run(runs[mode])
    grow = ["grow", str(runs[mode]), "--d-model", "64", "--n-layers", "3", "--out", str(tmp_path / "w")]
    assert cli(grow) == 0
    assert "the source function at step 0" in capsys.readouterr().out
    wide, _, _ = load_run(tmp_path / "w")
    torch.testing.assert_close(logits_of(wide), logits_of(src), atol=1e-4, rtol=1e-4)
    code = cli(["grow", str(runs[mode]), "--experts", "8", "--out", str(tmp_path / "e")])
    if mode == "relu":                                  # rows / c: the copies' gates sum to the source's
        assert code == 0 and "the source function at step 0" in capsys.readouterr().out
        big, _, _ = load_run(tmp_path / "e")
        assert big.cfg.moe.num_experts == 8 and big.cfg.moe.target_k == 2
        torch.testing.assert_close(logits_of(big), logits_of(src), atol=1e-4, rtol=1e-4)
    else:
        assert code == 2
        one_line_error(capsys, f"grow_experts: model.moe.dynamic_k={mode!r} ",
                       "(a different function); grow the experts of a dynamic_k='none' or 'relu' model")
        assert not (tmp_path / "e").exists()
    assert digest(runs[mode]) == before


@pytest.mark.parametrize("mode", sorted(MODES))
def test_extract_a_tag_from_a_dynamic_run(runs, tmp_path, capsys, mode):
    before = digest(runs[mode])
    out = tmp_path / "de"
    assert cli(["extract", str(runs[mode]), "--task", "de", "--min-share", "0.2", "--out", str(out)]) == 0
    result = last_json(capsys)
    assert not result["exact"] and math.isfinite(result["max_abs_logit_diff"])
    small, _, _ = load_run(tmp_path / "de")
    assert small.cfg.moe.dynamic_k == mode and small.cfg.moe.num_experts == result["experts"]["extracted"]
    assert math.isfinite(val_loss(capsys, tmp_path / "de"))
    assert digest(runs[mode]) == before


def test_distill_from_a_dynamic_teacher_into_dense_and_dynamic_students(runs, tmp_path, capsys):
    teacher = runs["top_p"]
    before = digest(teacher)
    common = ["--set", "train.max_steps=2", "--set", "train.log_every=1", "--set", "train.eval_every=2",
              "--no-progress"]
    argv = ["compress", str(teacher), "--method", "distill"]
    assert cli([*argv, "--out", str(tmp_path / "dense"), *common]) == 0
    assert load_run(tmp_path / "dense")[0].cfg.moe is None          # the default: the dense baseline
    # --set model.moe.*: an MoE student of the teacher's architecture, here with relu routing
    assert cli(["compress", str(teacher), "--method", "distill", "--out", str(tmp_path / "relu"), *common,
                "--set", "model.moe.dynamic_k=relu", "--set", "model.moe.target_k=1.5"]) == 0
    student, _, _ = load_run(tmp_path / "relu")
    teacher_model, _, _ = load_run(teacher)
    m = student.cfg.moe
    assert (m.dynamic_k, m.target_k, m.num_experts, m.d_ff) == ("relu", 1.5, 4, teacher_model.cfg.moe.d_ff)
    rows = [json.loads(x) for x in (tmp_path / "relu" / "metrics.jsonl").read_text().splitlines()]
    parts = {k for r in rows for k in r if k.startswith("loss/")}
    assert {"loss/soft", "loss/sparsity", "loss/lm"} <= parts        # the student's L1 penalty trains too
    assert all(math.isfinite(r["loss/soft"]) for r in rows if "loss/soft" in r)
    # another mode drops the teacher's mode fields (its target_k=2 would be refused under "none")
    assert cli([*argv, "--out", str(tmp_path / "fixed"), *common, "--set", "model.moe.dynamic_k=none"]) == 0
    m = load_run(tmp_path / "fixed")[0].cfg.moe
    assert (m.dynamic_k, m.target_k, m.top_k) == ("none", None, teacher_model.cfg.moe.top_k)
    assert digest(teacher) == before
    capsys.readouterr()
