"""A run against its baseline: the crossing in steps and in training seconds."""

import json

import pytest

from moekit.cli.main import main as cli
from moekit.config import RunConfig
from moekit.report.compare import compare, first_below, train_seconds
from moekit.train.trainer import train


def test_first_below_interpolates_between_evaluations():
    curve = [(10, 6.0), (20, 5.0), (30, 4.0)]
    assert first_below(curve, 4.5) == pytest.approx(25.0)
    assert first_below(curve, 7.0) == 10.0 and first_below(curve, 3.0) is None


def test_train_seconds_sums_each_interval_at_its_own_speed():
    rows = [{"step": 10, "perf/tokens_per_s": 1000.0, "perf/tokens_per_s_per_rank": 500.0},
            {"step": 10, "loss/val": 5.0},
            {"step": 30, "perf/tokens_per_s": 4000.0, "perf/tokens_per_s_per_rank": 2000.0}]
    # 2 ranks x 100 tokens per rank-step: 10 steps at 1000 tokens/s, then 20 at 4000
    assert train_seconds(rows, 100) == {10: pytest.approx(2.0), 30: pytest.approx(3.0)}


@pytest.fixture(scope="module")
def pair(tmp_path_factory, parl_subset):
    base = tmp_path_factory.mktemp("cmp")
    runs = {}
    for name, moe in (("moe", {"d_ff": 32, "num_experts": 4, "top_k": 2}), ("dense", False)):
        cfg = RunConfig.from_dict({
            "data": {"corpus": str(parl_subset), "vocab_size": 512, "seq_len": 32},
            "model": {"d_model": 64, "n_layers": 1, "n_heads": 4, "d_ff": 64, "moe": moe},
            "train": {"batch_size": 8, "max_steps": 16, "eval_every": 4, "eval_batches": 2, "log_every": 2}})
        train(cfg, base / name, progress=False)
        runs[name] = base / name
    return runs


def test_compare_reads_both_runs_and_the_report_shows_it(pair):
    c = compare(pair["moe"], pair["dense"])
    lines = (pair["dense"] / "metrics.jsonl").read_text().splitlines()
    dense_val = [json.loads(line)["loss/val"] for line in lines if "loss/val" in line]
    assert c["baseline_final_val"] == dense_val[-1] and c["baseline_steps"] == 16
    assert c["delta"] == pytest.approx(c["final_val"] - c["baseline_final_val"])
    assert c["seconds"] > 0 and c["baseline_seconds"] > 0
    if c["steps_to_baseline"] is not None:
        assert 0 < c["steps_ratio"] <= 1 and 0 < c["seconds_ratio"]
        assert first_below(c["curves"]["run"], c["baseline_final_val"]) == c["steps_to_baseline"]
    assert cli(["report", str(pair["moe"]), "--baseline", str(pair["dense"]), "--windows", "32"]) == 0
    page = (pair["moe"] / "report.html").read_text()
    assert 'id="baseline"' in page and "reaches the baseline&#x27;s final loss" not in page
    assert "reaches the baseline's final loss at step" in page and f"{c['delta']:+.4f}" in page


def test_a_baseline_without_validation_losses_is_one_line(pair, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "metrics.jsonl").write_text('{"step": 1, "loss/lm": 5.0}\n')
    (bare / "config.json").write_text((pair["dense"] / "config.json").read_text())
    with pytest.raises(ValueError, match="has no validation loss in metrics.jsonl"):
        compare(pair["moe"], bare)
