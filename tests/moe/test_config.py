import pytest
import torch

from moekit import MoEConfig


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(top_k=9), "top_k"),
        (dict(top_k=0), "top_k"),
        (dict(d_model=0), "d_model"),
        (dict(d_ff=-4), "d_ff"),
        (dict(num_experts=0), "num_experts"),
        (dict(router="softmaxx"), "router"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_factor=-1.25), "capacity_factor"),
        (dict(drop_policy="random"), "drop_policy"),
        (dict(aux_loss_scope="world"), "aux_loss_scope"),
        (dict(activation="relu"), "activation"),
        (dict(backend="cuda"), "backend"),
        (dict(jitter_eps=1.5), "jitter_eps"),
        (dict(aux_loss_free=True), "aux_loss_free"),
        (dict(dtype=torch.bfloat16, d_model=100), "d_model"),
        (dict(dtype="bfloat16", d_ff=1001), "d_ff"),
        (dict(capacity_factor="1.25"), "capacity_factor"),
        (dict(capacity_factor=float("inf")), "capacity_factor"),
        (dict(jitter_eps=None), "jitter_eps"),
        (dict(jitter_eps=float("nan")), "jitter_eps"),
        (dict(num_shared_experts=1.5), "num_shared_experts"),
        (dict(bias_update_rate=float("nan")), "bias_update_rate"),
        (dict(noisy_gating=True, router="expert_choice"), "noisy_gating"),
        (dict(dtype="fp8"), "dtype"),
    ],
)
def test_bad_config_names_field_value_and_fix(kwargs, field):
    base = dict(d_model=64, d_ff=128, num_experts=8, top_k=2)
    with pytest.raises(ValueError) as info:
        MoEConfig(**{**base, **kwargs})
    msg = str(info.value)
    assert f"MoEConfig.{field}=" in msg
    assert f"{field}={kwargs[field]!r}" in msg
    assert ";" in msg and "\n" not in msg   # one line: constraint; fix


def test_bf16_dims_suggest_next_multiple_of_8():
    with pytest.raises(ValueError, match="use 104"):
        MoEConfig(d_model=100, d_ff=128, dtype=torch.bfloat16)


def test_defaults_and_dtype_strings():
    cfg = MoEConfig(d_model=512, d_ff=1024, num_experts=8, top_k=2)
    assert cfg.capacity_factor is None and cfg.router == "softmax" and cfg.dtype == torch.float32
    assert MoEConfig(d_model=8, d_ff=8, dtype="bfloat16").dtype == torch.bfloat16


def test_router_dtype_is_gone():
    # router math is always float32: the old key is an unknown keyword, not a silent no-op
    with pytest.raises(TypeError, match="router_dtype"):
        MoEConfig(d_model=8, d_ff=8, router_dtype=torch.float32)


def test_granularity_keeps_params_and_active_flops():
    cfg = MoEConfig(d_model=64, d_ff=256, num_experts=8, top_k=2)
    fine = cfg.with_granularity(4)
    assert (fine.num_experts, fine.d_ff, fine.top_k) == (32, 64, 8)
    assert fine.num_experts * fine.d_ff == cfg.num_experts * cfg.d_ff
    assert fine.top_k * fine.d_ff == cfg.top_k * cfg.d_ff
    with pytest.raises(ValueError, match="granularity"):
        cfg.with_granularity(3)
