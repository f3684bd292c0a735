"""What a search leaves in its output directory, from the study alone (any worker can write it):

    search.json   every trial: number, state, params, objective values, run dir, prune reason,
                  the trial it retries (whose process died)
    best.toml     the best trial's full recipe: ``moekit train --config OUT/best.toml`` runs it
    search.html   the report (moekit.search.report)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from moekit.recipe import dump_toml
from moekit.store.run_dir import write_json


def trial_record(t, objectives: list[str], pareto: set[int]) -> dict:
    attrs = t.user_attrs
    return {"number": t.number, "state": t.state.name, "params": t.params,
            "values": dict(zip(objectives, t.values)) if t.values else None,
            "run_dir": attrs.get("run_dir"), "prune_reason": attrs.get("prune_reason"),
            "baseline": bool(attrs.get("baseline")), "pareto": t.number in pareto,
            "retry_of": t.system_attrs.get("failed_trial"),      # its process died: run again
            "measured": {k: attrs[k] for k in ("val_loss", "params", "active_params", "tokens_per_s",
                                              "steps", "wall_s") if k in attrs},
            "duration_s": t.duration.total_seconds() if t.duration is not None else None}


def best_trial(study, objectives: list[str]):
    """The best complete trial (None if none): the optimum of one objective; with several,
    the Pareto trial of lowest validation loss (measured in every trial)."""
    from optuna.trial import TrialState
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return None
    if len(objectives) == 1:
        return study.best_trial
    front = study.best_trials
    return min(front, key=lambda t: _or_inf(t.user_attrs.get("val_loss")))


def _or_inf(value) -> float:
    return math.inf if value is None or value != value else float(value)


def summary(study, objectives: list[str]) -> dict:
    pareto = {t.number for t in study.best_trials} if len(objectives) > 1 else set()
    best = best_trial(study, objectives)
    if best is not None and len(objectives) == 1:
        pareto = {best.number}
    trials = [trial_record(t, objectives, pareto) for t in study.get_trials(deepcopy=False)]
    return {"study": study.study_name, "objectives": objectives,
            "directions": [d.name.lower() for d in study.directions],
            "space": study.user_attrs.get("space"), "best": None if best is None else best.number,
            "pareto_front": sorted(pareto), "trials": trials}


def check_out(out: Path, storage: str, name: str, named: bool = True) -> None:
    """``out`` may hold only this study's results (a rerun continues them): another study's
    search.json is refused before anything is written (the study's database included). A name
    derived from the space (``named=False``) in the same storage is left to the study's own
    check, which names the study to continue."""
    path = Path(out) / "search.json"
    if not path.exists():
        return
    try:
        held = json.loads(path.read_text(encoding="utf-8"))
        theirs = (held["storage"], held["study"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"--out {str(out)!r} holds a search.json that is not moekit search's; choose "
                         "another --out") from None
    if theirs[0] != storage or (named and theirs[1] != name):
        raise ValueError(f"--out {str(out)!r} holds the results of study {theirs[1]!r} in {theirs[0]}; "
                         f"continue it with --study {theirs[0]} --name {theirs[1]} (the same --space), or "
                         "choose another --out")


def write_json_only(study, out: Path, objectives: list[str], url: str) -> dict:
    """search.json (after every trial: what finished so far, readable while the search runs)."""
    out.mkdir(parents=True, exist_ok=True)
    data = {**summary(study, objectives), "storage": url}
    write_json(out / "search.json", data)
    return data


def write_outputs(study, out: Path, objectives: list[str], url: str) -> dict:
    """search.json, best.toml (when a trial completed) and search.html in ``out``."""
    from moekit.search.report import search_page
    data = write_json_only(study, out, objectives, url)
    best = best_trial(study, objectives)
    if best is not None:
        text = (f"# moekit search: trial {best.number} of study {study.study_name!r} ({url})\n"
                f"# {', '.join(f'{o} = {v:.6g}' for o, v in zip(objectives, best.values))}\n"
                + dump_toml(best.user_attrs["config"]))
        tmp = out / "best.toml.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / "best.toml")
    (out / "search.html").write_text(search_page(study, data), encoding="utf-8")
    return data
