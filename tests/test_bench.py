"""The layer benchmark runs end to end on a tiny grid and writes the JSON it promises."""

import json
import subprocess
import sys
from pathlib import Path

from .conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_layer_benchmark_writes_table_and_json(tmp_path):
    out, doc = tmp_path / "bench.json", tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nearlier text\n")
    cmd = [sys.executable, str(ROOT / "bench" / "bench_moe_layer.py"), "--tokens", "64", "--d-model", "16",
           "--d-ff", "32", "--dtypes", "float32", "--reps", "1", "--warmup", "1", "--out", str(out),
           "--doc", str(doc)]
    # a one-case run writes the table block first (every case is a child process that imports
    # torch, and transformers for the Mixtral peer: the first run is kept to one, without it)
    one = ["--experts", "4", "--settings", "untuned", "--skip", "deepspeed", "hf_mixtral"]
    first = subprocess.run(cmd + one, capture_output=True, text=True, timeout=300, check=True)
    assert "| untuned | f32 | 4 |" in first.stdout and "| tuned |" not in doc.read_text()
    # the full grid's run replaces that table block instead of adding one
    grid = ["--experts", "2", "4", "--settings", "tuned", "untuned", "--skip", "deepspeed"]
    proc = subprocess.run(cmd + grid, capture_output=True, text=True, timeout=300, check=True)
    assert "| tuned | f32 | 2 |" in proc.stdout and "| untuned | f32 | 4 |" in proc.stdout
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nearlier text") and text.count("bench_moe_layer:begin") == 1
    assert "| untuned | f32 | 4 |" in text and "| tuned | f32 | 2 |" in text
    data = json.loads(out.read_text())
    assert data["meta"]["tokens"] == 64 and data["meta"]["command"].startswith("python")
    assert [(c["setting"], c["num_experts"]) for c in data["results"]] == [
        ("tuned", 2), ("tuned", 4), ("untuned", 2), ("untuned", 4)]
    for case in data["results"]:
        rows = case["contenders"]
        assert {"dense", "moekit", "moekit_padded", "experts_only"} <= set(rows) and "deepspeed" not in rows
        assert rows["dense"]["ratio_to_dense"] == 1.0
        for row in rows.values():
            assert row["median_s"] > 0 and row["tokens_per_s"] == 64 / row["median_s"]


def test_phase_benchmark_times_every_stage(tmp_path):
    out = tmp_path / "phases.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_moe_phases.py"), "--tokens", "64", "--d-model", "16",
           "--d-ff", "32", "--experts", "4", "--dtype", "float32", "--reps", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    assert "combine" in proc.stdout
    stages = json.loads(out.read_text())["stages_ms"]["4"]
    assert set(stages) == {"dense FFN", "MoE layer", "router", "plan", "gather", "experts", "combine",
                           "aux losses"}
    assert all(v > 0 for v in stages.values())


def test_expert_parallel_benchmark_runs_two_processes(tmp_path):
    out = tmp_path / "ep.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_expert_parallel.py"), "--tokens", "64",
           "--d-model", "16", "--d-ff", "32", "--experts", "4", "--reps", "2", "--out", str(out)]
    subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    data = json.loads(out.read_text())
    assert data["ep1_step_s"] > 0 and data["ep2_step_s"] > 0 and data["a2a_forward_s"] > 0
    assert data["predicted_bytes_per_rank_per_step"] == 4 * 64 * 2 * 0.5 * 16 * 4


def test_ep_device_check_dry_run_on_two_gloo_ranks(tmp_path):
    """The GPU check's code path with gloo on two real processes (at world size 1 the
    all-to-all moves nothing): the EP layer must equal the full layer on every rank (the
    script's assert_close calls raise, failing the run, if it does not)."""
    out = tmp_path / "ep.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(ROOT / "bench" / "ep_device_check.py"), "--device", "cpu", "--dtype", "float32",
           "--tokens", "64", "--d-model", "16", "--d-ff", "32", "--experts", "4", "--reps", "1",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "EP layer equals the full layer" in proc.stdout
    data = json.loads(out.read_text())
    assert data["backend"] == "gloo" and data["world"] == 2 and data["device"] == "cpu"
    assert data["full_layer_ms"] > 0 and data["ep_layer_ms"] > 0 and data["a2a_ms"] > 0
    assert data["meta"]["tokens"] == 64 and data["meta"]["experts"] == 4


def test_expert_sweep_runs_every_arm_and_reports_steps_to_dense(tmp_path, parl_subset):
    out = tmp_path / "sweep"
    extra = [f"--extra={s}" for s in ("data.vocab_size=512", "data.seq_len=32", "model.d_model=64",
                                     "model.n_layers=2", "model.n_heads=4", "train.batch_size=8",
                                     "train.eval_every=3", "train.eval_batches=2", "train.warmup_steps=2")]
    cmd = [sys.executable, str(ROOT / "bench" / "sweep_experts.py"), "--out", str(out), "--corpus",
           str(parl_subset), "--experts", "2,4", "--seeds", "0", "--steps", "6", "--expert-d-ff", "32",
           "--json", str(tmp_path / "sweep.json"), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "sweep.json").read_text())
    rows = {r["arm"]: r for r in data["summary"]}
    assert set(rows) == {"dense", "E2", "E4"}
    assert all(len(r["final_val"]) == 1 and r["final_val"][0] > 0 for r in rows.values())
    assert rows["dense"]["steps_to_dense"] == [] and len(rows["E4"]["steps_to_dense"]) == 1
    cfg = json.loads((out / "E4-s0" / "config.json").read_text())
    assert cfg["model"]["moe"]["num_experts"] == 4 and cfg["model"]["moe"]["d_ff"] == 32
    assert json.loads((out / "dense-s0" / "config.json").read_text())["model"]["d_ff"] == 64
    assert "<table>" in (out / "sweep.html").read_text()


def test_generation_benchmark_compares_with_transformers(tmp_path):
    import torch

    from moekit.config import RunConfig
    from moekit.data.tokenizer import train_tokenizer
    from moekit.model.config import ModelConfig
    from moekit.model.transformer import MoETransformer
    from moekit.moe.config import MoEConfig
    from moekit.store.run_dir import save_export
    texts = ["Mr Speaker, the Government has made it clear", "Officials in Brussels warned"] * 30
    tok = train_tokenizer(texts, vocab_size=300)
    V = tok.get_vocab_size()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                      moe=MoEConfig(d_model=32, d_ff=32, num_experts=4, top_k=2))
    run_cfg = RunConfig.from_dict({"model": {"vocab_size": V}})
    save_export(MoETransformer.build(cfg), tok, run_cfg, tmp_path / "m")
    out = tmp_path / "gen.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_generate.py"), str(tmp_path / "m"),
           "--batch", "1", "3", "--max-new-tokens", "6", "--reps", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    assert "moekit/HF" in proc.stdout
    rows = json.loads(out.read_text())["results"][0]["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    for r in rows:
        assert r["transformers"]["ratio_to_transformers"] == 1.0 and r["moekit"]["tokens_per_s"] > 0
        assert r["greedy_rows_equal_transformers"] == f"{r['batch']}/{r['batch']}"   # the same model twice
