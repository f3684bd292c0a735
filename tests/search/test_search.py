"""moekit search: the space file, the study in a real SQLite file, real tiny training runs."""

import json
import sqlite3
from pathlib import Path

import pytest

from moekit.cli.main import main as cli
from moekit.config import RunConfig
from moekit.search.space import load_space

optuna = pytest.importorskip("optuna")

SPACE = """[space]
"model.moe.top_k" = { choices = [1, 2] }
train.lr = { low = 1e-3, high = 1e-2, log = true }
"""


def base(corpus) -> list[str]:
    sets = [f'data.corpus="{corpus}"', "data.vocab_size=512", "data.seq_len=32", "model.d_model=32",
            "model.n_layers=1", "model.n_heads=2", "model.d_ff=64", "model.moe.d_ff=32",
            "model.moe.num_experts=4", "train.batch_size=4", "train.max_steps=8", "train.eval_every=4",
            "train.eval_batches=2", "train.log_every=2", "train.save_every=1000"]
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
])
def test_bad_space_entries_are_one_line_errors(tmp_path, text, message, capsys):
    path = tmp_path / "space.toml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_space(path)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert cli(["search", "--space", str(path), "--trials", "1", "--study", f"sqlite:///{tmp_path}/s.db",
                "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s.db").exists()          # checked before any study is made


def test_space_parses_ranges_choices_and_dotted_tables(tmp_path):
    path = tmp_path / "space.toml"
    path.write_text(SPACE + '"model.moe.num_experts" = { low = 2, high = 8 }\n')
    params = {p.name: p for p in load_space(path).params}
    assert params["model.moe.top_k"].choices == (1, 2)
    assert params["train.lr"].log and not params["train.lr"].is_int       # TOML dotted key: a sub-table
    assert params["model.moe.num_experts"].is_int
    name = load_space(path).default_name()
    (tmp_path / "other.toml").write_text(SPACE)
    assert load_space(path).default_name() == name != load_space(tmp_path / "other.toml").default_name()


def test_the_shipped_space_holds_the_default_recipe():
    from pathlib import Path
    space = load_space(Path(__file__).resolve().parents[2] / "configs" / "search" / "tiny-space.toml")
    assert space.base_values({}) == {"model.moe.num_experts": 8, "model.moe.top_k": 2,
                                     "train.aux_loss_coef": 0.01, "train.lr": 0.003}


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
    assert trials[0]["baseline"] and trials[0]["params"] == {"model.moe.top_k": 2, "train.lr": 0.003}
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
    from moekit.search.space import parse_space
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
