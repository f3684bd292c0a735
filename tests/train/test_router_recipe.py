"""The routers' own recipe knobs: train.router_lr_scale and model.moe.router_init_std."""

import pytest
import torch

from moekit.config import RunConfig, TrainConfig
from moekit.model import ModelConfig, MoETransformer
from moekit.moe.config import MoEConfig
from moekit.train.objectives import Batch, Pretraining
from moekit.train.optim import build_optimizer
from moekit.train.run import setup
from moekit.train.step import train_step


def _cfg(corpus, **train):
    return RunConfig.from_dict({
        "data": {"corpus": str(corpus), "vocab_size": 512, "seq_len": 32},
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128,
                  "moe": {"d_ff": 64, "num_experts": 4, "top_k": 2}},
        "train": {"batch_size": 4, "max_steps": 4, "warmup_steps": 0, "lr": 1e-3, **train}})


def test_router_lr_scale_scales_only_the_routers_first_adam_step(tmp_path, parl_subset):
    deltas = {}
    for scale in (1.0, 0.1):
        run = setup(_cfg(parl_subset, router_lr_scale=scale), tmp_path / f"s{scale}")
        before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
        stats = train_step(run, [Batch(*run.train_split.batch(run.sampler.next()))], Pretraining())
        assert stats.lr == pytest.approx(1e-3)
        lrs = sorted({g["lr"] for g in run.optimizer.param_groups})
        assert lrs == ([1e-3] if scale == 1.0 else [pytest.approx(1e-4), 1e-3])
        moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in run.model.named_parameters()}
        deltas[scale] = moved
    for name, d in deltas[1.0].items():
        # AdamW's first step moves a weight by about lr (sign of its gradient), whatever its size
        want = d * 0.1 if ".router." in name else d
        assert deltas[0.1][name] == pytest.approx(want, rel=1e-3, abs=1e-9), name


def test_router_init_std_sets_the_routers_spread_and_the_default_is_fan_in():
    def router_std(**moe):
        cfg = ModelConfig(vocab_size=64, d_model=256, n_layers=1, n_heads=4, d_ff=64,
                          moe=MoEConfig(d_model=256, d_ff=64, num_experts=64, **moe))
        torch.manual_seed(0)
        return MoETransformer.build(cfg).moe_layers()[0].router.weight_ED.std().item()
    assert router_std() == pytest.approx(256 ** -0.5, rel=0.03)
    assert router_std(router_init_std=0.02) == pytest.approx(0.02, rel=0.03)
    assert router_std(router="expert_choice", router_init_std=0.005) == pytest.approx(0.005, rel=0.03)


@pytest.mark.parametrize("raw, needle", [
    ({"train": {"router_lr_scale": 0}}, "train.router_lr_scale=0"),
    ({"train": {"router_lr_scale": "fast"}}, "train.router_lr_scale='fast'"),
    ({"model": {"moe": {"router_init_std": -0.1}}}, "model.moe.router_init_std=-0.1"),
])
def test_bad_router_knobs_are_one_line(raw, needle):
    with pytest.raises(ValueError) as err:
        RunConfig.from_dict(raw)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_optimizer_groups_without_a_scale_are_the_two_of_before():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                      moe=MoEConfig(d_model=32, d_ff=16, num_experts=4))
    opt = build_optimizer(MoETransformer.build(cfg), TrainConfig(router_lr_scale=1.0))
    assert len(opt.param_groups) == 2 and all("lr_scale" not in g for g in opt.param_groups)


def test_warmup_defaults_to_a_fifth_of_the_steps_and_a_resume_keeps_it():
    from moekit.train.trainer import resumed_config
    assert TrainConfig().warmup_steps == 150 and TrainConfig(max_steps=1000).warmup_steps == 200
    assert TrainConfig(max_steps=1000, warmup_steps=40).warmup_steps == 40
    assert TrainConfig(max_steps=3).warmup_steps == 0
    cfg = RunConfig.from_dict({"train": {"max_steps": 500}})
    assert cfg.to_dict()["train"]["warmup_steps"] == 100              # saved resolved
    longer = resumed_config(cfg, 500, {"max_steps": 2000})
    assert longer.train.warmup_steps == 100                           # the trajectory's own warmup
    from pathlib import Path
    recipe = Path(__file__).resolve().parents[2] / "configs" / "tiny-moe.toml"
    assert RunConfig.from_toml(recipe).train.warmup_steps == RunConfig().train.warmup_steps
