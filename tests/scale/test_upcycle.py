"""Upcycling preserves the dense function at step 0, for every layer pattern."""

import pytest
import torch

from moekit.cli.main import main as cli
from moekit.model.config import ModelConfig
from moekit.model.transformer import MoETransformer
from moekit.scale.upcycle import upcycle


def dense(n_layers=4, tie=True):
    torch.manual_seed(0)
    model = MoETransformer.build(ModelConfig(vocab_size=101, d_model=32, n_layers=n_layers, n_heads=4,
                                             n_kv_heads=2, d_ff=64, tie_embeddings=tie))
    with torch.no_grad():                       # larger weights: differences would show
        for p in model.parameters():
            p.mul_(5.0)
    return model.eval()


TOKENS = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("layers", ["all", "alternate", [0, 3]])
@pytest.mark.parametrize("experts, top_k", [(2, 2), (8, 2), (8, 3)])
@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_copy_upcycle_equals_the_dense_model(layers, experts, top_k, router):
    src = dense()
    moe = upcycle(src, experts, top_k, layers=layers, router=router).eval()
    with torch.no_grad():
        want, got = src(TOKENS).logits, moe(TOKENS).logits
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert sorted(moe.moe_layers()) == moe.cfg.moe_layer_ids() and moe.moe_layers()
    aux = moe(TOKENS).moe
    routed = sum(int((a.tokens_per_expert > 0).sum()) for a in aux.values())
    assert routed > len(aux)                    # the router spreads tokens: not one expert per layer


def test_upcycled_experts_are_copies_and_diverge_with_training():
    src = dense(n_layers=2, tie=False)
    moe = upcycle(src, 4, 2).train()
    ex = moe.blocks[0].ffn.experts
    assert torch.equal(ex.w_up_EDF[0], src.blocks[0].ffn.w_up.weight.t())
    assert torch.equal(ex.w_up_EDF[3], ex.w_up_EDF[0])
    assert torch.equal(moe.blocks[1].attn.wq.weight, src.blocks[1].attn.wq.weight)   # attention untouched
    assert torch.equal(moe.lm_head.weight, src.lm_head.weight)
    opt = torch.optim.SGD(moe.parameters(), lr=1e-3)
    for _ in range(2):
        out = moe(TOKENS)
        (out.logits.float().logsumexp(-1).mean() + 0.01 * out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(ex.w_up_EDF[0], ex.w_up_EDF[1])       # the router breaks the symmetry


def test_router_init_and_refusals():
    src = dense(n_layers=2)
    zeros = upcycle(src, 4, 2, router_init="zeros")
    assert all(float(layer.router.weight_ED.detach().abs().max()) == 0
               for layer in zeros.moe_layers().values())
    normal = upcycle(src, 4, 2, seed=1)
    std = float(normal.blocks[0].ffn.router.weight_ED.detach().std())
    assert 0.01 < std < 0.03
    with pytest.raises(ValueError, match="already an MoE"):
        upcycle(normal, 4, 2)
    with pytest.raises(ValueError, match="top_k=1"):
        upcycle(src, 4, 1)
    with pytest.raises(ValueError, match="MoEConfig.top_k=5: exceeds num_experts=4"):
        upcycle(src, 4, 5)
    with pytest.raises(ValueError, match="capacity"):
        upcycle(src, 4, 2, capacity_factor=1.25)


def test_cli_upcycles_a_model_directory(tmp_path, capsys):
    from moekit.config import RunConfig
    from moekit.data.tokenizer import train_tokenizer
    from moekit.train.run_dir import load_run, save_export
    model = MoETransformer.build(ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4,
                                             d_ff=64)).eval()
    tok = train_tokenizer(["the house will come to order " * 10] * 4, vocab_size=300)
    save_export(model, tok, RunConfig(model=model.cfg), tmp_path / "dense")
    assert cli(["upcycle", str(tmp_path / "dense"), "--experts", "4", "--layers", "1", "--out",
                str(tmp_path / "moe")]) == 0
    moe, _, _ = load_run(tmp_path / "moe")
    assert sorted(moe.moe_layers()) == [1]
    x = torch.tensor([tok.encode("the house will come").ids])
    with torch.no_grad():
        assert torch.allclose(moe(x).logits, model(x).logits, atol=1e-5)
    capsys.readouterr()
    assert cli(["upcycle", str(tmp_path / "moe"), "--experts", "4", "--out", str(tmp_path / "again")]) == 2
    assert "already an MoE" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()
