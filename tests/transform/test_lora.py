"""LoRA adapters: the base model exactly at init, gradients reaching every expert's factors,
the fast path equal to the slow reference with adapters on, merging, state dicts, training
only the adapters, and one-line errors for bad arguments."""

import copy
import math

import pytest
import torch
from torch import nn

from moekit import MoEConfig, MoELayer, reference_moe
from moekit.model.config import ModelConfig
from moekit.model.transformer import MoETransformer
from moekit.moe.experts import HAS_GROUPED_MM, GroupedExperts
from moekit.train.optim import param_groups
from moekit.transform.lora import LoRA2d, LoRA3d, add_lora, has_lora, lora_parameters, merge_lora

from ..conftest import rel_err

ALL = ("experts", "attention", "dense_ffn", "shared")
EXPERT_WEIGHTS = ("w_gate_EDF", "w_up_EDF", "w_down_EFD")


def tiny(shared: int = 1, activation: str = "swiglu", qkv_bias: bool = False, **moe) -> ModelConfig:
    """Two layers: block 0 dense, block 1 MoE (4 experts, top-2, ``shared`` shared experts)."""
    return ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=2, d_ff=64, moe_layers="alternate",
                       qkv_bias=qkv_bias, moe=MoEConfig(d_model=32, d_ff=32, num_experts=4,
                                                        num_shared_experts=shared, activation=activation,
                                                        **moe))


def model_and_copy(cfg: ModelConfig, seed: int = 0) -> tuple[MoETransformer, MoETransformer]:
    torch.manual_seed(seed)
    model = MoETransformer(cfg).eval()
    return model, copy.deepcopy(model)


def adapters(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (LoRA2d, LoRA3d))]


@torch.no_grad()
def randomize_b(model: nn.Module, std: float = 0.1) -> None:
    """Make every delta nonzero (B is zero at init)."""
    for lora in adapters(model):
        lora.B.normal_(0.0, std)


def tokens(seed: int = 1, shape=(4, 16)) -> torch.Tensor:
    return torch.randint(0, 97, shape, generator=torch.Generator().manual_seed(seed))


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every non-adapter tensor of the state dict, copied."""
    return {k: v.clone() for k, v in model.state_dict().items() if not k.endswith((".0.A", ".0.B"))}


@pytest.mark.parametrize("cfg", [tiny(), tiny(shared=0), tiny(activation="gelu"), tiny(qkv_bias=True),
                                 tiny(shared=1, shared_gate=True)],
                         ids=["shared", "no_shared", "gelu", "qkv_bias", "gated_shared"])
def test_adapted_model_equals_base_at_init(cfg):
    model, base = model_and_copy(cfg)
    summary = add_lora(model, rank=4, alpha=8.0, targets=ALL)
    m = cfg.moe
    n_ffn = 3 if m.activation == "swiglu" else 2
    n_shared = n_ffn if m.num_shared_experts else 0
    counts = {"experts": n_ffn, "attention": 8, "dense_ffn": 3, "shared": n_shared}
    assert summary["targets"] == counts and summary["adapted"] == sum(counts.values())
    D, F, E, r, W = 32, 32, 4, 4, m.shared_width
    expected = (n_ffn * E * r * (D + F)               # experts: A [E, I, r], B [E, r, O]
                + 2 * 4 * r * (D + D)                 # attention: 2 layers x wq, wk, wv, wo
                + 3 * r * (D + 64)                    # dense FFN of block 0
                + (n_ffn * r * (D + W) if W else 0))  # shared FFN
    assert summary["lora_params"] == expected == sum(p.numel() for p in lora_parameters(model))
    assert summary["base_params"] == sum(p.numel() for p in base.parameters())
    for lora in adapters(model):                      # the paper's init: A random, B zero
        assert float(lora.A.detach().abs().sum()) > 0 and float(lora.B.detach().abs().sum()) == 0
    x = tokens()
    out, ref = model(x), base(x)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.aux_loss, ref.aux_loss)


def test_every_expert_factor_gets_a_gradient_and_the_base_none():
    model, _ = model_and_copy(tiny())
    add_lora(model, rank=4, alpha=8.0, targets=ALL)
    model.train()
    x = tokens(shape=(4, 16))
    out = model(x)
    counts = out.moe[1].tokens_per_expert
    assert int(counts.min()) > 0, counts                   # every expert got tokens
    loss = nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens(seed=2).flatten()) + out.aux_loss
    loss.backward()
    experts = model.blocks[1].ffn.experts
    for name in EXPERT_WEIGHTS:
        lora = experts.parametrizations[name][0]
        assert isinstance(lora, LoRA3d)
        for e in range(4):
            assert float(lora.B.grad[e].abs().sum()) > 0, (name, e)
        # with B = 0 the gradient of A is exactly zero (dL/dA = x^T g B^T)
        assert float(lora.A.grad.abs().sum()) == 0, name
    for lora in adapters(model):
        assert lora.B.grad is not None and float(lora.B.grad.abs().sum()) > 0
    lora_ids = {id(p) for p in lora_parameters(model)}
    for name, p in model.named_parameters():
        if id(p) not in lora_ids:
            assert not p.requires_grad and p.grad is None, name


def test_adapted_weight_is_the_base_plus_scaled_rank_r_delta():
    """experts: W[e] + (alpha / r) * A[e] @ B[e], expert by expert; nn.Linear: W + (alpha / r) * B @ A."""
    model, base = model_and_copy(tiny())
    add_lora(model, rank=3, alpha=6.0, targets=ALL)     # scale 2
    randomize_b(model)
    experts, base_experts = model.blocks[1].ffn.experts, base.blocks[1].ffn.experts
    with torch.no_grad():
        for name in EXPERT_WEIGHTS:
            lora = experts.parametrizations[name][0]
            w, w0 = getattr(experts, name), getattr(base_experts, name)
            for e in range(4):
                torch.testing.assert_close(w[e], w0[e] + 2.0 * lora.A[e] @ lora.B[e], rtol=0, atol=1e-6)
                assert int(torch.linalg.matrix_rank(w[e] - w0[e])) == 3
        wq, lora = model.blocks[0].attn.wq, model.blocks[0].attn.wq.parametrizations.weight[0]
        torch.testing.assert_close(wq.weight, base.blocks[0].attn.wq.weight + 2.0 * lora.B @ lora.A,
                                   rtol=0, atol=1e-6)


BACKENDS = ["auto", "segment_mm", "padded_mm", "reference"] + (["grouped_mm"] if HAS_GROUPED_MM else [])


def _grads(y, named, x, grad_out):
    gs = torch.autograd.grad(y, [x] + [p for _, p in named], grad_out)
    return dict(zip(["x"] + [n for n, _ in named], gs))


@pytest.mark.parametrize("cf", [None, 1.0], ids=["dropless", "capacity"])
def test_fast_path_matches_reference_with_adapters(cf):
    torch.manual_seed(3)
    cfg = MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2, num_shared_experts=1, capacity_factor=cf)
    layer = MoELayer(cfg).eval()
    with torch.no_grad():
        layer.router.weight_ED[0] += 0.5                 # skewed: capacity drops something
    base = copy.deepcopy(layer)
    add_lora(layer, rank=2, alpha=4.0, targets=("experts", "shared"))
    randomize_b(layer, std=0.3)
    named = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    assert len(named) == 2 * 6                           # A, B of 3 expert and 3 shared weights
    x = (torch.randn(24, 16) + 0.2).requires_grad_()
    grad_out = torch.randn(24, 16)
    y_ref = reference_moe(layer, x)
    ref = _grads(y_ref, named, x, grad_out)
    assert rel_err(y_ref, base(x)[0]) > 0.05             # the adapters change the function
    assert layer.experts.resolve_backend(x) == "segment_mm"   # auto on CPU
    for backend in BACKENDS:
        layer.experts.backend = backend
        y, aux = layer(x)
        assert rel_err(y, y_ref) < 1e-5, backend
        fast = _grads(y, named, x, grad_out)
        for name, g in fast.items():
            assert rel_err(g, ref[name]) < 1e-5, (backend, name, rel_err(g, ref[name]))
        for name in EXPERT_WEIGHTS:                     # B != 0 now: every expert's A learns
            g = fast[f"experts.parametrizations.{name}.0.A"]
            assert all(float(g[e].abs().sum()) > 0 for e in range(4)), (backend, name)
        assert (float(aux.dropped_fraction) > 0) == (cf is not None)


def test_merge_keeps_the_function_and_restores_the_base_keys():
    cfg = tiny(qkv_bias=True)
    model, _ = model_and_copy(cfg)
    fresh = MoETransformer(cfg)
    add_lora(model, rank=4, alpha=8.0, targets=ALL)
    randomize_b(model)
    x = tokens()
    adapted = model(x).logits
    assert any(".parametrizations." in k for k in model.state_dict())
    merged = merge_lora(model)
    assert merged is model and not has_lora(model)
    assert torch.allclose(model(x).logits, adapted, atol=1e-5, rtol=0)
    assert list(model.state_dict()) == list(fresh.state_dict())           # names and order
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in fresh.named_parameters()]
    assert all(v.shape == fresh.state_dict()[k].shape for k, v in model.state_dict().items())
    assert type(model.blocks[1].ffn.experts) is GroupedExperts
    fresh.load_state_dict(model.state_dict())          # a plain model takes the merged weights
    assert torch.allclose(fresh.eval()(x).logits, adapted, atol=1e-5, rtol=0)


def test_state_dict_round_trips_into_an_adapted_model():
    cfg = tiny()
    model, _ = model_and_copy(cfg, seed=0)
    add_lora(model, rank=4, alpha=8.0, targets=ALL)
    randomize_b(model)
    state = model.state_dict()
    for key in ("blocks.1.ffn.experts.parametrizations.w_up_EDF.original",
                "blocks.1.ffn.experts.parametrizations.w_up_EDF.0.A",
                "blocks.1.ffn.experts.parametrizations.w_down_EFD.0.B",
                "blocks.0.attn.wq.parametrizations.weight.original",
                "blocks.1.ffn.shared.w_up.parametrizations.weight.0.B"):
        assert key in state, key
    assert state["blocks.1.ffn.experts.parametrizations.w_up_EDF.0.A"].shape == (4, 32, 4)
    assert state["blocks.1.ffn.experts.parametrizations.w_up_EDF.0.B"].shape == (4, 4, 32)
    other, _ = model_and_copy(cfg, seed=1)
    add_lora(other, rank=4, alpha=8.0, targets=ALL)
    x = tokens()
    assert not torch.allclose(other(x).logits, model(x).logits)
    other.load_state_dict(state)
    assert torch.equal(other(x).logits, model(x).logits)


def test_a_step_trains_the_adapters_and_leaves_the_base_bitwise():
    model, _ = model_and_copy(tiny())
    add_lora(model, rank=4, alpha=8.0, targets=ALL)
    before = base_state(model)
    x = tokens()
    logits0 = model(x).logits.detach()
    opt = torch.optim.AdamW(param_groups(model, weight_decay=0.1), lr=1e-2)
    model.train()
    out = model(x)
    loss = nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens(seed=2).flatten())
    loss.backward()
    opt.step()
    model.eval()
    after = base_state(model)
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    with torch.no_grad():
        assert float((model(x).logits - logits0).abs().max()) > 1e-4
    assert all(float(lora.B.detach().abs().sum()) > 0 for lora in adapters(model))


def test_weights_read_as_tensors_and_follow_model_dtype():
    model, base = model_and_copy(tiny())
    add_lora(model, rank=4, alpha=8.0, targets=ALL)
    experts = model.blocks[1].ffn.experts
    assert experts.w_up_EDF.shape == (4, 32, 32) and experts.w_down_EFD.shape == (4, 32, 32)
    assert experts.w_up_EDF.dtype == torch.float32
    assert experts.weights(torch.bfloat16)[1].dtype == torch.bfloat16
    model.to(torch.bfloat16)
    base.to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in lora_parameters(model))
    x = tokens()
    assert torch.equal(model(x).logits, base(x).logits)   # still the base model exactly, in bf16


@pytest.mark.parametrize("kwargs, field", [
    ({"rank": 0}, "finetune.lora_rank=0"), ({"rank": -2}, "finetune.lora_rank=-2"),
    ({"rank": 2.0}, "finetune.lora_rank=2.0"), ({"rank": True}, "finetune.lora_rank=True"),
    ({"rank": "4"}, "finetune.lora_rank='4'"), ({"rank": None}, "finetune.lora_rank=None"),
    ({"alpha": 0}, "finetune.lora_alpha=0"), ({"alpha": -1.0}, "finetune.lora_alpha=-1.0"),
    ({"alpha": math.nan}, "finetune.lora_alpha=nan"), ({"alpha": math.inf}, "finetune.lora_alpha=inf"),
    ({"alpha": True}, "finetune.lora_alpha=True"), ({"alpha": "16"}, "finetune.lora_alpha='16'"),
    ({"targets": ("router",)}, "finetune.lora_targets=('router',)"),
    ({"targets": ("experts", "mlp")}, "finetune.lora_targets=('experts', 'mlp')"),
    ({"targets": ()}, "finetune.lora_targets=()"),
    ({"targets": "experts"}, "finetune.lora_targets='experts'"),
    ({"targets": None}, "finetune.lora_targets=None"),
])
def test_bad_arguments_raise_one_line_and_leave_the_model_alone(kwargs, field):
    model, _ = model_and_copy(tiny())
    args = {"rank": 4, "alpha": 8.0, "targets": ALL, **kwargs}
    with pytest.raises(ValueError) as err:
        add_lora(model, **args)
    msg = str(err.value)
    assert msg.startswith(field) and "\n" not in msg and "; " in msg, msg   # field=value: what; fix
    assert not has_lora(model) and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("make, targets", [
    (lambda: MoETransformer(ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=2, d_ff=64)),
     ("experts", "shared")),
    (lambda: MoETransformer(tiny(shared=0)), ("shared",)),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU()), ("attention",)),
], ids=["dense_model", "no_shared_expert", "plain_module"])
def test_a_model_without_the_targets_is_an_error(make, targets):
    model = make()
    with pytest.raises(ValueError, match=r"^finetune\.lora_targets=.*none of these.*; pick targets"):
        add_lora(model, rank=4, alpha=8.0, targets=targets)
    assert not has_lora(model)


def test_adapting_twice_is_an_error():
    model, _ = model_and_copy(tiny())
    add_lora(model, rank=4, alpha=8.0, targets=("experts",))
    with pytest.raises(ValueError, match="already has LoRA adapters; merge_lora"):
        add_lora(model, rank=4, alpha=8.0, targets=("attention",))
    assert not any(".attn.wq.parametrizations" in k for k in model.state_dict())
