"""Expert dropout (Switch Transformer fine-tuning): one mask per forward on the experts'
hidden activation, the same in every backend; nothing at p = 0 or in eval mode."""

import pytest
import torch

from moekit import MoEConfig, MoELayer, reference_moe
from moekit.moe.experts import HAS_GROUPED_MM, GroupedExperts, expert_loop

BACKENDS = ["segment_mm", "padded_mm", "reference"] + (["grouped_mm"] if HAS_GROUPED_MM else [])
COUNTS = {"mixed": [3, 0, 5, 2], "one_expert": [0, 10, 0, 0]}


def experts_for(backend: str, p: float = 0.4, activation: str = "swiglu") -> GroupedExperts:
    torch.manual_seed(0)   # the same weights for every backend
    return GroupedExperts(MoEConfig(d_model=8, d_ff=12, num_experts=4, top_k=1, backend=backend,
                                    activation=activation, expert_dropout=p))


def run(experts: GroupedExperts, counts: list[int], seed: int = 1) -> dict[str, torch.Tensor]:
    """Output and gradients (x, every weight) of one training-mode forward under ``seed``."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(sum(counts), 8, generator=g, requires_grad=True)
    torch.manual_seed(seed)
    y = experts(x, torch.tensor(counts))
    y.backward(torch.randn(y.shape, generator=g))
    out = {"y": y.detach(), "x": x.grad}
    out.update({name: p.grad for name, p in experts.named_parameters()})
    return out


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("case", sorted(COUNTS))
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_backends_agree_in_output_and_gradients(backend, case, activation):
    ref = run(experts_for("reference", activation=activation), COUNTS[case])
    fast = run(experts_for(backend, activation=activation), COUNTS[case])
    assert fast.keys() == ref.keys()
    for name, r in ref.items():
        torch.testing.assert_close(fast[name], r, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    # and dropout took place: the p = 0 experts give another output
    assert not torch.allclose(run(experts_for(backend, p=0.0, activation=activation), COUNTS[case])["y"],
                              ref["y"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_applies_the_one_mask_it_draws(backend):
    experts = experts_for(backend)
    x, counts = torch.randn(10, 8), torch.tensor(COUNTS["mixed"])
    torch.manual_seed(3)
    mask_RF = experts.dropout_mask(x)
    torch.manual_seed(3)
    y = experts(x, counts)
    expected = expert_loop(x, counts, *experts.weights(x.dtype), mask_RF)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_mode_equals_no_dropout_exactly(backend):
    x, counts = torch.randn(10, 8), torch.tensor(COUNTS["mixed"])
    dropped, plain = experts_for(backend).eval(), experts_for(backend, p=0.0)
    assert dropped.dropout_mask(x) is None
    assert torch.equal(dropped(x, counts), plain(x, counts))


def test_no_dropout_draws_no_random_numbers():
    """p = 0 in training mode: pretraining consumes the RNG stream exactly as before."""
    experts, x = experts_for("segment_mm", p=0.0).train(), torch.randn(10, 8)
    state = torch.get_rng_state()
    experts(x, torch.tensor(COUNTS["mixed"]))
    assert torch.equal(torch.get_rng_state(), state)


def test_training_mask_drops_a_fraction_p():
    p = 0.4
    experts = experts_for("segment_mm", p=p).train()
    torch.manual_seed(0)
    mask_RF = experts.dropout_mask(torch.randn(4096, 8))
    assert mask_RF.shape == (4096, 12) and mask_RF.dtype == torch.float32
    assert mask_RF.unique().tolist() == [0.0, pytest.approx(1 / (1 - p))]
    assert float((mask_RF == 0).float().mean()) == pytest.approx(p, abs=0.01)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_drops_in_training_and_matches_the_reference_in_eval(backend):
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=8, d_ff=12, num_experts=4, top_k=2, backend=backend,
                               expert_dropout=0.4))
    x = torch.randn(6, 8)
    y_train, _ = layer.train()(x)
    y_eval, _ = layer.eval()(x)
    assert not torch.allclose(y_train, y_eval)
    torch.testing.assert_close(y_eval, reference_moe(layer, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", [1.0, -0.1, "x", float("nan"), True])
def test_bad_expert_dropout_is_one_line_naming_the_field(value):
    with pytest.raises(ValueError, match=r"MoEConfig\.expert_dropout=.*\[0, 1\)"):
        MoEConfig(d_model=8, d_ff=8, expert_dropout=value)
