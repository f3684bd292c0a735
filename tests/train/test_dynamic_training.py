"""A dynamic number of experts per token in the model and the engine: torch.compile and
activation checkpointing equal eager, the budget controller steps once per optimizer step
on the step's histogram (all micro-batches), and a stopped run resumes exactly, controller
included."""

import json

import pytest
import torch

from moekit.cli.main import main as cli
from moekit.config import ModelConfig, MoEConfig
from moekit.model.transformer import MoETransformer

from ..conftest import rel_err
from .test_faults import small

DYNAMIC = {
    "top_p": dict(dynamic_k="top_p", top_p=0.6),
    "null": dict(dynamic_k="null", top_k=3, num_null_experts=2),
    "relu": dict(dynamic_k="relu", max_k=3),
}


def _model(mode: str) -> MoETransformer:
    torch.manual_seed(0)
    moe = MoEConfig(d_model=32, d_ff=32, num_experts=4, **DYNAMIC[mode])
    return MoETransformer(ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                                      max_seq_len=16, moe=moe))


def _loss_and_grads(model, fn, tokens):
    model.zero_grad(set_to_none=True)
    out = fn(tokens)
    (out.logits.square().mean() + 0.01 * out.aux_loss + out.sparsity_loss).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", list(DYNAMIC))
def test_activation_checkpointing_equals_eager(mode):
    model = _model(mode).train()
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    eager, g_eager = _loss_and_grads(model, model, tokens)
    model.activation_checkpointing = True
    ckpt, g_ckpt = _loss_and_grads(model, model, tokens)
    torch.testing.assert_close(ckpt.logits, eager.logits)
    assert g_eager.keys() == g_ckpt.keys() and any("null_ND" in n for n in g_eager) == (mode == "null")
    for name, g in g_eager.items():
        torch.testing.assert_close(g_ckpt[name], g, msg=name)
    hist = [a.experts_per_token for a in eager.moe.values()]
    assert any(int((h > 0).sum()) > 1 for h in hist)          # the number of experts does vary


@pytest.mark.parametrize("mode", ["top_p", "relu"])
def test_torch_compile_equals_eager(mode):
    model = _model(mode).train()
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    compiled, g_compiled = _loss_and_grads(model, torch.compile(model), tokens)
    eager, g_eager = _loss_and_grads(model, model, tokens)
    torch.testing.assert_close(compiled.logits, eager.logits, rtol=1e-5, atol=1e-5)
    assert g_eager.keys() == g_compiled.keys()
    for name, g in g_eager.items():
        assert rel_err(g_compiled[name], g) < 1e-5, name


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_controller_steps_on_each_steps_histogram(tmp_path, parl_subset):
    """k_control after step s = k_control before it - rate * sign(mean k of step s - target), with
    the mean over both micro-batches of the step (the logged experts_per_token at log_every=1)."""
    run = tmp_path / "run"
    sets = ["model.moe.dynamic_k=top_p", "model.moe.top_p=0.5", "model.moe.target_k=1.5",
            "model.moe.budget_rate=0.01", "train.grad_accum=2"]
    assert cli(["train", "--out", str(run), "--no-progress", *small(parl_subset, max_steps=6),
                *[a for s in sets for a in ("--set", s)]]) == 0
    rows = [r for r in _rows(run) if "moe/layer0/k_control" in r]
    assert [r["step"] for r in rows] == list(range(1, 7))
    p = 0.5
    for r in rows:
        k = r["moe/layer0/experts_per_token"]
        p = min(1.0, max(0.01, p - 0.01 * ((k > 1.5) - (k < 1.5))))
        assert r["moe/layer0/k_control"] == pytest.approx(p, abs=1e-6)
        assert sum(r["moe/layer0/k_hist"]) == pytest.approx(1.0)
    assert any(r["moe/layer0/k_control"] != 0.5 for r in rows)     # it moved (it may come back)


@pytest.mark.parametrize("mode", ["null", "relu"])
def test_a_stopped_dynamic_run_resumes_exactly(tmp_path, parl_subset, mode):
    sets = {"null": ["model.moe.dynamic_k=null", "model.moe.top_k=3", "model.moe.num_null_experts=2",
                     "model.moe.target_k=1"],
            "relu": ["model.moe.dynamic_k=relu", "model.moe.target_k=1", "model.moe.relu_l1=0.01"]}[mode]
    args = [*small(parl_subset, max_steps=6), *[a for s in sets for a in ("--set", s)]]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert cli(["train", "--out", str(whole), "--no-progress", *args]) == 0
    assert cli(["train", "--out", str(cut), "--no-progress", "--stop-at", "3", *args]) == 0
    assert cli(["train", "--resume", str(cut), "--no-progress"]) == 0
    keys = ("loss/lm", "moe/layer0/k_control", "moe/layer0/experts_per_token")
    a, b = ({r["step"]: [r[k] for k in keys] for r in _rows(d) if keys[0] in r} for d in (whole, cut))
    assert a == b and len(a) == 6
    if mode == "relu":
        assert any("loss/sparsity" in r for r in _rows(whole))
