"""A run against a baseline (an MoE against its dense twin): who reaches whose loss, when.

``moekit report RUN --baseline BASE`` shows it; ``bench/compare_moe_dense.py`` writes it as
JSON. The measures:

- final validation loss of each, and the difference (negative: the run ends lower);
- the step at which the run's validation loss first reaches the baseline's final one
  (linear interpolation between evaluations), and its share of the baseline's steps;
- the same in training seconds: each log interval's steps x tokens per step / its logged
  tokens/s, summed (evaluation and checkpointing excluded, as perf/tokens_per_s excludes
  them), so a run's own step speed counts. Compare seconds only between runs made one after
  the other on the same idle machine.
"""

from __future__ import annotations

import json
from pathlib import Path

from moekit.report.figures import plt, png, read_metrics, series


def first_below(curve: list[tuple[float, float]], target: float) -> float | None:
    """The x at which a (x, loss) curve first reaches ``target``, linearly interpolated between
    its points; None if it never does."""
    prev = None
    for x, y in curve:
        if y <= target:
            if prev is None:
                return float(x)
            x0, y0 = prev
            return x0 + (x - x0) * (y0 - target) / (y0 - y)
        prev = (x, y)
    return None


def train_seconds(rows: list[dict], tokens_per_step: int) -> dict[int, float]:
    """{logged step: training seconds up to it}. A row's interval is the steps since the
    previous logged row; its world size is tokens_per_s / tokens_per_s_per_rank."""
    out, total, prev = {}, 0.0, 0
    for r in rows:
        tps = r.get("perf/tokens_per_s")
        if not tps:
            continue
        world = tps / r["perf/tokens_per_s_per_rank"] if r.get("perf/tokens_per_s_per_rank") else 1.0
        total += (r["step"] - prev) * tokens_per_step * round(world) / tps
        prev = r["step"]
        out[r["step"]] = total
    return out


def _at(seconds: dict[int, float], step: float) -> float:
    """Training seconds at ``step`` (linear between logged steps)."""
    steps = sorted(seconds)
    lo = max((s for s in steps if s <= step), default=0)
    hi = min((s for s in steps if s >= step), default=steps[-1])
    t_lo = seconds.get(lo, 0.0)
    if hi == lo:
        return t_lo if step <= lo else t_lo * step / max(lo, 1)
    return t_lo + (seconds[hi] - t_lo) * (step - lo) / (hi - lo)


def _curves(run_dir: Path) -> dict:
    rows = read_metrics(run_dir)
    steps, val = series(rows, "loss/val")
    if not val:
        raise ValueError(f"{str(run_dir)!r} has no validation loss in metrics.jsonl; train it with "
                         "train.eval_every set")
    cfg = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
    tokens_per_step = cfg["train"]["batch_size"] * cfg["train"].get("grad_accum", 1) * cfg["data"]["seq_len"]
    seconds = train_seconds(rows, tokens_per_step)
    return {"val": list(zip(steps, val)), "seconds": seconds,
            "val_by_s": [(_at(seconds, s), v) for s, v in zip(steps, val)] if seconds else []}


def compare(run_dir: Path, baseline_dir: Path) -> dict:
    """The measures of the module docstring, plus both curves (for plots and JSON)."""
    run, base = _curves(run_dir), _curves(baseline_dir)
    target, base_steps = base["val"][-1][1], base["val"][-1][0]
    reach = first_below(run["val"], target)
    base_s = _at(base["seconds"], base_steps) if base["seconds"] else None
    reach_s = _at(run["seconds"], reach) if reach is not None and run["seconds"] else None
    return {"final_val": run["val"][-1][1], "baseline_final_val": target,
            "delta": run["val"][-1][1] - target, "steps": run["val"][-1][0], "baseline_steps": base_steps,
            "steps_to_baseline": reach, "steps_ratio": None if reach is None else reach / base_steps,
            "seconds": _at(run["seconds"], run["val"][-1][0]) if run["seconds"] else None,
            "baseline_seconds": base_s, "seconds_to_baseline": reach_s,
            "seconds_ratio": None if reach_s is None or not base_s else reach_s / base_s,
            "curves": {"run": run["val"], "baseline": base["val"], "run_by_s": run["val_by_s"],
                       "baseline_by_s": base["val_by_s"]}}


def _fmt(value, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def comparison_table(c: dict) -> str:
    rows = [("final validation loss", _fmt(c["final_val"], ".4f"), _fmt(c["baseline_final_val"], ".4f")),
            ("difference (run - baseline)", _fmt(c["delta"], "+.4f"), ""),
            ("steps", str(c["steps"]), str(c["baseline_steps"])),
            ("training seconds", _fmt(c["seconds"], ".0f"), _fmt(c["baseline_seconds"], ".0f")),
            ("reaches the baseline's final loss at step", _fmt(c["steps_to_baseline"], ".0f"),
             f"({_fmt(c['steps_ratio'], '.2f')}x the baseline's steps)"),
            ("... at training second", _fmt(c["seconds_to_baseline"], ".0f"),
             f"({_fmt(c['seconds_ratio'], '.2f')}x the baseline's time)")]
    body = "".join(f"<tr><td>{a}</td><td>{b}</td><td>{d}</td></tr>" for a, b, d in rows)
    return f"<table><tr><th></th><th>this run</th><th>baseline</th></tr>{body}</table>"


def comparison_plot(c: dict) -> str:
    """Validation loss against steps and against training seconds, the crossing marked."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    curves = c["curves"]
    for ax, (run, base, at, xlabel) in zip(axes, (
            (curves["run"], curves["baseline"], c["steps_to_baseline"], "step"),
            (curves["run_by_s"], curves["baseline_by_s"], c["seconds_to_baseline"], "training seconds"))):
        if not run or not base:
            ax.set_visible(False)
            continue
        ax.plot(*zip(*base), "o--", ms=3, label=f"baseline (final {c['baseline_final_val']:.3f})")
        ax.plot(*zip(*run), "o-", ms=3, label=f"this run (final {c['final_val']:.3f})")
        ax.axhline(c["baseline_final_val"], color="gray", lw=0.8, ls="--")
        if at is not None:
            ax.axvline(at, color="gray", lw=0.8, ls=":")
            ax.annotate(f"{at:.0f}", (at, c["baseline_final_val"]), textcoords="offset points", xytext=(4, 6),
                        fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return png(fig)
