"""The Optuna study behind ``moekit search``: storage, objectives, pruners, and one trial.

    study = open_study("sqlite:///s.db", name, space, objectives, base_raw, "median", seed=0)
    run_until(study, Context(space, base_raw, objectives, Path("out")), trials=12)

A trial is a real training run (:func:`moekit.train.trainer.train`) into ``OUT/trial-<n>/``;
its evaluations are reported to the pruner through the trainer's ``on_eval``, and a pruned
run stops there with a checkpoint (a normal run directory). A sampled config the config
checks refuse is pruned with the reason in the trial's user attr ``prune_reason``.

Several worker processes may share one study (the same command, the same ``--study``): each
counts the study's finished trials before it starts another, so ``--trials N`` is reached by
all of them together (a worker may overshoot by the trials the others have running).

A trial whose process died (``kill -9``, a lost machine) stays RUNNING in the database. Each
trial records its process in the user attr ``worker`` (host, boot, pid namespace, pid, start
time); before every trial a worker fails the RUNNING trials whose process is provably gone
(on its own machine) and queues their parameters again, once (:func:`recover_dead_trials`).
A trial of another machine is left to Optuna's heartbeat: failed and queued again once its
heartbeat is ``GRACE_S`` old, when some worker next starts a trial.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import socket
import sqlite3
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from moekit.config import RunConfig
from moekit.search.space import Space, apply
from moekit.train.launch import launch, precheck
from moekit.train.trainer import RunStopped

log = logging.getLogger("moekit")

# objective -> Optuna direction; tokens_per_s is measured in the trial on this machine
OBJECTIVES = {"val_loss": "minimize", "active_params": "minimize", "params": "minimize",
              "tokens_per_s": "maximize"}
PRUNERS = ("median", "halving", "hyperband", "none")
# a trial killed with its process on another machine: failed once its heartbeat is this old (s)
HEARTBEAT_S, GRACE_S = 10, 30
WORKER = "worker"               # the trial's user attr naming the process that runs it


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise ValueError("moekit search needs Optuna; install it with pip install 'moekit[search]'") from None
    return optuna


def parse_objectives(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    for n in names:
        if n not in OBJECTIVES:
            raise ValueError(f"--objective {text!r}: unknown objective {n!r}; choose from "
                             f"{', '.join(OBJECTIVES)} (several comma-separated)")
    if len(set(names)) != len(names):
        raise ValueError(f"--objective {text!r} names an objective twice; give each once")
    return names


def make_pruner(name: str | None, objectives: list[str], base_cfg):
    """The pruner for ``--pruner`` (None: median for one objective, none for several: Optuna
    prunes single-objective studies only)."""
    optuna = require_optuna()
    name = name or ("median" if len(objectives) == 1 else "none")
    if name not in PRUNERS:
        raise ValueError(f"--pruner {name!r}: choose from {', '.join(PRUNERS)}")
    if name != "none" and len(objectives) > 1:
        raise ValueError(f"--pruner {name} prunes a single objective; with --objective "
                         f"{','.join(objectives)} use --pruner none")
    # no pruning while the learning rate is still warming up: there the losses say how far the
    # warmup has got, not how good the trial is (a 150-step warmup pruned 8 of 10 trials at step
    # 50-100 by 0.02 nats). The first third of the run, or the base recipe's warmup if longer.
    t = base_cfg.train
    start = max(t.eval_every, t.max_steps // 3, t.warmup_steps if t.warmup_steps is not None else 0)
    return {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=start),
            "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=start),
            "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=start,
                                                                max_resource=base_cfg.train.max_steps),
            "none": optuna.pruners.NopPruner}[name]()


def check_storage(url: str) -> None:
    """A ``sqlite:///PATH`` that exists must be an Optuna database: Optuna would otherwise add
    its tables to someone else's file (or fail deep inside SQLAlchemy)."""
    if not url.startswith("sqlite:///"):
        if "://" not in url:
            raise ValueError(f"--study {url!r} is not a database URL; give sqlite:///PATH.db")
        return                              # another RDB (postgresql://...): Optuna checks it
    path = Path(url[len("sqlite:///"):])
    if not path.exists() or path.stat().st_size == 0:
        if not path.parent.is_dir():
            raise ValueError(f"--study {url}: the directory {str(path.parent)!r} does not exist; create it "
                             "or give a path in an existing directory")
        return
    fix = "give a new path for a new study, or the .db file of an earlier moekit search"
    try:
        with open(path, "rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                raise ValueError(f"--study {url}: {str(path)!r} is not an SQLite database; {fix}")
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as err:
        raise ValueError(f"--study {url}: {str(path)!r} is not a readable SQLite database ({err}); "
                         f"{fix}") from None
    if tables and not {"studies", "trials", "version_info"} <= tables:
        raise ValueError(f"--study {url}: {str(path)!r} is an SQLite database but not an Optuna study "
                         f"(tables {', '.join(sorted(tables)[:4])}); {fix}")


def open_study(url: str, name: str, space: Space, objectives: list[str], base_raw: dict, pruner,
               seed: int | None = None, named: bool = False):
    """The study ``name`` in ``url``, created or loaded (``load_if_exists``); one that holds
    another space, objectives or base recipe is refused before anything runs. ``named``: the
    user gave --name (else a file holding another study is refused: a new space would
    otherwise start a second study beside the first, silently)."""
    optuna = require_optuna()
    check_storage(url)
    for attempt in range(5):     # a second worker may be creating the same tables this instant
        try:
            storage = _storage(optuna, url)
            others = [s.study_name for s in storage.get_all_studies()]
            if others and name not in others and not named:
                raise ValueError(f"--study {url} holds the study {', '.join(map(repr, others[:3]))}, not "
                                 f"{name!r} (named after --space); give --name {others[0]} to continue it "
                                 "with its space, --name NEW for a second study, or another --study")
            study = optuna.create_study(storage=storage, study_name=name, pruner=pruner,
                                        directions=[OBJECTIVES[o] for o in objectives], load_if_exists=True)
            break
        except ValueError:
            raise
        except Exception as err:
            if not type(err).__module__.startswith(("sqlalchemy", "optuna")):
                raise
            if attempt == 4 or not type(err).__module__.startswith("sqlalchemy.exc"):
                raise ValueError(f"--study {url}: {str(err).splitlines()[0][:160]}; give sqlite:///PATH.db "
                                 "(three slashes, then the path) in a writable directory") from None
            time.sleep(0.5 + attempt)
    _check_same(study, url, {"space": space.fingerprint(), "objectives": objectives,
                             "base": json.dumps(base_raw, sort_keys=True)})
    # the seed moves on with the trials already there: a resumed study (or a second worker
    # given the same --seed) would otherwise draw the first trials' random samples again; the
    # factor keeps --seed 1 after one trial from being --seed 2 at none (two workers)
    study.sampler = optuna.samplers.TPESampler(
        seed=None if seed is None else seed * 1_000_003 + len(study.get_trials(deepcopy=False)))
    return study


def _storage(optuna, url: str):
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else {}
    # a trial whose worker died is failed once its heartbeat is stale, and run again once
    params = inspect.signature(optuna.storages.RDBStorage).parameters
    new = "heartbeat_stale_trial_callback" in params           # the names before Optuna 4.9: failed_trial_*
    try:
        with warnings.catch_warnings():     # heartbeats are "experimental" since Optuna 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            stale = {"heartbeat_stale_trial_callback" if new else "failed_trial_callback": _retry(optuna)}
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S,
                                              grace_period=GRACE_S, **stale)
    except ImportError as err:        # postgresql:// without its driver, ...
        raise ValueError(f"--study {url}: {str(err).splitlines()[0][:160]}; give sqlite:///PATH.db") from None
    except RuntimeError as err:       # a schema from another Optuna version
        raise ValueError(f"--study {url}: {str(err).splitlines()[0]}; run `optuna storage upgrade --storage "
                         f"{url}` or use a new --study") from None


def _retry(optuna):
    """Optuna's callback that queues a failed trial's parameters again (WAITING), at most once:
    for a stale heartbeat (the storage calls it) and for a dead worker (recover_dead_trials)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
        return (cls or optuna.storages.RetryFailedTrialCallback)(max_retry=1)


def worker() -> dict | None:
    """This process, as a trial records it: host, boot, pid namespace, pid and start time (in
    clock ticks since boot). None where /proc cannot tell (not Linux): then only the heartbeat
    finds its dead trials."""
    try:
        return {"host": socket.gethostname(),
                "boot": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                "pidns": os.readlink("/proc/self/ns/pid"), "pid": os.getpid(),
                "start": _proc_stat(os.getpid())[1]}
    except (OSError, TypeError):
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of process ``pid`` from /proc/<pid>/stat; None when there is none."""
    try:
        text = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError, TypeError):
        return None
    fields = text.rsplit(")", 1)[1].split()      # the command name in ( ) may hold spaces
    return fields[0], int(fields[19])              # fields 3 and 22 of proc(5)


def is_dead(record, me: dict | None) -> bool:
    """Whether the process a trial recorded is provably gone: it ran on this machine since its
    last boot, in this pid namespace, and its pid is free, a zombie, or another process (a pid
    reused: another start time). Anything else (another machine, no record) is not provable."""
    if me is None or not isinstance(record, dict) or any(record.get(k) != me[k]
                                                         for k in ("host", "boot", "pidns")):
        return False
    stat = _proc_stat(record.get("pid"))
    return stat is None or stat[0] in ("Z", "X") or stat[1] != record.get("start")


def recover_dead_trials(study) -> list[str]:
    """Fail the RUNNING trials whose process is provably dead (:func:`is_dead`) and queue their
    parameters again, once, as Optuna's heartbeat does after ``GRACE_S``; a line for each.
    Trials of live processes (other workers) and of other machines are not touched."""
    import optuna
    from optuna.trial import TrialState
    me, lines = worker(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        record = t.user_attrs.get(WORKER)
        # a retry copies its original's user attrs: only a record made by this trial counts
        if not isinstance(record, dict) or record.get("trial") != t.number or not is_dead(record, me):
            continue
        try:
            study.tell(t.number, state=TrialState.FAIL)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            continue                        # another worker recovered it first
        before = len(study.get_trials(deepcopy=False))
        _retry(optuna)(study, t)
        again = len(study.get_trials(deepcopy=False)) > before
        lines.append(f"trial {t.number}: failed, its process (pid {record['pid']} on {record['host']}) is "
                     f"gone; {'its parameters are queued again' if again else 'retried once already'}; "
                     f"{t.params}")
    return lines


def _check_same(study, url: str, wanted: dict) -> None:
    attrs = study.user_attrs
    if "space" not in attrs:
        if study.get_trials(deepcopy=False):
            raise ValueError(f"study {study.study_name!r} in {url} was not made by moekit search (it has "
                             "trials but no space); give another --name")
        for key, value in wanted.items():
            study.set_user_attr(key, value)
        return
    fix = {"space": "give the --space it was made with, or another --name / --study for this space",
           "objectives": "give the --objective it was made with, or another --name",
           "base": "give the --config and --set it was made with, or another --name"}
    for key, value in wanted.items():
        if attrs.get(key) != value:
            raise ValueError(f"study {study.study_name!r} in {url} was made with another {key} "
                             f"({_short(attrs.get(key))}); {fix[key]}")


def _short(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 160 else text[:157] + "..."


def finished(study) -> int:
    from optuna.trial import TrialState
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.get_trials(deepcopy=False))


@dataclass
class Context:
    space: Space
    base_raw: dict
    objectives: list[str]
    out: Path
    prunes: bool = True         # report evaluations to the pruner (single objective)


def _has_baseline(study) -> bool:
    """A base-recipe trial that finished, runs or waits (a failed one is queued again)."""
    from optuna.trial import TrialState
    return any(t.user_attrs.get("baseline") and t.state != TrialState.FAIL
               for t in study.get_trials(deepcopy=False))


def run_until(study, ctx: Context, trials: int, report=print) -> int:
    """Run trials until the study has ``trials`` finished (complete + pruned) ones; returns how
    many this call ran. A fresh study starts with the base recipe when it lies in the space.
    ``report(line)`` after each trial, and for each dead worker's trial recovered before one."""
    for line in recover_dead_trials(study):     # before the baseline check: it may be the baseline
        report(line)
    if not _has_baseline(study) and (base := ctx.space.base_values(ctx.base_raw)) is not None:
        study.enqueue_trial(base, user_attrs={"baseline": True})   # again if it failed (Ctrl-C)
    ran = 0
    while finished(study) < trials:
        for line in recover_dead_trials(study):     # another worker's, dead while this one ran
            report(line)
        study.optimize(lambda trial: run_trial(trial, ctx), n_trials=1, catch=(),
                       callbacks=[lambda _, t: report(trial_line(t, ctx.objectives))])
        ran += 1
    return ran


def trial_line(t, objectives: list[str]) -> str:
    state = t.state.name.lower()
    if t.values:
        values = ", ".join(f"{o} {v:.4g}" for o, v in zip(objectives, t.values))
        return f"trial {t.number}: {state}, {values}; {t.params}"
    return f"trial {t.number}: {state} ({t.user_attrs.get('prune_reason', '')}); {t.params}"


def run_trial(trial, ctx: Context):
    """One sampled config, trained in ``OUT/trial-<n>``; its objective values."""
    if (me := worker()) is not None:     # who runs it: a rerun fails it once this process is gone
        trial.set_user_attr(WORKER, {**me, "trial": trial.number})
    params = ctx.space.suggest(trial)
    run_dir = ctx.out / f"trial-{trial.number}"
    trial.set_user_attr("run_dir", str(run_dir))
    try:
        cfg = RunConfig.from_dict(apply(ctx.base_raw, params))
        precheck(cfg, corpus=False, source=False)     # the schedule's start and memory
    except ValueError as err:           # a combination the config refuses: not a result, not a crash
        _prune(trial, f"config refused: {err}")
    trial.set_user_attr("config", cfg.to_dict())
    stopped: dict = {}

    def on_eval(step: int, val_loss: float) -> bool:
        if not ctx.prunes:              # Optuna prunes single-objective studies only
            return False
        trial.report(val_loss, step)
        if step < cfg.train.max_steps and trial.should_prune():   # a finished run is a result
            stopped.update(step=step, val_loss=val_loss)
            return True
        return False

    t0 = time.perf_counter()
    try:
        summary = launch(cfg, run_dir, progress=False, on_eval=on_eval)
    except RunStopped as err:
        if isinstance(err.__context__, OSError):   # a full disk is the machine's, not the config's
            raise
        _prune(trial, f"training stopped: {err}")
    measured = measure(summary, run_dir)
    for key, value in {**measured, "wall_s": time.perf_counter() - t0}.items():
        trial.set_user_attr(key, value)
    if stopped:
        _prune(trial, f"pruned at step {stopped['step']} of {cfg.train.max_steps}: val loss "
                      f"{stopped['val_loss']:.4f} was worse than the pruner's bar")
    values = tuple(measured[o] for o in ctx.objectives)
    return values if len(values) > 1 else values[0]


def _prune(trial, reason: str):
    import optuna
    trial.set_user_attr("prune_reason", reason)
    raise optuna.TrialPruned(reason)


def measure(summary: dict, run_dir: Path) -> dict:
    """Every objective of a finished run: final val loss, parameters, median training tokens/s
    (from metrics.jsonl: evaluation and saving excluded)."""
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl", encoding="utf-8") if line.strip()]
    tps = [r["perf/tokens_per_s"] for r in rows if "perf/tokens_per_s" in r]
    val = summary["final_val_loss"]
    return {"val_loss": float("nan") if val is None else float(val),
            "params": summary["params"]["params_total"], "active_params": summary["params"]["params_active"],
            "tokens_per_s": statistics.median(tps) if tps else 0.0, "steps": summary["steps"]}
