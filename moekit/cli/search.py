"""moekit search: a configuration search on Optuna; every trial a real training run.

    moekit search --space space.toml --trials 12 --study sqlite:///runs/s.db --out runs/search \\
        --config configs/tiny-moe.toml --set train.max_steps=100
"""

from __future__ import annotations

import os
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("search", help="search configurations with Optuna (each trial a training run)",
                       allow_abbrev=False,
                       description="Search the fields of a [space] table over real training runs, in an "
                                   "Optuna study stored in SQLite (resumable; several workers may share "
                                   "it). Writes OUT/trial-<n>/ run directories, search.json, best.toml, "
                                   "search.html.")
    p.add_argument("--space", required=True, help="a TOML file with a [space] table of dotted config fields")
    p.add_argument("--trials", type=int, required=True, metavar="N",
                   help="run until the study has N finished (complete + pruned) trials")
    p.add_argument("--study", required=True, metavar="URL", help="the study's storage, sqlite:///PATH.db")
    p.add_argument("--out", required=True, help="the directory for trial runs and the search's outputs")
    p.add_argument("--name", help="the study's name in the storage (default: derived from the space)")
    p.add_argument("--config", help="the base recipe (a TOML file, as for moekit train)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the base recipe, as for moekit train")
    p.add_argument("--objective", default="val_loss",
                   help="val_loss (default), or several comma-separated from val_loss, active_params, "
                        "params, tokens_per_s (a Pareto front)")
    p.add_argument("--pruner", choices=("median", "halving", "hyperband", "none"),
                   help="prune trials from their evaluations (default: median; none for several objectives)")
    p.add_argument("--seed", type=int, help="the sampler's seed (give each worker its own)")
    p.add_argument("--no-progress", action="store_true",
                   help="accepted as every command that trains takes it (a search prints one line per trial)")
    p.set_defaults(run=run)


def run(args) -> int:
    from moekit.config import RunConfig, apply_overrides
    from moekit.recipe import load_toml
    from moekit.search import results
    from moekit.search import study as st
    from moekit.search.space import load_space
    if args.trials < 1:
        raise ValueError(f"--trials {args.trials}: give a number of finished trials >= 1")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("moekit search runs its trials in one process each; start several workers "
                         "(the same command) instead of torchrun")
    st.require_optuna()
    space = load_space(args.space)
    objectives = st.parse_objectives(args.objective)
    base_raw = apply_overrides(load_toml(args.config) if args.config else {}, args.set)
    base_cfg = RunConfig.from_dict(base_raw)          # the base recipe itself must be valid
    pruner = st.make_pruner(args.pruner, objectives, base_cfg)
    name = args.name or space.default_name()
    import optuna
    optuna.logging.set_verbosity(optuna.logging.ERROR)   # one line per trial is ours (no tracebacks)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; give a directory (new or of this study)")
    results.check_out(out, args.study, name, named=args.name is not None)   # another study's stay
    study = st.open_study(args.study, name, space, objectives, base_raw, pruner, args.seed,
                          named=args.name is not None)
    before = st.finished(study)
    print(f"study {name!r} in {args.study}: {before} finished trial(s), running to {args.trials}; "
          f"trials in {out}/trial-<n>")
    import logging
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    def report(line: str) -> None:
        print(line, flush=True)
        results.write_json_only(study, out, objectives, args.study)

    try:
        st.run_until(study, st.Context(space, base_raw, objectives, out, prunes=len(objectives) == 1),
                     args.trials, report)
    finally:                                           # what finished is written even after an error
        data = results.write_outputs(study, out, objectives, args.study)
    if data["best"] is None:
        print(f"no trial completed (all pruned or failed; reasons in {out / 'search.json'}); no best.toml")
        return 1
    best = next(t for t in data["trials"] if t["number"] == data["best"])
    values = ", ".join(f"{k} {v:.6g}" for k, v in best["values"].items())
    print(f"best: trial {best['number']} ({values}) {best['params']}\n"
          f"wrote {out / 'best.toml'}, {out / 'search.json'}, {out / 'search.html'}")
    return 0

