"""AdamW's state carried through upcycle and grow: mapped the way the weights are, and where a
transform is exact, the next step after it is the step the untransformed model takes."""

import copy

import pytest
import torch
import torch.nn.functional as F

from moekit.config import TrainConfig
from moekit.model.config import ModelConfig
from moekit.model.transformer import MoETransformer
from moekit.moe.config import MoEConfig
from moekit.parallel.checkpointing import training_state
from moekit.train.optim import build_optimizer, load_named_state
from moekit.transform.grow import block_plan, grow, grown_optimizer_state
from moekit.transform.upcycle import upcycle, upcycled_optimizer_state

CFG = TrainConfig(lr=1e-2, weight_decay=0.1)
TOKENS = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1))


def ce(model, tokens=TOKENS):
    logits = model(tokens[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def trained(model, steps=3):
    """``model`` after a few AdamW steps on varied batches, and its state by parameter name."""
    opt = build_optimizer(model, CFG)
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        opt.zero_grad()
        ce(model, torch.randint(0, 97, (4, 16), generator=gen)).backward()
        opt.step()
    return model, copy.deepcopy(training_state(model, opt)["optim"])


def step(model, optim):
    """One AdamW step on TOKENS from ``optim`` (None: a fresh optimizer); the model after it."""
    model = copy.deepcopy(model).train()
    opt = build_optimizer(model, CFG)
    if optim is not None:
        load_named_state(opt, model, optim)
    opt.zero_grad()
    ce(model).backward()
    opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}


def dense_model(**kw):
    torch.manual_seed(0)
    return MoETransformer.build(ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=64, **kw))


def test_copy_upcycle_with_carried_state_steps_like_the_dense_model():
    dense, optim = trained(dense_model())
    moe = upcycle(dense, 4, 2)
    carried = upcycled_optimizer_state(optim, dense, 4, 2)
    want = step(dense, optim)
    got, fresh = step(moe, carried), step(moe, None)
    outside = [n for n in want if ".ffn." not in n]
    assert outside
    for name in outside:                 # the attention, norms and embedding step as the dense ones
        assert torch.allclose(got[name], want[name], atol=2e-6, rtol=0), name
    # the comparison could fail: a fresh optimizer takes another step
    assert max(float((fresh[n] - want[n]).abs().max()) for n in outside) > 1e-3


def test_depth_growth_with_carried_state_steps_old_blocks_like_the_small_model():
    moe_cfg = MoEConfig(d_model=32, d_ff=32, num_experts=4, top_k=2)
    small, optim = trained(dense_model(moe=moe_cfg, moe_layers=[1]))
    big = grow(small, n_layers=3)
    carried = grown_optimizer_state(optim, small, n_layers=3)
    want, got, fresh = step(small, optim), step(big, carried), step(big, None)
    plan = block_plan(2, 3, "zero")
    where = {i: p for p, (i, new) in enumerate(plan) if not new}
    pairs = []
    for name in want:
        parts = name.split(".")
        if parts[0] == "blocks":
            parts[1] = str(where[int(parts[1])])
        pairs.append((name, ".".join(parts)))
    for small_name, big_name in pairs:
        assert torch.allclose(got[big_name], want[small_name], atol=2e-6, rtol=0), big_name
    assert max(float((fresh[b] - want[s]).abs().max()) for s, b in pairs) > 1e-3
    new_block = next(p for p, (_, new) in enumerate(plan) if new)
    assert not any(n.startswith(f"blocks.{new_block}.") for n in carried)   # a new block starts fresh
    assert float(carried["embed.weight"]["step"]) == 3.0


def test_upcycled_moments_are_mapped_like_the_weights():
    dense, optim = trained(dense_model())
    for method, kw in (("copy", {}), ("virtual-group", {"granularity": 2}), ("drop", {"drop_ratio": 0.25})):
        top_k = 2
        moe = upcycle(dense, 4, top_k, method=method, shared_from_ffn=method == "copy", **kw)
        carried = upcycled_optimizer_state(optim, dense, 4, top_k, method=method,
                                           shared_from_ffn=method == "copy", **kw)
        assert set(carried) == {n for n, _ in moe.named_parameters()} - {
            f"blocks.{i}.ffn.router.weight_ED" for i in range(2)}        # new routers: no state
        for i in range(2):
            src = {k: optim[f"blocks.{i}.ffn.{k}.weight"] for k in ("w_gate", "w_up", "w_down")}
            ex = moe.blocks[i].ffn.experts
            for e in range(4):
                for k, shape in (("w_gate", "EDF"), ("w_up", "EDF"), ("w_down", "EFD")):
                    name = f"blocks.{i}.ffn.experts.{k}_{shape}"
                    got = carried[name]["exp_avg_sq"][e]
                    want = src[k]["exp_avg_sq"].t()
                    if method == "virtual-group":
                        w = 32
                        cut = slice((e % 2) * w, (e % 2) * w + w)
                        want = want[:, cut] if shape == "EDF" else want[cut]
                        assert torch.equal(got, want), (name, e)
                    elif method == "drop":
                        weight = getattr(ex, f"{k}_{shape}")[e].detach()
                        source = getattr(dense.blocks[i].ffn, k).weight.detach().t()
                        redrawn = weight != source
                        assert 0 < float(redrawn.float().mean()) < 0.5
                        assert torch.equal(got[redrawn], torch.zeros_like(got[redrawn]))
                        assert torch.equal(got[~redrawn], want[~redrawn])
                    else:
                        assert torch.equal(got, want), (name, e)
                    assert float(carried[name]["step"]) == 3.0
            if method == "copy":                 # the shared expert: the FFN's state as it is
                for k in ("w_gate", "w_up", "w_down"):
                    assert torch.equal(carried[f"blocks.{i}.ffn.shared.{k}.weight"]["exp_avg"],
                                       src[k]["exp_avg"])


def test_grown_moments_follow_the_weights_maps():
    small, optim = trained(dense_model())
    big = grow(small, d_ff=96, seed=3)
    carried = grown_optimizer_state(optim, small, d_ff=96, seed=3)
    for i in range(2):
        w_big = big.blocks[i].ffn.w_gate.weight.detach()
        w_small = small.blocks[i].ffn.w_gate.weight.detach()
        gate = optim[f"blocks.{i}.ffn.w_gate.weight"]["exp_avg"]
        down = optim[f"blocks.{i}.ffn.w_down.weight"]["exp_avg"]
        got_gate = carried[f"blocks.{i}.ffn.w_gate.weight"]["exp_avg"]
        got_down = carried[f"blocks.{i}.ffn.w_down.weight"]["exp_avg"]
        for j in range(96):                # unit j copies the source unit with its gate row
            src = int(((w_small - w_big[j]).abs().sum(1)).argmin())
            assert torch.equal(got_gate[j], gate[src])
            assert torch.equal(got_down[:, j], down[:, src])     # readers: copied, not split
    # width_mode="zero": the new channels' state is zero, the old channels' as it was
    big_zero = grown_optimizer_state(optim, small, d_model=40, width_mode="zero")
    emb = big_zero["embed.weight"]["exp_avg"]
    assert torch.equal(emb[:, :32], optim["embed.weight"]["exp_avg"])
    assert float(emb[:, 32:].abs().max()) == 0.0
    # stack: each new block has its source block's state
    stacked = grown_optimizer_state(optim, small, n_layers=4, depth_mode="stack")
    for name in ("attn.wq.weight", "ffn.w_up.weight"):
        for p, (src, _) in enumerate(block_plan(2, 4, "stack")):
            assert torch.equal(stacked[f"blocks.{p}.{name}"]["exp_avg_sq"],
                               optim[f"blocks.{src}.{name}"]["exp_avg_sq"])


def test_optimizer_state_of_another_model_is_one_line():
    small, optim = trained(dense_model())
    other = dense_model(tie_embeddings=False)
    bad = {**optim, "lm_head.weight": optim["embed.weight"], "nope.weight": optim["embed.weight"]}
    with pytest.raises(ValueError, match="'nope.weight' is not a parameter of the model"):
        upcycled_optimizer_state(bad, other, 4, 2)
    wrong = {"embed.weight": {**optim["embed.weight"], "exp_avg": torch.zeros(3)}}
    with pytest.raises(ValueError, match=r"'embed.weight' exp_avg has shape \(3,\)"):
        grown_optimizer_state(wrong, small, n_layers=3)
