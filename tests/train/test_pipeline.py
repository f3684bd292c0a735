"""moekit pipeline: train, grow, train, upcycle, train as one run that carries the AdamW state
and one LR schedule across stages, survives kill -9 anywhere, and refuses bad stage tables
before anything trains."""

import json
import subprocess
import sys
import time

import pytest

from moekit.cli.main import main as cli
from moekit.config import TrainConfig
from moekit.store.checkpoint import Checkpoint
from moekit.store.run_dir import load_run
from moekit.train.optim import lr_at

from .test_faults import one_line_error

STAGES = (4, 24, 3)
TWO = "[[stage]]\nsteps = 2\n[[stage]]\nsteps = 2\n"     # a second stage's table follows


def recipe(corpus, steps=STAGES, extra: str = "") -> str:
    return f"""
[data]
corpus = "{corpus}"
vocab_size = 512
seq_len = 32
[train]
batch_size = 4
eval_every = 2
eval_batches = 1
log_every = 1
save_every = 2
lr = 1e-2
warmup_steps = 3
[model]
moe = false
d_model = 32
n_layers = 2
n_heads = 2
d_ff = 64
{extra}
[[stage]]
name = "small"
steps = {steps[0]}
[[stage]]
name = "grow"
grow = {{ d_model = 64, n_layers = 3, n_heads = 4 }}
steps = {steps[1]}
[[stage]]
name = "moe"
upcycle = {{ experts = 4, top_k = 2 }}
steps = {steps[2]}
"""


def rows_of(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def whole(parl_subset, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    (root / "r.toml").write_text(recipe(parl_subset))
    assert cli(["pipeline", "--config", str(root / "r.toml"), "--out", str(root / "out"),
                "--no-progress"]) == 0
    return root


def test_stages_continue_one_run(whole):
    out = whole / "out"
    info = json.loads((out / "pipeline.json").read_text())
    small, grown, moe = info["stages"]
    assert [s["steps"] for s in info["stages"]] == list(STAGES) and info["steps"] == sum(STAGES)
    # grow and upcycle are exact: each stage starts where the last one ended
    assert grown["val_start"] == pytest.approx(small["val_final"], abs=2e-4)
    assert moe["val_start"] == pytest.approx(grown["val_final"], abs=2e-4)
    rows = rows_of(out / "metrics.jsonl")
    trained = [r["step"] for r in rows if "loss/lm" in r]
    assert trained == list(range(1, sum(STAGES) + 1))            # every step once, on one axis
    assert [(r["step"], r["stage/name"]) for r in rows if "stage/index" in r] == [
        (0, "small"), (4, "grow"), (28, "moe")]
    # one schedule: each step's LR is the whole run's schedule at that step
    whole_cfg = TrainConfig(lr=1e-2, warmup_steps=3, max_steps=sum(STAGES))
    for r in rows:
        if "optim/lr" in r:
            assert r["optim/lr"] == pytest.approx(lr_at(r["step"] - 1, whole_cfg), rel=1e-6), r["step"]
    # the AdamW state went on: the attention's step count is the whole run's
    model, _, _ = load_run(out / "stages" / "3-moe")
    steps = Checkpoint(out / "stages" / "3-moe").optimizer_state(dict(model.named_parameters()))
    assert float(steps["blocks.0.attn.wq.weight"]["step"]) == sum(STAGES)
    assert float(steps["blocks.0.ffn.router.weight_ED"]["step"]) == STAGES[2]
    # DIR is the final model for every command that reads one, and its report marks the stages
    final, _, _ = load_run(out)
    assert final.cfg.moe.num_experts == 4 and final.cfg.d_model == 64 and final.cfg.n_layers == 3
    assert cli(["report", str(out)]) == 0
    assert "Stages (moekit pipeline" in (out / "report.html").read_text()


def test_kill_9_mid_stage_then_rerun_gives_the_same_run(whole, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "moekit", "pipeline", "--config", str(whole / "r.toml"), "--out", str(out),
           "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "stages" / "2-grow" / "checkpoint.pt"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None and not ckpt.exists():
            time.sleep(0.02)
        assert proc.poll() is None, "the pipeline ended before the kill"
        proc.kill()                                     # SIGKILL in stage 2, after its first save
    finally:
        proc.wait()
    assert not (out / "pipeline.json").exists()
    assert cli(["pipeline", "--config", str(whole / "r.toml"), "--out", str(out), "--no-progress"]) == 0
    want, got = rows_of(whole / "out" / "metrics.jsonl"), rows_of(out / "metrics.jsonl")
    assert [r["step"] for r in got if "loss/lm" in r] == list(range(1, sum(STAGES) + 1))
    key = "loss/val"
    assert [(r["step"], round(r[key], 5)) for r in got if key in r] == [
        (r["step"], round(r[key], 5)) for r in want if key in r]      # exactly the uninterrupted run


@pytest.mark.parametrize("extra, stages, needle", [
    ("", "", "no [[stage]] tables"),
    ("", "[[stage]]\nsteps = 0\n", "stage 1 (stage1): steps=0 must be an integer >= 1"),
    ("", "[[stage]]\nsteps = 2\nlr = 1\n", "stage 1: 'lr' is not a stage field"),
    ("", "[[stage]]\nsteps = 2\n[[stage]]\nsteps = 2\ngrow = { n_layers = 3 }\nupcycle = { experts = 4, "
         "top_k = 2 }\n", "stage 2 (stage2): grow and upcycle in one stage"),
    ("", "[[stage]]\nsteps = 2\n[[stage]]\nsteps = 2\ngrow = { d_model = 48 }\n",
     "stage 2 (stage2): grow: d_model=48 is not a multiple of 32"),
    ("", "[[stage]]\nsteps = 2\n[[stage]]\nsteps = 2\ngrow = { depth = 3 }\n",
     "stage 2 (stage2): grow: 'depth' is not one of its arguments"),
    ("", "[[stage]]\nsteps = 2\n[[stage]]\nsteps = 2\nupcycle = { experts = 4 }\n",
     "needs experts and top_k"),
    ("", "[[stage]]\nsteps = 2\ngrow = { n_layers = 3 }\n", "at the first stage needs a model to transform"),
    ("", "[[stage]]\nsteps = 2\n[[stage]]\nsteps = 2\nupcycle = { experts = 2, top_k = 4 }\n",
     "2 experts are fewer than top_k=4"),
    ("max_steps = 5", "[[stage]]\nsteps = 2\n", "train.max_steps is set by the pipeline"),
    ('seed = "abc"', "[[stage]]\nsteps = 2\n", "train.seed='abc': must be an integer"),
    ("", "[[stage]]\nsteps = 2\n[[stage]]\nsteps = 2\nupcycle = { experts = 4, top_k = 2, methd = 'drop' }\n",
     "upcycle: 'methd' is not one of its arguments (experts, top_k, method,"),
    ("", "[[stage]]\nsteps = 2\n[[stage]]\nsteps = 2\nupcycle = { experts = 4, top_k = 2, seed = 'x' }\n",
     "upcycle: seed='x' must be an integer"),
    ("", TWO + "upcycle = { experts = 4, top_k = 2, num_experts = 8 }\n",
     "upcycle has both experts and num_experts"),
    ("", TWO + "upcycle = { experts = 4, top_k = 2, shared_from_ffn = 'yes' }\n",
     "shared_from_ffn='yes' must be true or false"),
])
def test_bad_stage_tables_are_one_line_before_anything_is_written(parl_subset, tmp_path, capsys, extra,
                                                                   stages, needle):
    text = recipe(parl_subset).split("[[stage]]")[0]
    text = text.replace("warmup_steps = 3", f"warmup_steps = 3\n{extra}") + stages
    (tmp_path / "r.toml").write_text(text)
    assert cli(["pipeline", "--config", str(tmp_path / "r.toml"), "--out", str(tmp_path / "out")]) == 2
    one_line_error(capsys, needle)
    assert not (tmp_path / "out").exists()


def test_a_missing_corpus_or_a_file_as_out_is_one_line_and_the_fixed_recipe_then_runs(parl_subset, tmp_path,
                                                                                       capsys):
    (tmp_path / "bad.toml").write_text(recipe(tmp_path / "nope.jsonl", steps=(2, 2, 2)))
    out = tmp_path / "out"
    assert cli(["pipeline", "--config", str(tmp_path / "bad.toml"), "--out", str(out)]) == 2
    one_line_error(capsys, "nope.jsonl")
    assert not out.exists()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "good.toml").write_text(recipe(parl_subset, steps=(2, 2, 2)))
    assert cli(["pipeline", "--config", str(tmp_path / "good.toml"), "--out", str(tmp_path / "afile")]) == 2
    one_line_error(capsys, "--out", "is a file")


def test_an_experts_stage_grows_the_most_loaded_experts_from_the_run_log(parl_subset, tmp_path):
    text = recipe(parl_subset).split("[[stage]]")[0].replace("moe = false\n", "")
    text += ("[model.moe]\nd_ff = 32\nnum_experts = 4\ntop_k = 2\n[[stage]]\nname = \"moe4\"\nsteps = 3\n"
             "[[stage]]\nname = \"moe8\"\nsteps = 2\n"
             "experts = { num_experts = 8, which = \"most_loaded\" }\n")
    (tmp_path / "r.toml").write_text(text)
    assert cli(["pipeline", "--config", str(tmp_path / "r.toml"), "--out", str(tmp_path / "out"),
                "--no-progress"]) == 0
    final, _, _ = load_run(tmp_path / "out")
    assert final.cfg.moe.num_experts == 8
    info = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    assert info["stages"][1]["val_start"] is not None


def test_an_existing_pipeline_continues_only_with_its_recipe(whole, parl_subset, tmp_path, capsys):
    (tmp_path / "other.toml").write_text(recipe(parl_subset, steps=(4, 24, 5)))
    assert cli(["pipeline", "--config", str(tmp_path / "other.toml"), "--out", str(whole / "out")]) == 2
    one_line_error(capsys, "holds a pipeline of another recipe")
