"""Configuration search on Optuna (``moekit search``): every trial a real training run.

    space.py    the space file: dotted config fields -> choices or ranges, checked up front
    study.py    the study (SQLite, resumable, shared by workers), objectives, pruners, a trial
    results.py  search.json, best.toml
    report.py   search.html

Optuna is imported inside these modules' functions: ``import moekit`` does not need it.
"""
