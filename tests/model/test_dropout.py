"""ModelConfig.dropout: on the embeddings and each residual branch in training mode only,
replayed under activation checkpointing, settable on a run started --from another model."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moekit import MoEConfig
from moekit.model import ModelConfig, MoETransformer
from moekit.store.source import _contradictions, _with_runtime


def tiny(dropout: float = 0.0, expert_dropout: float = 0.0) -> ModelConfig:
    return ModelConfig(vocab_size=53, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=8,
                       dropout=dropout, moe_layers="alternate",
                       moe=MoEConfig(d_model=16, d_ff=16, num_experts=4, expert_dropout=expert_dropout))


def pair(**kw) -> tuple[MoETransformer, MoETransformer]:
    """(a model with dropout, the same weights without)."""
    torch.manual_seed(0)
    dropped = MoETransformer(tiny(**kw))
    plain = MoETransformer(tiny())
    plain.load_state_dict(dropped.state_dict())
    return dropped, plain


TOKENS = torch.randint(0, 53, (2, 8), generator=torch.Generator().manual_seed(1))


def test_eval_logits_equal_no_dropout_and_training_differs():
    dropped, plain = pair(dropout=0.1, expert_dropout=0.4)
    assert torch.equal(dropped.eval()(TOKENS).logits, plain.eval()(TOKENS).logits)
    assert not torch.allclose(dropped.train()(TOKENS).logits, plain.train()(TOKENS).logits)


def test_dropout_sits_on_the_embeddings_and_both_residual_branches(monkeypatch):
    calls = []
    real = F.dropout
    monkeypatch.setattr(F, "dropout", lambda x, p, training: calls.append(p) or real(x, p, training))
    dropped, plain = pair(dropout=0.1)
    plain.train()(TOKENS)
    assert calls == []                         # p = 0: no op at all
    dropped.eval()(TOKENS)
    assert calls == []
    dropped.train()(TOKENS)
    assert calls == [0.1] * (1 + 2 * dropped.cfg.n_layers)


def test_activation_checkpointing_replays_the_masks():
    dropped, _ = pair(dropout=0.1, expert_dropout=0.4)
    grads = []
    for checkpointing in (False, True):
        dropped.zero_grad()
        dropped.activation_checkpointing = checkpointing
        torch.manual_seed(5)
        dropped.train()(TOKENS).logits.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in dropped.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("value", [1.0, -0.1, "x", None])
def test_bad_dropout_is_one_line_naming_the_field(value):
    with pytest.raises(ValueError, match=r"ModelConfig\.dropout=.*\[0, 1\)"):
        ModelConfig(dropout=value)


@pytest.mark.parametrize("dense", [False, True])
def test_a_run_from_another_model_may_set_dropout(dense):
    """The fine-tuning recipe's dropouts are no contradiction, for a dense SRC too."""
    src = dataclasses.replace(tiny(), moe=None) if dense else tiny()
    given = {"dropout": 0.1, "moe.expert_dropout": 0.4}
    assert _contradictions(given, src) == []
    cfg = _with_runtime(src, given, seq_len=8)
    assert cfg.dropout == 0.1
    assert cfg.moe is None if dense else cfg.moe.expert_dropout == 0.4
