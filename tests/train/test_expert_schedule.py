"""train.expert_schedule: the experts grow during training, with the optimizer state, exact
resume across a growth, every router, and one-line errors when the config is built."""

import json

import pytest
import torch

from moekit.config import RunConfig, parse_expert_schedule
from moekit.store.run_dir import load_run
from moekit.train.growth import full_state, grow_run
from moekit.train.objectives import Batch, Pretraining
from moekit.train.run import setup
from moekit.train.step import train_step
from moekit.train.trainer import train


def tiny(corpus, moe=None, **train_kw) -> RunConfig:
    moe = {"d_ff": 64, "top_k": 2, **(moe or {})}
    raw = {"data": {"corpus": str(corpus), "vocab_size": 512, "seq_len": 32},
           "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128, "moe": moe},
           "train": {"batch_size": 8, "max_steps": 10, "warmup_steps": 3, "lr": 3e-3, "eval_every": 100,
                     "eval_batches": 2, "log_every": 2, "save_every": 1000,
                     "expert_schedule": "2@0, 4@4, 8@7", **train_kw}}
    return RunConfig.from_dict(raw)


def rows(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def test_parse_and_experts_at():
    assert parse_expert_schedule("4@0, 8@300,16@600") == [(0, 4), (300, 8), (600, 16)]
    cfg = RunConfig.from_dict({"train": {"expert_schedule": "4@0, 8@300, 16@600"}})
    assert cfg.model.moe.num_experts == 4            # not set: the count at step 0
    assert [cfg.train.experts_at(s) for s in (0, 299, 300, 599, 600, 749)] == [4, 4, 8, 8, 16, 16]
    assert RunConfig().train.experts_at(10) is None


@pytest.mark.parametrize("raw, needle", [
    ({"train": {"expert_schedule": "4@0, 8@300, 16@750"}}, "not before max_steps=750"),
    ({"train": {"expert_schedule": "4@0, 8@300, 8@600"}}, "is not more than 8"),
    ({"train": {"expert_schedule": "4@0, 16@300, 8@600"}}, "is not more than 16"),
    ({"train": {"expert_schedule": "4@0, 8@300, 16@200"}}, "step 200 does not come after step 300"),
    ({"train": {"expert_schedule": "4@10, 8@300"}}, "starts at step 10, not 0"),
    ({"train": {"expert_schedule": "4 at 0"}}, "'4 at 0' is not experts@step"),
    ({"train": {"expert_schedule": 4}}, "must be a string"),
    ({"train": {"expert_schedule": "1@0, 2@10"}}, "top_k=2"),
    ({"train": {"expert_schedule": "4@0, 6@300"}}, "not a whole multiple"),
    ({"train": {"expert_schedule": "4@0, 6@300", "expert_growth": "most_loaded"}, "parallel": {"ep": 4}},
     "parallel.ep=4 does not divide 6 experts"),
    ({"train": {"expert_schedule": "4@0, 8@300"}, "model": {"moe": False}}, "the model is dense"),
    ({"train": {"expert_schedule": "4@0, 8@300"}, "model": {"moe": {"num_experts": 16}}},
     "never has model.moe.num_experts=16"),
    ({"train": {"expert_growth": "busiest"}}, "expert_growth='busiest'"),
    ({"train": {"expert_growth_noise": -1.0}}, "expert_growth_noise=-1.0"),
])
def test_bad_schedules_are_one_line_when_the_config_is_built(raw, needle):
    with pytest.raises(ValueError, match=None) as err:
        RunConfig.from_dict(raw)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg, msg


def test_a_resume_cut_short_of_a_growth_drops_it(tmp_path, parl_subset):
    from moekit.train.trainer import resumed_config
    cfg = tiny(parl_subset)                                   # "2@0, 4@4, 8@7", max_steps 10
    assert resumed_config(cfg, 2, {"max_steps": 6}).train.expert_schedule == "2@0, 4@4"
    assert resumed_config(cfg, 2, {"max_steps": 4}).train.expert_schedule == "2@0"
    assert resumed_config(cfg, 2, {"max_steps": 20}).train.expert_schedule == cfg.train.expert_schedule
    with pytest.raises(ValueError, match="the run is already at step 9; give max_steps >= 9"):
        resumed_config(cfg, 9, {"max_steps": 6})


def test_a_start_that_contradicts_num_experts_writes_nothing(tmp_path, parl_subset):
    cfg = tiny(parl_subset, moe={"num_experts": 4})          # 4 is in the schedule, but not at step 0
    with pytest.raises(ValueError, match=r"starts with 2 experts but model.moe.num_experts=4"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_growth_mid_run_is_logged_saved_and_loadable(tmp_path, parl_subset):
    run = tmp_path / "run"
    summary = train(tiny(parl_subset), run, progress=False)
    got = rows(run)
    growths = [r for r in got if "growth/jump" in r]
    assert [(r["step"], r["moe/num_experts"]) for r in growths] == [(4, 4.0), (7, 8.0)]
    for r in growths:
        assert r["growth/jump"] == pytest.approx(r["growth/val_after"] - r["growth/val_before"])
        assert abs(r["growth/jump"]) < 0.1                    # copies keep each expert's mass
    assert [g["to"] for g in summary["expert_growths"]] == [4, 8]
    loads = {r["step"]: len(r["moe/layer0/load"]) for r in got if "moe/layer0/load" in r}
    assert loads[4] == 2 and loads[6] == 4 and loads[10] == 8    # each interval's count of experts
    assert 7 in loads                                          # a growth step ends a log interval
    assert json.loads((run / "config.json").read_text())["model"]["moe"]["num_experts"] == 8
    model, _, cfg = load_run(run)
    assert cfg.model.moe.num_experts == 8 and model.moe_layers()[0].cfg.num_experts == 8
    assert len({r["step"] for r in got if "loss/lm" in r}) == len([r for r in got if "loss/lm" in r])


def test_an_exact_growth_does_not_move_the_validation_loss(tmp_path, parl_subset):
    cfg = tiny(parl_subset, moe={"top_k": 1, "top1_weight": "one"}, expert_growth_noise=0.0,
               expert_schedule="2@0, 4@3", max_steps=4)
    train(cfg, tmp_path / "run", progress=False)
    (g,) = [r for r in rows(tmp_path / "run") if "growth/jump" in r]
    assert g["growth/val_after"] == pytest.approx(g["growth/val_before"], abs=1e-5)


def test_resume_across_a_growth_follows_the_uninterrupted_run(tmp_path, parl_subset):
    cfg = tiny(parl_subset, save_every=3)
    train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", progress=False, stop_at=4)      # stopped at the growth step, before it
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["model"]["moe"]["num_experts"] == 2
    resumed = RunConfig.from_dict(saved)
    train(resumed, tmp_path / "b", resume=True, progress=False, stop_at=8)   # grows at 4 and 7
    summary = train(resumed, tmp_path / "b", resume=True, progress=False)
    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    lm = [{r["step"]: r["loss/lm"] for r in x if "loss/lm" in r} for x in (a, b)]
    assert lm[0] == lm[1]
    jumps = [[(r["step"], r["growth/val_after"]) for r in x if "growth/jump" in r] for x in (a, b)]
    assert jumps[0] == jumps[1] and len(jumps[0]) == 2          # each growth once, the same
    assert [(g["step"], g["from"], g["to"]) for g in summary["expert_growths"]] == [(4, 2, 4), (7, 4, 8)]
    ma, _, _ = load_run(tmp_path / "a")
    mb, _, _ = load_run(tmp_path / "b")
    for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(va, vb), k


def _stepped(cfg, run_dir, steps=2):
    run = setup(cfg, run_dir)
    for _ in range(steps):
        train_step(run, [Batch(*run.train_split.batch(run.sampler.next()))], Pretraining())
    return run


@pytest.mark.parametrize("moe", [
    {},                                                       # softmax, dropless
    {"capacity_factor": 1.0},                                 # capacity, tokens dropped
    {"router": "sigmoid", "aux_loss_free": True, "top_k": 1},  # aux-loss-free bias carried
    {"noisy_gating": True},
    {"router": "expert_choice"},
])
def test_grow_run_copies_weights_moments_and_biases(tmp_path, parl_subset, moe):
    cfg = tiny(parl_subset, moe=moe, expert_growth_noise=0.0)
    run = _stepped(cfg, tmp_path / "run")
    before = full_state(run)
    sampler = run.sampler.state_dict()
    grown = grow_run(run, 4)
    after = full_state(grown)
    assert grown.cfg.model.moe.num_experts == 4 and grown.step == run.step
    assert grown.sampler.state_dict() == sampler
    src = torch.tensor([0, 1, 0, 1])
    for name, t in before["model"].items():
        new = after["model"][name]
        if ".ffn.experts." in name or ".ffn.router." in name:
            if name.endswith("expert_bias_E") and cfg.model.moe.router == "softmax":
                assert torch.allclose(new, t[src] - torch.log(torch.tensor(2.0)))
            else:
                assert torch.equal(new, t[src]), name
        else:
            assert torch.equal(new, t), name
    for name, entry in before["optim"].items():
        for k, v in entry.items():
            want = v[src] if v.dim() and (".ffn.experts." in name or ".ffn.router." in name) else v
            assert torch.equal(after["optim"][name][k], want), (name, k)
    if moe.get("aux_loss_free"):
        assert bool(after["model"]["blocks.0.ffn.router.expert_bias_E"].abs().sum() > 0)   # moved, carried
    stats = train_step(grown, [Batch(*grown.train_split.batch(grown.sampler.next()))], Pretraining())
    assert not stats.skipped and stats.losses["lm"] == stats.losses["lm"]


def test_most_loaded_copies_the_busiest_expert_on_validation(tmp_path, parl_subset):
    from moekit.train.evaluate import evaluate
    cfg = tiny(parl_subset, expert_growth="most_loaded", expert_growth_noise=0.0,
               expert_schedule="2@0, 3@4", moe={"top_k": 1})
    run = _stepped(cfg, tmp_path / "run")
    loads = {}
    evaluate(run.model, run.val_split, 8, run.device, 2, loads=loads)
    assert sorted(loads) == [0, 1] and all(len(v) == 2 and sum(v) == 2 * 8 * 32 for v in loads.values())
    grown = grow_run(run, 3, loads)
    for i, layer in grown.moe_layers.items():
        busiest = max(range(2), key=lambda e: (loads[i][e], -e))
        w = layer.router.weight_ED
        assert torch.equal(w[2], run.moe_layers[i].router.weight_ED[busiest])


def test_report_marks_the_growths_and_shows_the_new_experts(tmp_path, parl_subset):
    from moekit.cli.main import main as cli
    from moekit.report.figures import read_metrics
    from moekit.report.html import load_heatmaps
    run = tmp_path / "run"
    train(tiny(parl_subset), run, progress=False)
    assert cli(["report", str(run), "--windows", "32"]) == 0
    page = (run / "report.html").read_text()
    assert 'id="growth"' in page and "<td>4</td><td>4</td>" in page and "<td>7</td><td>8</td>" in page
    # the heatmap has a row per expert of the largest count (2 -> 4 -> 8), and its columns are
    # the logged intervals (previous log, step], so a growth line sits on a column edge
    import matplotlib.pyplot as plt
    seen = []
    real = plt.Axes.pcolormesh

    def spy(self, x, y, c, *a, **k):
        seen.append((list(x), len(c)))
        return real(self, x, y, c, *a, **k)
    plt.Axes.pcolormesh = spy
    try:
        load_heatmaps(read_metrics(run), [0, 1])
    finally:
        plt.Axes.pcolormesh = real
    assert [rows for _, rows in seen[:2]] == [8, 8]             # (the colorbar draws one too)
    assert seen[0][0] == [0, 2, 4, 6, 7, 8, 10]          # log every 2, plus the growth at 7


def test_messages_name_the_schedule(tmp_path, parl_subset, capsys):
    for raw, needle in [
        ({"train": {"expert_schedule": "1@0, 2@10"}}, "starts with 1 expert, fewer than model.moe.top_k=2"),
        ({"train": {"expert_schedule": "  "}}, "is empty"),
    ]:
        with pytest.raises(ValueError, match=needle):
            RunConfig.from_dict(raw)
    grown = tmp_path / "grown"
    train(tiny(parl_subset, expert_schedule="2@0, 4@2", max_steps=4), grown, progress=False)
    from moekit.cli.main import main as cli
    assert cli(["train", "--from", str(grown), "--out", str(tmp_path / "from"), "--no-progress",
                "--set", f'data.corpus="{parl_subset}"', "--set", 'train.expert_schedule="2@0, 4@2"']) == 2
    err = capsys.readouterr().err
    assert "has 4; start the schedule at 4@0" in err and "train.init_from=" in err, err
    assert not (tmp_path / "from").exists()


def test_a_schedule_too_big_for_memory_is_refused_before_any_step(tmp_path, parl_subset):
    with pytest.raises(ValueError, match=r"grows to 1000000 experts per MoE layer: about \d+ GiB .* fewer"):
        train(tiny(parl_subset, expert_schedule="2@0, 1000000@4"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_cli_grow_and_torchrun_precheck_on_grown_runs(tmp_path, parl_subset, capsys):
    from moekit.cli.main import main as cli
    run = tmp_path / "run"
    train(tiny(parl_subset, expert_schedule="2@0, 4@2", max_steps=4), run, progress=False)
    assert cli(["grow", str(run), "--experts", "8", "--out", str(tmp_path / "g8")]) == 0
    model, _, cfg = load_run(tmp_path / "g8")
    assert cfg.model.moe.num_experts == 8 and cfg.train.expert_schedule is None
    sets = ["--set", f'data.corpus="{parl_subset}"', "--set", "model.moe.num_experts=4",
            "--set", 'train.expert_schedule="2@0, 4@4"', "--set", "train.max_steps=8"]
    capsys.readouterr()
    assert cli(["train", "--nproc", "2", "--no-progress", "--out", str(tmp_path / "np"), *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "starts with 2 experts but model.moe.num_experts=4" in err[0], err
    assert not (tmp_path / "np").exists()
