"""moekit search: the space file, the study in a real SQLite file, real tiny training runs."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moekit.cli.main import main as cli
from moekit.config import RunConfig
from moekit.search.space import load_space, parse_space

optuna = pytest.importorskip("optuna")

SPACE = """[space]
"model.moe.top_k" = { choices = [1, 2] }
train.lr = { low = 1e-3, high = 1e-2, log = true }
"""


def base(corpus, max_steps: int = 8) -> list[str]:
    sets = [f'data.corpus="{corpus}"', "data.vocab_size=512", "data.seq_len=32", "model.d_model=32",
            "model.n_layers=1", "model.n_heads=2", "model.d_ff=64", "model.moe.d_ff=32",
            "model.moe.num_experts=4", "train.batch_size=4", f"train.max_steps={max_steps}",
            "train.eval_every=4", "train.eval_batches=2", "train.log_every=2", "train.save_every=1000"]
    return [a for s in sets for a in ("--set", s)]


def search(corpus, tmp_path, space: str, trials: int, db="s.db", out="out", *extra) -> int:
    (tmp_path / "space.toml").write_text(space)
    return cli(["search", "--space", str(tmp_path / "space.toml"), "--trials", str(trials), "--study",
                f"sqlite:///{tmp_path / db}", "--out", str(tmp_path / out), "--seed", "0", *base(corpus),
                *extra])


def trials_of(out) -> list[dict]:
    return json.loads((out / "search.json").read_text())["trials"]


@pytest.mark.parametrize("text, message", [
    ('[space]\n"train.lrr" = { low = 1e-4, high = 1e-2 }', "'train.lrr': unknown config field; known in"),
    ('[space]\n"train.lr" = { low = 1e-2, high = 1e-4 }', "low = 0.01 > high = 0.0001 is an empty range"),
    ('[space]\n"train.lr" = 0.1', "'train.lr' = 0.1 is not a choice list or a range; write e.g."),
    ('[space]\n"train.lr" = { choices = [] }', "choices = [] must be a non-empty list"),
    ('[space]\n"train.lr" = { low = 1e-4 }', "needs both low and high"),
    ('[space]\n"train.lr" = { low = 0, high = 1, log = true }', "log = true needs low > 0"),
    ('[space]\n"model.moe" = { choices = [1] }', "is a config section, not a field"),
    ('[space]\n"train.lr" = { choices = [1, 1] }', "repeats a value"),
    ('[space]\n"train.lr" = { low = "a", high = 1 }', "low = 'a' is not a number"),
    ('[spaces]\n"train.lr" = { low = 1, high = 2 }', "has no [space] table"),
    ('[space]\n"train.lr" = { low = 1e-4, high = inf }', "high = inf is not finite"),
    # an integer field with a float bound or choice: every such trial was refused by the config and
    # pruned (issue 32, item 7); 10.0 too, as --set train.max_steps=10.0 is refused
    ('[space]\n"train.max_steps" = { low = 1.5, high = 10 }',
     "'train.max_steps': low = 1.5 is not an integer, and train.max_steps is an integer field (every "
     "trial would be refused and pruned); use integer bounds, e.g. low = 2"),
    ('[space]\n"train.max_steps" = { low = 1, high = 10.0 }', "high = 10.0 is not an integer"),
    ('[space]\n"train.warmup_steps" = { low = 0.5, high = 4.5 }', "low = 0.5 is not an"),   # int | None
    ('[space]\n"model.moe.top_k" = { choices = [1, 2.5] }',
     "choice 2.5 is not an integer, and model.moe.top_k is an integer field"),
    ('[space]\n"model.moe.num_experts" = { choices = [4, true] }', "choice True is not an integer"),
    ('[space]\n"model.moe.num_experts" = { choices = ["4"] }', "choice '4' is not an integer"),
])
def test_bad_space_entries_are_one_line_errors(tmp_path, text, message, capsys):
    path = tmp_path / "space.toml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_space(path)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(f"space file {str(path)!r}"), err.value
    assert cli(["search", "--space", str(path), "--trials", "1", "--study", f"sqlite:///{tmp_path}/s.db",
                "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s.db").exists()          # checked before any study is made


def test_space_parses_ranges_choices_and_dotted_tables(tmp_path):
    path = tmp_path / "space.toml"
    path.write_text(SPACE + '"model.moe.num_experts" = { low = 2, high = 8 }\n')
    params = {p.name: p for p in load_space(path).params}
    assert params["model.moe.top_k"].choices == (1, 2)
    # a float field takes float choices and bounds, an int among them included
    assert parse_space({"train.lr": {"low": 1, "high": 2.5}, "train.aux_loss_coef": {"choices": [0, 0.5]}})
    assert params["train.lr"].log and not params["train.lr"].is_int       # TOML dotted key: a sub-table
    assert params["model.moe.num_experts"].is_int
    name = load_space(path).default_name()
    (tmp_path / "other.toml").write_text(SPACE)
    assert load_space(path).default_name() == name != load_space(tmp_path / "other.toml").default_name()


def test_the_shipped_space_holds_the_default_recipe():
    from pathlib import Path
    space = load_space(Path(__file__).resolve().parents[2] / "configs" / "search" / "tiny-space.toml")
    assert space.base_values({}) == {"model.moe.num_experts": 8, "model.moe.top_k": 2,
                                     "train.aux_loss_coef": 1.7e-3, "train.lr": 1.55e-3}


@pytest.mark.parametrize("extra, message", [
    (["--objective", "val_loss,speed"], "unknown objective 'speed'"),
    (["--objective", "val_loss,params", "--pruner", "median"], "use --pruner none"),
    (["--trials", "0"], "--trials 0"),
    (["--no-progress", "--trials", "0"], "--trials 0"),       # --no-progress is taken, as by train
    (["--study", "sqlite://f.db"], "give sqlite:///PATH.db"),
    (["--study", "sqlite:////no/such/dir/s.db"], "'/no/such/dir' does not exist"),
])
def test_bad_flags_are_one_line_errors(tmp_path, extra, message, capsys, monkeypatch):
    # open_study retries SQLAlchemy errors with 0.5-3.5 s sleeps (a second worker creating the
    # tables); sqlite://f.db fails all five tries: the same retries and message, without 8 s of waits
    monkeypatch.setattr("moekit.search.study.time.sleep", lambda seconds: None)
    (tmp_path / "space.toml").write_text(SPACE)
    args = ["search", "--space", str(tmp_path / "space.toml"), "--trials", "1", "--study",
            f"sqlite:///{tmp_path}/s.db", "--out", str(tmp_path / "out")]
    assert cli(args + extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not Path("/no").exists()


def test_out_that_is_a_file_is_refused_before_any_study(tmp_path, capsys):
    (tmp_path / "space.toml").write_text(SPACE)
    (tmp_path / "afile").write_text("x")
    assert cli(["search", "--space", str(tmp_path / "space.toml"), "--trials", "1", "--study",
                f"sqlite:///{tmp_path}/s.db", "--out", str(tmp_path / "afile")]) == 2
    assert "--out" in capsys.readouterr().err and not (tmp_path / "s.db").exists()


def test_a_sample_the_config_refuses_is_pruned_not_a_crash(tmp_path, parl_subset, capsys):
    code = search(parl_subset, tmp_path, '[space]\n"model.moe.top_k" = { choices = [5, 6] }\n', 2)
    assert code == 1                                     # nothing completed: said, not crashed
    trials = trials_of(tmp_path / "out")
    assert [t["state"] for t in trials] == ["PRUNED", "PRUNED"]
    assert all("top_k" in t["prune_reason"] and "config refused" in t["prune_reason"] for t in trials)
    assert not (tmp_path / "out" / "best.toml").exists()
    assert "no trial completed" in capsys.readouterr().out


@pytest.fixture(scope="module")
def study3(tmp_path_factory, parl_subset):
    tmp = tmp_path_factory.mktemp("search")
    assert search(parl_subset, tmp, SPACE, 3) == 0
    return tmp, tmp / "out"


def test_a_study_writes_run_dirs_search_json_best_toml_and_html(study3):
    tmp, out = study3
    trials = trials_of(out)
    assert [t["number"] for t in trials] == [0, 1, 2]
    assert trials[0]["baseline"] and trials[0]["params"] == {"model.moe.top_k": 2, "train.lr": 0.00155}
    for t in trials:
        assert t["state"] in ("COMPLETE", "PRUNED")
        assert (out / f"trial-{t['number']}" / "checkpoint.pt").exists()   # pruned runs stop with one too
        assert set(t["params"]) == {"model.moe.top_k", "train.lr"}
    done = [t for t in trials if t["state"] == "COMPLETE"]
    data = json.loads((out / "search.json").read_text())
    assert data["best"] == min(done, key=lambda t: t["values"]["val_loss"])["number"]
    page = (out / "search.html").read_text()
    for section in ('id="trials"', 'id="history"', 'id="importance"', 'id="curves"', "<img"):
        assert section in page, section
    assert cli(["report", data["trials"][data["best"]]["run_dir"], "--windows", "8"]) == 0


def test_best_toml_is_the_trials_recipe_and_trains_it_again(study3, capsys):
    tmp, out = study3
    data = json.loads((out / "search.json").read_text())
    best = data["trials"][data["best"]]
    trained = json.loads((out / f"trial-{best['number']}" / "config.json").read_text())
    assert RunConfig.from_toml(out / "best.toml").to_dict() == trained
    again = tmp / "again"
    assert cli(["train", "--config", str(out / "best.toml"), "--out", str(again), "--no-progress"]) == 0
    again = json.loads((again / "summary.json").read_text())
    assert again["final_val_loss"] == best["values"]["val_loss"]      # the same run, step for step


def test_resume_continues_to_n_and_keeps_what_finished(tmp_path, parl_subset, capsys):
    assert search(parl_subset, tmp_path, SPACE, 2, "s.db", "out", "--name", "r", "--pruner", "none") == 0
    first = trials_of(tmp_path / "out")
    assert search(parl_subset, tmp_path, SPACE, 3, "s.db", "out", "--name", "r", "--pruner", "none") == 0
    again = trials_of(tmp_path / "out")
    assert len(again) == 3 and all(t["state"] == "COMPLETE" for t in again)
    for a, b in zip(first, again[:2]):
        assert (a["params"], a["values"], a["state"]) == (b["params"], b["values"], b["state"])
    assert again[2]["params"] != again[1]["params"]       # the same --seed did not draw trial 1 again
    assert search(parl_subset, tmp_path, SPACE, 3, "s.db", "out", "--name", "r", "--pruner", "none") == 0
    assert len(trials_of(tmp_path / "out")) == 3          # already at 3: runs nothing
    # the same study name with another space is refused, and loses nothing
    other = '[space]\n"train.lr" = { low = 1e-3, high = 1e-2 }\n'
    assert search(parl_subset, tmp_path, other, 4, "s.db", "out", "--name", "r") == 2
    assert "was made with another space" in capsys.readouterr().err
    # ... and so is another space without --name (its derived name would start a second study)
    assert search(parl_subset, tmp_path, other, 4, "s.db", "out") == 2
    assert "give --name r to continue it" in capsys.readouterr().err
    study = optuna.load_study(study_name="r", storage=f"sqlite:///{tmp_path / 's.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert optuna.get_all_study_names(f"sqlite:///{tmp_path / 's.db'}") == ["r"]


def test_another_studys_out_is_refused_before_anything_is_written(study3, tmp_path, parl_subset, capsys):
    """--out holding a finished search's results, with a new --study: refused in one line naming
    how to continue the old one; its search.json and search.html stay, no database is made.
    (Before: both files were overwritten by one failed trial, and new.db created.)"""
    import shutil
    old_tmp, old_out = study3
    shutil.copytree(old_out, tmp_path / "out")
    before = {n: (tmp_path / "out" / n).read_bytes() for n in ("search.json", "search.html")}
    storage = json.loads(before["search.json"])["storage"]
    assert search(parl_subset, tmp_path, SPACE, 3, "new.db") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"continue it with --study {storage} --name " in err, err
    assert {n: (tmp_path / "out" / n).read_bytes() for n in before} == before
    assert not (tmp_path / "new.db").exists()


def test_a_file_that_is_not_an_optuna_study_is_refused_untouched(tmp_path, parl_subset, capsys):
    (tmp_path / "notes.db").write_text("not a database")
    assert search(parl_subset, tmp_path, SPACE, 1, "notes.db") == 2
    assert "is not an SQLite database" in capsys.readouterr().err
    assert (tmp_path / "notes.db").read_text() == "not a database"
    with sqlite3.connect(tmp_path / "other.db") as db:
        db.execute("CREATE TABLE users (name TEXT)")
    assert search(parl_subset, tmp_path, SPACE, 1, "other.db") == 2
    assert "is an SQLite database but not an Optuna study" in capsys.readouterr().err
    with sqlite3.connect(tmp_path / "other.db") as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"users"}
    assert not (tmp_path / "out").exists()


def test_several_objectives_give_a_pareto_front(tmp_path, parl_subset):
    space = '[space]\n"model.moe.num_experts" = { choices = [2, 4] }\n'
    assert search(parl_subset, tmp_path, space, 2, "s.db", "out", "--objective", "val_loss,params") == 0
    data = json.loads((tmp_path / "out" / "search.json").read_text())
    assert data["directions"] == ["minimize", "minimize"]
    done = [t for t in data["trials"] if t["state"] == "COMPLETE"]
    front = [t for t in done if t["pareto"]]
    assert front and sorted(t["number"] for t in front) == data["pareto_front"]

    def dominates(a, b):
        va, vb = a["values"], b["values"]
        return all(va[k] <= vb[k] for k in va) and any(va[k] < vb[k] for k in va)
    for t in done:   # nothing on the front is dominated; everything off it is
        assert any(dominates(f, t) for f in front) != t["pareto"]
    assert data["best"] == min(front, key=lambda t: t["values"]["val_loss"])["number"]
    assert 'id="pareto"' in (tmp_path / "out" / "search.html").read_text()


class _AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_the_pruner_stops_a_trial_at_its_first_evaluation_with_a_checkpoint(tmp_path, parl_subset):
    from moekit.config import apply_overrides
    from moekit.search.study import Context, run_trial
    from moekit.store.checkpoint import Checkpoint
    raw = apply_overrides({}, base(parl_subset)[1::2])
    study = optuna.create_study(pruner=_AlwaysPrune())
    ctx = Context(parse_space({"train.lr": {"choices": [3e-3]}}), raw, ["val_loss"], tmp_path)
    study.optimize(lambda t: run_trial(t, ctx), n_trials=1)
    trial = study.trials[0]
    assert trial.state.name == "PRUNED"
    assert trial.user_attrs["prune_reason"].startswith("pruned at step 4 of 8")
    assert Checkpoint(tmp_path / "trial-0").meta["step"] == 4


def _trials_in(db: Path) -> dict[int, dict]:
    """{number: {"state", "worker", "params"}} straight from the study's SQLite file (a search
    process writes it meanwhile; {} until its tables exist)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as con:
            rows = con.execute("SELECT trial_id, number, state FROM trials").fetchall()
            attrs = con.execute("SELECT trial_id, key, value_json FROM trial_user_attributes").fetchall()
            params = con.execute("SELECT trial_id, param_name FROM trial_params").fetchall()
    except sqlite3.OperationalError:                  # not made yet
        return {}
    trials = {tid: {"number": n, "state": state, "params": set()} for tid, n, state in rows}
    for tid, key, value in attrs:
        trials[tid][key] = json.loads(value)
    for tid, name in params:
        trials[tid]["params"].add(name)
    return {t["number"]: t for t in trials.values()}


def _wait(what: str, ready, proc: subprocess.Popen, seconds: float = 60.0):
    deadline = time.monotonic() + seconds
    while not (found := ready()):
        assert proc.poll() is None, f"the search exited ({proc.returncode}) while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} after {seconds:.0f} s"
        time.sleep(0.2)
    return found


def test_a_search_killed_mid_trial_and_run_again_at_once_fails_it_and_retries_it(tmp_path, parl_subset):
    """kill -9 during trial 0 (the base recipe), then the same command again at once, well inside
    the heartbeat's 30 s grace: the rerun fails trial 0 (its process is gone) and runs its
    parameters again as trial 1 before any new sample; search.json says so. (Before: trial 0
    stayed RUNNING, since Optuna fails a trial only once its heartbeat is 30 s old and checks
    only as a trial starts; the rerun sampled new parameters; issue 32, item 9.)"""
    (tmp_path / "space.toml").write_text(SPACE)
    db, out = tmp_path / "s.db", tmp_path / "out"
    cmd = [sys.executable, "-m", "moekit", "search", "--space", str(tmp_path / "space.toml"), "--trials", "2",
           "--study", f"sqlite:///{db}", "--out", str(out), "--seed", "0", "--pruner", "none",
           *base(parl_subset, max_steps=100_000)]           # a trial far longer than the test
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs: list[subprocess.Popen] = []

    def start(log: str) -> subprocess.Popen:
        with open(tmp_path / log, "w") as f:
            procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env))
        return procs[-1]
    try:
        first = start("first.log")
        _wait("training in trial 0", lambda: (out / "trial-0" / "metrics.jsonl").exists(), first)
        killed = _trials_in(db)[0]
        assert killed["state"] == "RUNNING"
        first.send_signal(signal.SIGKILL)
        first.wait()
        again = start("again.log")
        started = str(out / "trial-1")             # (a retry's run_dir, copied from trial 0, is trial-0's)
        trials = _wait("trial 1 started", lambda: (t := _trials_in(db)).get(1, {}).get("run_dir") == started
                       and t, again)
        assert trials[0]["state"] == "FAIL"     # by the rerun as it started (its line below)
        assert trials[0]["worker"]["pid"] == first.pid
        retry = trials[1]
        assert retry["state"] == "RUNNING" and retry["worker"]["pid"] == again.pid and retry["baseline"]
        assert retry["params"] == killed["params"] == {"model.moe.top_k", "train.lr"}
        assert len(trials) == 2                           # no second base-recipe trial queued
        # search.json was rewritten when trial 0 was recovered, before trial 1 started
        recorded = {t["number"]: t for t in trials_of(out)}
        assert recorded[0]["state"] == "FAIL" and recorded[1]["retry_of"] == 0
        assert recorded[1]["params"] == recorded[0]["params"] == {"model.moe.top_k": 2, "train.lr": 0.00155}
        log = (tmp_path / "again.log").read_text()
        assert f"trial 0: failed, its process (pid {first.pid} on " in log and "queued again" in log, log
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_only_the_trials_of_provably_dead_processes_are_failed_and_queued_again(tmp_path):
    """recover_dead_trials on RUNNING trials recorded by: a live other worker, this process, a
    dead one, a reused pid, another machine or boot, none, or an original (copied into its
    retry). Only the dead and the reused are failed, each queued again once; a retry that dies
    too is failed and not queued a third time, as Optuna's heartbeat retry does."""
    from moekit.search.study import WORKER, _proc_stat, recover_dead_trials, worker
    me = worker()
    if me is None:
        pytest.skip("no /proc here: only the heartbeat finds dead trials")
    live = subprocess.Popen(["sleep", "60"])
    try:
        gone = subprocess.Popen(["true"])
        gone.wait()
        dead = {**me, "pid": gone.pid}
        records = {"live worker": {**me, "pid": live.pid, "start": _proc_stat(live.pid)[1]}, "this": me,
                   "dead": dead, "pid reused": {**me, "start": me["start"] - 1},
                   "other machine": {**dead, "host": me["host"] + "-2"}, "other boot": {**dead, "boot": "b"},
                   "no record": None, "copied": dead}
        study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'u.db'}")
        for what, record in records.items():
            trial = study.ask()
            trial.suggest_float("x", 0, 10)
            if record is not None:
                trial.set_user_attr(WORKER, {**record, "trial": trial.number - (what == "copied")})
        lines = recover_dead_trials(study)
        states = {what: t.state.name for what, t in zip(records, study.trials)}
        assert states == {**{w: "RUNNING" for w in records}, "dead": "FAIL", "pid reused": "FAIL"}
        retries = study.trials[len(records):]
        assert [(t.state.name, t.params, t.system_attrs["failed_trial"]) for t in retries] == [
            ("WAITING", study.trials[n].params, n) for n in (2, 3)]
        assert len(lines) == 2 and lines[0].startswith(f"trial 2: failed, its process (pid {gone.pid} on ")
        assert recover_dead_trials(study) == []           # the rest are alive, or not provably dead
        again = study.ask()                               # the first retry runs, and dies too
        assert again.number == len(records)
        again.set_user_attr(WORKER, {**dead, "trial": again.number})
        assert "retried once already" in recover_dead_trials(study)[0]
        assert study.trials[again.number].state.name == "FAIL"
        assert [t.number for t in study.trials if t.state.name == "WAITING"] == [len(records) + 1]
    finally:
        live.kill()
        live.wait()


def test_no_trial_is_pruned_while_its_learning_rate_warms_up():
    """The default median pruner compared losses at steps 50 and 100 of a 150-step warmup:
    8 of 10 trials of the default recipe's study were pruned by 0.02 nats of warmup noise."""
    from moekit.config import RunConfig
    from moekit.search.study import make_pruner
    cfg = RunConfig.from_dict({"train": {"max_steps": 750, "eval_every": 50, "warmup_steps": 150}})
    assert make_pruner("median", ["val_loss"], cfg)._n_warmup_steps == 250       # a third of the run
    long = RunConfig.from_dict({"train": {"max_steps": 300, "eval_every": 50, "warmup_steps": 200}})
    assert make_pruner("median", ["val_loss"], long)._n_warmup_steps == 200       # past the warmup
    assert make_pruner("halving", ["val_loss"], cfg)._min_resource == 250
