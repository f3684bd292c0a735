"""train_step on its own: accumulation, objectives, non-finite steps, the aux-loss-free counts."""

import dataclasses

import torch

from moekit.config import RunConfig
from moekit.train.objectives import Batch, Loss, Pretraining
from moekit.train.run import setup
from moekit.train.step import train_step


def tiny_cfg(corpus, batch_size=8, grad_accum=1, moe=None, **train_kw) -> RunConfig:
    return RunConfig.from_dict({
        "data": {"corpus": str(corpus), "vocab_size": 512, "seq_len": 32},
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128,
                  "moe": {"d_ff": 64, "num_experts": 4, "top_k": 2, **(moe or {})}},
        "train": {"batch_size": batch_size, "grad_accum": grad_accum, "warmup_steps": 0, "lr": 0.5,
                  "grad_clip": 1e9, "telemetry": False, **train_kw}})


def sgd_run(cfg, run_dir):
    """A run whose optimizer is plain SGD: the update is lr * gradient, so equal updates mean
    equal gradients (AdamW's first step is about lr * sign(g) and would hide differences)."""
    run = setup(cfg, run_dir)
    run.optimizer = torch.optim.SGD(run.model.parameters(), lr=cfg.train.lr)
    return run


def windows(run, idx):
    return Batch(*run.train_split.batch(idx))


def test_accumulating_k_micro_batches_equals_one_step_on_the_k_times_batch(tmp_path, parl_subset):
    # the LM loss and the z-loss are means over tokens: accumulation over equal micro-batches is
    # exact for them (the load-balancing loss is a product of batch statistics, so it is left out)
    objective = Pretraining(aux_loss_coef=0.0, z_loss_coef=1e-2)
    whole = sgd_run(tiny_cfg(parl_subset, batch_size=8), tmp_path / "whole")
    accum = sgd_run(tiny_cfg(parl_subset, batch_size=2, grad_accum=4), tmp_path / "accum")
    before = {k: v.clone() for k, v in accum.model.state_dict().items()}
    assert all(torch.equal(v, whole.model.state_dict()[k]) for k, v in before.items())   # same init
    idx = list(range(8))
    s1 = train_step(whole, [windows(whole, idx)], objective)
    s4 = train_step(accum, [windows(accum, idx[i:i + 2]) for i in range(0, 8, 2)], objective)
    assert abs(s1.losses["lm"] - s4.losses["lm"]) < 1e-5 and abs(s1.losses["z"] - s4.losses["z"]) < 1e-5
    assert abs(s1.grad_norm - s4.grad_norm) < 1e-5 * s1.grad_norm
    moved = 0
    for k, w in whole.model.state_dict().items():
        a = accum.model.state_dict()[k]
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6, msg=k)
        moved += int(not torch.equal(w, before[k]))
    assert moved > 10                       # the step did update the weights
    assert whole.step == accum.step == 1 and s4.tokens == s1.tokens == 8 * 32


def test_an_objective_of_its_own_is_trained_and_its_parts_reported(tmp_path, parl_subset):
    run = sgd_run(tiny_cfg(parl_subset), tmp_path / "run")

    def last_token_only(out, batch):       # e.g. a classification-style objective
        logits = out.logits[:, -1].float()
        ce = torch.nn.functional.cross_entropy(logits, batch.targets[:, -1])
        return Loss(ce + 0.0 * out.aux_loss, {"last": ce, "aux": out.aux_loss})

    batch = windows(run, list(range(8)))
    first = train_step(run, [batch], last_token_only)
    for _ in range(5):
        later = train_step(run, [batch], last_token_only)
    assert set(first.losses) == {"last", "aux", "total"}
    assert later.losses["last"] < first.losses["last"] - 0.5


def test_a_non_finite_loss_skips_the_update_and_advances_the_step(tmp_path, parl_subset):
    run = sgd_run(tiny_cfg(parl_subset), tmp_path / "run")
    before = {k: v.clone() for k, v in run.model.state_dict().items()}

    def nan_objective(out, batch):
        part = Pretraining()(out, batch)
        return dataclasses.replace(part, total=part.total * float("nan"))

    stats = train_step(run, [windows(run, list(range(8)))], nan_objective)
    assert stats.skipped and run.step == 1
    assert all(torch.equal(v, before[k]) for k, v in run.model.state_dict().items())
    assert all(p.grad is None for p in run.model.parameters())     # nothing carried into the next step
    ok = train_step(run, [windows(run, list(range(8)))], Pretraining())
    assert not ok.skipped and run.step == 2


def test_aux_loss_free_counts_are_summed_over_the_micro_batches(tmp_path, parl_subset):
    moe = {"router": "sigmoid", "aux_loss_free": True, "bias_update_rate": 0.25}
    run = sgd_run(tiny_cfg(parl_subset, batch_size=2, grad_accum=2, moe=moe), tmp_path / "run")
    layer = run.moe_layers[0]
    b1, b2 = windows(run, [0, 1]), windows(run, [2, 3])
    with torch.no_grad():                  # the counts each micro-batch will route (bias fixed in the step)
        run.model.eval()
        c = sum(run.model(b.inputs).moe[0].tokens_per_expert for b in (b1, b2))
        run.model.train()
    train_step(run, [b1, b2], Pretraining())
    expected = 0.25 * torch.sign(c.float().mean() - c.float())
    torch.testing.assert_close(layer.router.expert_bias_E, expected)
