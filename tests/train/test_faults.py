"""What users throw at a run: kills, divergence, bad values, bad places, full disks, reuse."""

import json
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

from moekit.cli.main import main as cli
from moekit.config import RunConfig, TrainConfig
from moekit.train.trainer import train


def small(corpus, max_steps=12, **train_kw):
    return ["--set", f'data.corpus="{corpus}"', "--set", "data.vocab_size=512", "--set", "data.seq_len=32",
            "--set", "model.d_model=64", "--set", "model.n_layers=1", "--set", "model.d_ff=128",
            "--set", "model.moe.d_ff=64", "--set", "model.moe.num_experts=4", "--set", "train.batch_size=4",
            "--set", "train.eval_batches=1", "--set", f"train.max_steps={max_steps}",
            "--set", "train.log_every=1", "--set", "train.warmup_steps=2",
            *[a for k, v in train_kw.items() for a in ("--set", f"train.{k}={v}")]]


def steps_logged(run_dir, key="loss/lm"):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if key in r]


def tensorboard_steps(run_dir, tag="loss/lm"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


def test_resume_after_kill_9_logs_every_step_once(tmp_path, parl_subset):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "moekit", "train", "--out", str(run), "--no-progress",
           *small(parl_subset, max_steps=400, save_every=4, eval_every=1000)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:           # kill -9 once two steps past the first checkpoint
        if (run / "metrics.jsonl").exists() and max(steps_logged(run) or [0]) >= 6:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = json.loads(torch.load(run / "checkpoint.pt", weights_only=False)["meta"])["step"]
    assert max(steps_logged(run)) > saved          # the killed run logged past its checkpoint
    assert cli(["train", "--resume", str(run), "--no-progress", "--stop-at", str(saved + 6)]) == 0
    expected = list(range(1, saved + 7))
    assert steps_logged(run) == expected
    assert tensorboard_steps(run) == expected


def test_non_finite_training_stops_with_one_line_and_never_saves_non_finite_weights(tmp_path, parl_subset,
                                                                                     capsys):
    run = tmp_path / "run"
    # lr 1e4 blows the weights up within a few steps; every finite step is saved (save_every=1)
    code = cli(["train", "--out", str(run), "--no-progress",
                *small(parl_subset, max_steps=40, lr=1e4, save_every=1, eval_every=1000)])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("moekit train: error")]
    assert code == 2 and len(errors) == 1, err
    assert "diverged" in errors[0] or "not finite" in errors[0]
    assert "Traceback" not in err
    if (run / "checkpoint.pt").exists():        # what was saved is finite, and readable
        state = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
        step = json.loads(torch.load(run / "checkpoint.pt", weights_only=False)["meta"])["step"]
        assert f"step {step} is intact" in errors[0]
    else:
        assert "no checkpoint was saved yet" in errors[0]


@pytest.mark.parametrize("setting, field", [
    ("train.lr=inf", "train.lr=inf"),
    ("train.lr=-1", "train.lr=-1"),
    ("train.z_loss_coef=nan", "train.z_loss_coef=nan"),
    ("train.aux_loss_coef=nan", "train.aux_loss_coef=nan"),
    ("train.grad_clip=-1", "train.grad_clip=-1"),
    ("train.weight_decay=-0.1", "train.weight_decay=-0.1"),
    ("train.min_lr_ratio=2", "train.min_lr_ratio=2"),
    ("train.warmup_steps=-1", "train.warmup_steps=-1"),
    ("train.max_steps=true", "train.max_steps=True"),
    ("train.max_steps='ten'", "train.max_steps='ten'"),
    ("train.lr='fast'", "train.lr='fast'"),
    ("train.beta1=2", "train.beta1=2"),
    ("train.compile=1", "train.compile=1"),
    ("data.max_docs=-1", "data.max_docs=-1"),
    ("data.max_docs=0", "data.max_docs=0"),
    ("data.corpus=''", "data.corpus=''"),
    ("data.seq_len='long'", "data.seq_len='long'"),
    ("model.d_model='big'", "model.d_model='big'"),
    ("model.moe.top_k=0", "model.moe.top_k=0"),
    ("model.moe_layers='some'", "model.moe_layers='some'"),
])
def test_bad_values_are_one_line_naming_the_field(setting, field, tmp_path, capsys):
    out = tmp_path / "never"
    assert cli(["train", "--out", str(out), "--set", setting]) == 2
    one_line_error(capsys, field)
    assert not out.exists()


def test_windows_longer_than_the_model_are_refused_before_anything_is_written(tmp_path, capsys,
                                                                             parl_subset):
    """Accepted before (data.seq_len 300 on a model of 256 positions): refused up front, also
    before torchrun starts ranks."""
    out = tmp_path / "never"
    sets = ["--set", f'data.corpus="{parl_subset}"', "--set", "data.seq_len=300"]
    for extra in ([], ["--nproc", "2"]):
        assert cli(["train", "--out", str(out), *sets, *extra]) == 2
        one_line_error(capsys, "data.seq_len=300 is more than model.max_seq_len=256: the model has no "
                               "positions past 256; use data.seq_len <= 256 or raise model.max_seq_len")
        assert not out.exists()


def test_a_warmup_longer_than_the_run_is_warned_about(tmp_path, parl_subset, caplog):
    """warmup_steps 100 on a 20-step run (accepted silently before): the run goes on (short runs
    of a longer schedule do this on purpose) with one warning naming the last step's LR."""
    out = tmp_path / "run"
    recipe = [a.replace("train.warmup_steps=2", "train.warmup_steps=100") for a in small(parl_subset, 20)]
    argv = ["train", "--out", str(out), "--no-progress", *recipe]
    with caplog.at_level("WARNING", logger="moekit"):
        assert cli(argv) == 0
    said = [r.getMessage() for r in caplog.records if "warmup_steps=100" in r.getMessage()]
    assert said == ["train.warmup_steps=100 is more than train.max_steps=20: the LR never reaches "
                    "train.lr=0.00155 (the last step's is 0.00031); use warmup_steps <= 20 (unset, it is "
                    "max_steps // 5 = 4)"]


@pytest.mark.parametrize("args, needle", [
    (["train", "--stop-at", "-1"], "--stop-at -1"),
    (["train", "--stop-at", "0"], "--stop-at 0"),
    (["eval", "RUN", "--batches", "0"], "--batches 0"),
    (["eval", "RUN", "--batches", "-1"], "--batches -1"),
    (["generate", "RUN", "--max-new-tokens", "-5"], "--max-new-tokens=-5"),
    (["generate", "RUN", "--temperature", "-1"], "--temperature=-1"),
    (["generate", "RUN", "--top-k", "-2"], "--top-k=-2"),
    (["generate", "RUN", "--top-p", "0"], "--top-p=0.0"),
    (["generate", "RUN", "--top-p", "1.5"], "--top-p=1.5"),
    (["generate", "RUN", "--prompts-file", "/nonexistent/p.txt"], "--prompts-file '/nonexistent/p.txt'"),
    (["train", "--set", "train.lr=1e-3", "--set", "train.lr=2e-3"], "--set train.lr given twice"),
])
def test_bad_flags_are_one_line(args, needle, tmp_path, capsys):
    assert cli([str(tmp_path) if a == "RUN" else a for a in args]) == 2
    one_line_error(capsys, needle)


def test_unwritable_places_are_one_line(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert cli(["train", "--out", str(a_file / "run")]) == 2
    one_line_error(capsys, "cannot write the run directory")
    assert cli(["train", "--out", str(a_file)]) == 2
    one_line_error(capsys, "is a file, not a directory")
    assert cli(["train", "--out", "/proc/moekit-run"]) == 2
    one_line_error(capsys, "cannot write the run directory")
    assert a_file.read_text() == "x"


def test_export_onto_a_file_is_one_line(tmp_path, parl_subset, capsys):
    run = tmp_path / "run"
    assert cli(["train", "--out", str(run), "--no-progress", *small(parl_subset, max_steps=1)]) == 0
    target = tmp_path / "taken"
    target.write_text("mine")
    assert cli(["export", str(run), "--out", str(target)]) == 2
    one_line_error(capsys, "is a file, not a directory")
    assert target.read_text() == "mine"
    assert cli(["export", str(run), "--out", str(target / "sub")]) == 2
    one_line_error(capsys, "cannot write")


def test_a_directory_left_by_another_run_is_refused_and_failures_leave_no_directory(tmp_path, parl_subset,
                                                                                     capsys):
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "tokenizer.json").write_text("{}")            # a killed run's, before its first checkpoint
    (stale / "metrics.jsonl").write_text('{"step": 1}\n')
    assert cli(["train", "--out", str(stale), *small(parl_subset)]) == 2
    one_line_error(capsys, "holds files of another run", "tokenizer.json")
    assert (stale / "tokenizer.json").read_text() == "{}"
    # a run that fails in setup (no validation text at this seq_len) leaves nothing behind
    fresh = tmp_path / "fresh"
    assert cli(["train", "--out", str(fresh), *small(parl_subset), "--set", "data.max_docs=1"]) == 2
    capsys.readouterr()
    assert not fresh.exists()
    empty = tmp_path / "empty"                           # an empty directory stays, emptied again
    empty.mkdir()
    assert cli(["train", "--out", str(empty), *small(parl_subset), "--set", "data.max_docs=1"]) == 2
    assert empty.is_dir() and list(empty.iterdir()) == []


def _limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)    # EFBIG from write() instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_write_that_fails_mid_save_is_one_line_and_leaves_the_last_checkpoint(tmp_path, parl_subset):
    """A real OS write error (the kernel's file-size limit) while writing checkpoint.pt.tmp."""
    run = tmp_path / "run"
    assert cli(["train", "--out", str(run), "--no-progress", *small(parl_subset, max_steps=3)]) == 0
    good = (run / "checkpoint.pt").read_bytes()
    limit = len(good) // 2                              # the next checkpoint cannot be written
    cmd = [sys.executable, "-m", "moekit", "train", "--resume", str(run), "--no-progress",
           "--set", "train.max_steps=5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size(limit))
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1 and "while saving step 5" in errors[0] and "step 3 is intact" in errors[0], errors
    assert (run / "checkpoint.pt").read_bytes() == good
    assert not (run / "checkpoint.pt.tmp").exists()


def test_a_full_disk_during_save_removes_the_partial_file(tmp_path):
    """/dev/full answers every write with ENOSPC: the kernel's own 'no space left on device'."""
    from moekit.store.checkpoint import save_checkpoint
    (tmp_path / "checkpoint.pt").write_bytes(b"previous")
    (tmp_path / "checkpoint.pt.tmp").symlink_to("/dev/full")
    with pytest.raises(OSError, match="No space left on device"):
        save_checkpoint(tmp_path, {"model": {"w": torch.zeros(1000)}}, {"step": 1})
    assert not (tmp_path / "checkpoint.pt.tmp").exists()
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"previous"


def test_leftover_temporary_checkpoints_are_removed_on_resume(tmp_path, parl_subset):
    run = tmp_path / "run"
    assert cli(["train", "--out", str(run), "--no-progress", *small(parl_subset, max_steps=2)]) == 0
    (run / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint")
    (run / "checkpoint.tmp").mkdir()
    (run / "checkpoint.tmp" / "__0_0.distcp").write_bytes(b"x")
    assert cli(["train", "--resume", str(run), "--no-progress"]) == 0
    assert not (run / "checkpoint.pt.tmp").exists() and not (run / "checkpoint.tmp").exists()


def test_a_finished_run_trains_longer_at_its_final_lr(tmp_path, parl_subset, capsys):
    run = tmp_path / "run"
    assert cli(["train", "--out", str(run), "--no-progress", *small(parl_subset, max_steps=6)]) == 0
    assert cli(["train", "--resume", str(run), "--no-progress", "--set", "train.max_steps=9"]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["optim/lr"] for r in rows if "optim/lr" in r}
    assert sorted(lr) == list(range(1, 10))
    floor = TrainConfig().lr * 0.1
    # step s is logged with the LR it used, lr_at(s - 1): the cosine reaches its floor at step 6
    assert all(abs(lr[s] - floor) < 1e-12 for s in (7, 8, 9))
    assert lr[3] > lr[5] > lr[6] > floor                  # the first 6 steps kept their cosine
    cfg = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    assert cfg.train.max_steps == 9 and cfg.train.decay_steps == 6
    capsys.readouterr()
    assert cli(["train", "--resume", str(run), "--set", "train.max_steps=4"]) == 2
    one_line_error(capsys, "train.max_steps=4", "already at step 9")
    assert cli(["train", "--resume", str(run), "--set", "train.lr=1"]) == 2
    one_line_error(capsys, "only parallel.*")


def test_training_longer_resumes_exactly(tmp_path, parl_subset):
    """Stopping, then extending: the extended run equals one started with decay_steps set."""
    base = [*small(parl_subset, max_steps=6)]
    cut, whole = tmp_path / "cut", tmp_path / "whole"
    assert cli(["train", "--out", str(cut), "--no-progress", *base]) == 0
    assert cli(["train", "--resume", str(cut), "--no-progress", "--set", "train.max_steps=9"]) == 0
    assert cli(["train", "--out", str(whole), "--no-progress", *small(parl_subset, max_steps=9),
                "--set", "train.decay_steps=6"]) == 0
    rows = {d: map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) for d in (cut, whole)}
    lm = {d: {r["step"]: r["loss/lm"] for r in rows[d] if "loss/lm" in r} for d in rows}
    assert lm[cut] == lm[whole] and len(lm[cut]) == 9


def test_train_longer_in_the_library(tmp_path, parl_subset):
    cfg = RunConfig.from_dict({"data": {"corpus": str(parl_subset), "vocab_size": 512, "seq_len": 32},
                               "model": {"d_model": 64, "n_layers": 1, "d_ff": 128, "moe": {"d_ff": 64}},
                               "train": {"batch_size": 4, "max_steps": 2, "eval_batches": 1}})
    train(cfg, tmp_path / "r", progress=False)
    summary = train(cfg, tmp_path / "r", resume=True, progress=False, changes={"max_steps": 3})
    assert summary["steps"] == 3


def test_export_refuses_a_run_directory_and_a_run_loads_its_checkpoint_first(tmp_path, parl_subset, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for run in (a, b):
        assert cli(["train", "--out", str(run), "--no-progress", *small(parl_subset, max_steps=2)]) == 0
    config_b = (b / "config.json").read_bytes()
    capsys.readouterr()
    assert cli(["export", str(a), "--out", str(b)]) == 2
    one_line_error(capsys, "holds a run")
    assert (b / "config.json").read_bytes() == config_b and not (b / "model.safetensors").exists()
    assert cli(["export", str(a), "--out", str(tmp_path / "x")]) == 0
    assert cli(["export", str(a), "--out", str(tmp_path / "x")]) == 0     # an export may be replaced
    # a stale model.safetensors in a run directory never hides its newer checkpoint
    from moekit.store.run_dir import load_run
    (a / "model.safetensors").write_bytes((tmp_path / "x" / "model.safetensors").read_bytes())
    assert cli(["train", "--resume", str(a), "--no-progress", "--set", "train.max_steps=4"]) == 0
    model, _, _ = load_run(a)
    ckpt = torch.load(a / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(v, ckpt[k]) for k, v in model.state_dict().items())


def test_corrupt_exports_and_tokenizers_are_one_line(tmp_path, parl_subset, capsys):
    run = tmp_path / "run"
    assert cli(["train", "--out", str(run), "--no-progress", *small(parl_subset, max_steps=1)]) == 0
    assert cli(["export", str(run), "--out", str(tmp_path / "x")]) == 0
    (tmp_path / "x" / "model.safetensors").write_bytes(b"garbage")
    capsys.readouterr()
    assert cli(["eval", str(tmp_path / "x")]) == 2
    one_line_error(capsys, "model.safetensors", "corrupt")
    (tmp_path / "x" / "tokenizer.json").write_text("{")
    assert cli(["generate", str(tmp_path / "x"), "--max-new-tokens", "2"]) == 2
    one_line_error(capsys, "tokenizer.json", "corrupt")
    (run / "tokenizer.json").write_text("{")        # a run reads the tokenizer its checkpoint carries
    assert cli(["generate", str(run), "--max-new-tokens", "2"]) == 0


def _launch_error(args: list[str], fresh: bool, capsys) -> str:
    """`moekit train --nproc 2 ...` that must stop before launching: its exit code 2 and its
    stderr. fresh: a new interpreter (nothing but that line on stderr, imports included);
    else the same CLI in this process (a check that passed would launch torchrun all the same)."""
    if fresh:
        proc = subprocess.run([sys.executable, "-m", "moekit", "train", "--nproc", "2", *args],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        return proc.stderr
    capsys.readouterr()
    assert cli(["train", "--nproc", "2", *args]) == 2
    return capsys.readouterr().err


def test_parallel_launch_reports_bad_input_in_one_line(tmp_path, parl_subset, capsys):
    taken = tmp_path / "taken"
    assert cli(["train", "--out", str(taken), "--no-progress", *small(parl_subset, max_steps=1)]) == 0
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [(["--out", str(taken)], "already holds a run"),
             (["--out", str(tmp_path / "new"), "--set", f'data.corpus="{binary}"'], "looks binary"),
             (["--out", str(a_file)], "is a file")]
    for i, (extra, needle) in enumerate(cases):
        args = [*small(parl_subset, max_steps=1), *extra]
        if "data.corpus" in " ".join(extra):
            args = args[2:]                                   # replace small()'s corpus
        err = _launch_error(args, i == 0, capsys)
        assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "new").exists()


def test_a_resumed_event_file_sorts_after_the_interrupted_ones(tmp_path):
    """TensorBoard reads event files in name order (second, host, pid): a resume in the same
    second as the killed run, with a lower pid, must still come last."""
    from moekit.train.metrics import MetricsWriter
    tb = tmp_path / "tensorboard"
    tb.mkdir()
    old = tb / f"events.out.tfevents.{int(time.time())}.host.99999999.0"
    old.write_bytes(b"")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    writer = MetricsWriter(tmp_path, purge_after=1)
    writer.close()
    names = sorted(p.name for p in tb.iterdir())
    assert names[0] == old.name and len(names) == 2
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_lowering_max_steps_keeps_the_schedule(tmp_path, parl_subset):
    run = tmp_path / "run"
    assert cli(["train", "--out", str(run), "--no-progress", "--stop-at", "3",
                *small(parl_subset, max_steps=12)]) == 0
    assert cli(["train", "--resume", str(run), "--no-progress", "--set", "train.max_steps=5"]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["optim/lr"] for r in rows if "optim/lr" in r}
    from moekit.train.optim import lr_at
    original = RunConfig.from_dict({"train": {"max_steps": 12, "warmup_steps": 2}}).train
    assert sorted(lr) == [1, 2, 3, 4, 5]
    assert all(abs(lr[s] - lr_at(s - 1, original)) < 1e-12 for s in lr)


def test_resuming_a_finished_run_changes_nothing(tmp_path, parl_subset, capsys):
    run = tmp_path / "run"
    assert cli(["train", "--out", str(run), "--no-progress", *small(parl_subset, max_steps=2)]) == 0
    summary = (run / "summary.json").read_bytes()
    capsys.readouterr()
    assert cli(["train", "--resume", str(run), "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (run / "summary.json").read_bytes() == summary


def test_setup_refuses_a_directory_of_another_run(tmp_path, parl_subset):
    from moekit.train.run import setup
    cfg = RunConfig.from_dict({"data": {"corpus": str(parl_subset), "vocab_size": 512, "seq_len": 32},
                               "model": {"d_model": 64, "n_layers": 1, "d_ff": 128, "moe": {"d_ff": 64}}})
    setup(cfg, tmp_path / "api")
    with pytest.raises(ValueError, match="holds files of another run"):
        setup(cfg, tmp_path / "api")


def test_full_disk_while_writing_the_tokenizer_or_config(tmp_path):
    from moekit.data.tokenizer import save_tokenizer, train_tokenizer
    from moekit.store.run_dir import write_json
    (tmp_path / "tokenizer.json.tmp").symlink_to("/dev/full")
    with pytest.raises(OSError, match="no space left on device"):
        save_tokenizer(train_tokenizer(["hello world"] * 4, 300), tmp_path / "tokenizer.json")
    (tmp_path / "config.json.tmp").symlink_to("/dev/full")
    with pytest.raises(OSError):
        write_json(tmp_path / "config.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []                  # no temporary file left


@pytest.mark.parametrize("setting, needle", [
    ("train.lr=1e39", "train.lr=1e+39: must be a finite number > 0 that float32 can hold"),
    ('data.corpus="/dev/zero"', "is not a regular file or a directory"),
])
def test_values_that_looked_valid(setting, needle, tmp_path, capsys):
    out = tmp_path / "a" / "b" / "c"
    assert cli(["train", "--out", str(out), "--set", setting]) == 2
    one_line_error(capsys, needle)
    assert list(tmp_path.iterdir()) == []                  # no directory made, parents included


def test_a_failed_fresh_run_removes_the_parents_it_made(tmp_path, parl_subset, capsys):
    out = tmp_path / "new" / "a" / "b"
    assert cli(["train", "--out", str(out), *small(parl_subset), "--set", "data.max_docs=1"]) == 2
    capsys.readouterr()
    assert not (tmp_path / "new").exists()


def test_a_failed_run_never_removes_a_parent_another_run_uses(tmp_path, parl_subset):
    from moekit.store import run_dir as rd
    sweep = tmp_path / "sweep"
    made = rd.create(sweep / "b")                      # run b made sweep/ and sweep/b/
    assert made == sweep
    (sweep / "a").mkdir()                              # meanwhile run a wrote beside it
    (sweep / "a" / "config.json").write_text("{}")
    (sweep / "b" / "tokenizer.json").write_text("{}")
    rd.discard(sweep / "b", made)                      # b failed
    assert not (sweep / "b").exists() and (sweep / "a" / "config.json").exists()


def test_a_far_future_event_file_does_not_hold_a_resume_up(tmp_path):
    from moekit.train.metrics import MetricsWriter
    tb = tmp_path / "tensorboard"
    tb.mkdir()
    (tb / f"events.out.tfevents.{int(time.time()) + 3600}.otherhost.1.0").write_bytes(b"")
    t0 = time.time()
    MetricsWriter(tmp_path, purge_after=0).close()
    assert time.time() - t0 < 10


def test_an_export_evaluated_can_be_exported_again(tmp_path, parl_subset):
    run, out = tmp_path / "run", tmp_path / "x"
    assert cli(["train", "--out", str(run), "--no-progress", *small(parl_subset, max_steps=1)]) == 0
    assert cli(["export", str(run), "--out", str(out)]) == 0
    assert cli(["eval", str(out), "--batches", "1"]) == 0          # writes a token cache into it
    assert cli(["export", str(run), "--out", str(out)]) == 0


def test_parallel_resume_checks_run_before_launch(tmp_path, parl_subset, capsys):
    run = tmp_path / "run"
    assert cli(["train", "--out", str(run), "--no-progress", *small(parl_subset, max_steps=3)]) == 0
    for i, (sets, needle) in enumerate(((["train.max_steps=2"], "already at step 3"),
                                        (["parallel.ep=3"], "parallel.dp x parallel.ep"))):
        err = _launch_error(["--resume", str(run), *[a for x in sets for a in ("--set", x)]], i == 0, capsys)
        assert needle in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("what", ["token cache", "report"])
def test_a_failed_write_exits_2_as_every_fixable_error_does(tmp_path, parl_subset, what):
    """One exit-code rule (README, Errors): a full disk while writing the token cache exited 1
    where the same while saving a checkpoint exited 2; so did a report that could not be written."""
    run = tmp_path / "run"
    if what == "token cache":
        cmd = ["train", "--out", str(run), "--no-progress", *small(parl_subset, max_steps=2)]
        limit = 100_000                    # the tokenizer fits; the corpus's token cache does not
    else:
        assert cli(["train", "--out", str(run), "--no-progress", *small(parl_subset, max_steps=2)]) == 0
        cmd, limit = ["report", str(run)], 1_000
    proc = subprocess.run([sys.executable, "-m", "moekit", *cmd], capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size(limit))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], lines
    assert any(w in lines[0] for w in ("too large", "full")), lines
    if what == "token cache":
        assert "train.bin" in lines[0] or "data" in lines[0], lines
        assert not run.exists()                      # a run that fails before its first step leaves none
    else:
        assert not (run / "report.html").exists() and not (run / "report.html.tmp").exists()
        assert "report.html" in lines[0], lines


def test_a_resume_that_cannot_write_names_resume_not_out(tmp_path, parl_subset, capsys):
    run = tmp_path / "run"
    assert cli(["train", "--out", str(run), "--no-progress", *small(parl_subset, max_steps=2)]) == 0
    (run / ".moekit-write-test").mkdir()         # where the write probe goes: its write fails, as root too
    capsys.readouterr()
    assert cli(["train", "--resume", str(run), "--no-progress", "--set", "train.max_steps=3"]) == 2
    err = one_line_error(capsys)
    assert f"--resume {str(run)!r}: cannot write the run directory" in err and "--out" not in err, err
