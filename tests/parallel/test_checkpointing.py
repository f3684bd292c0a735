"""Checkpoints reshard between layouts. A single-process run's state (trained AdamW, so the
moments are not zeros) is saved as a consolidated file and loaded into every parallel layout
(DDP + EP, FSDP2, FSDP2 + EP, 2 x 2); each rank's pieces must be the right slices. Each layout
then saves a sharded torch.distributed.checkpoint, which one process loads back: equal to
the original, tensor for tensor."""

import os

import pytest
import torch
from torch.distributed.tensor import DTensor

from moekit.config import ModelConfig, MoEConfig, ParallelConfig
from moekit.model.transformer import MoETransformer
from moekit.parallel.checkpointing import expert_parallel_names, training_state
from moekit.parallel.parallelize import build_mesh, parallelize
from moekit.store.checkpoint import Checkpoint, save_checkpoint, save_sharded_checkpoint

from ..conftest import run_ranks

V, S = 61, 8


def _model() -> MoETransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=S,
                      moe=MoEConfig(d_model=32, d_ff=32, num_experts=4, top_k=2))
    return MoETransformer(cfg)


def test_expert_parallel_names_are_the_sharded_layers_expert_weights():
    model = _model()
    assert expert_parallel_names(model) == {}               # one process: nothing is sharded
    layer = model.moe_layers()[1]
    layer.keep_experts(2, 4, layer.dispatcher)
    assert expert_parallel_names(model) == {f"blocks.1.ffn.experts.{n}": 4
                                            for n in ("w_gate_EDF", "w_up_EDF", "w_down_EFD")}
    with pytest.raises(ValueError, match="pass the"):
        training_state(model, torch.optim.AdamW(model.parameters()))


def _flat(state: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _trained_reference():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        tokens = torch.randint(0, V, (4, S + 1), generator=g)
        out = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
        (loss + 0.01 * out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _worker(rank, world, dp, ep, sharding, full_dir, sharded_dir, load_from=None, rng_ranks=1) -> list:
    """Load the checkpoint in full_dir (or load_from) into this layout; each rank compares every
    tensor with the reference, then save a sharded checkpoint (unless loading one). Returns
    this rank's problems."""
    problems = []
    cfg = ParallelConfig(dp=dp, ep=ep, sharding=sharding)
    mesh = build_mesh(cfg)
    model = parallelize(_model(), mesh, cfg).module
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    view = training_state(model, opt, mesh)
    had_rng = Checkpoint(load_from or full_dir).load_into(view, rank)
    if had_rng != (rank < rng_ranks):          # the saving ranks' RNG states only
        problems.append(f"rank {rank}: load_into returned {had_rng}")
    ref = torch.load(os.path.join(full_dir, "checkpoint.pt"), weights_only=False)
    ref_flat = _flat({"model": ref["model"], "optim": ref["optim"]})
    for key, t in _flat(view).items():
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if not torch.equal(full, ref_flat[key]):
            problems.append(f"rank {rank}: {key} differs after loading")
    if load_from is None:
        save_sharded_checkpoint(sharded_dir, view, {"step": 2, "config": {}})
    return problems


def _spawn(dp, ep, sharding, *args):
    problems = [p for rank in run_ranks(_worker, dp * ep, dp, ep, sharding, *args) for p in rank]
    assert not problems, problems


@pytest.mark.parametrize("dp, ep, sharding", [(1, 2, "none"), (2, 1, "fsdp"), (1, 2, "fsdp"), (2, 2, "fsdp"),
                                               (2, 2, "none")])
def test_checkpoints_reshard_between_layouts(tmp_path, dp, ep, sharding):
    model, opt = _trained_reference()
    full_dir, sharded_dir = tmp_path / "full", tmp_path / "sharded"
    full_dir.mkdir()
    sharded_dir.mkdir()
    save_checkpoint(full_dir, training_state(model, opt), {"step": 2, "config": {}})
    # an earlier checkpoint, and the leftover of a crash while deleting the one before it
    (sharded_dir / "checkpoint").mkdir()
    (sharded_dir / "checkpoint.old").mkdir()
    (sharded_dir / "checkpoint.old" / "__0_0.distcp").write_bytes(b"stale")
    _spawn(dp, ep, sharding, str(full_dir), sharded_dir)
    assert sorted(p.name for p in sharded_dir.iterdir()) == ["checkpoint"]
    # one process loads the sharded checkpoint: the reference again, exactly
    assert (sharded_dir / "checkpoint").is_dir() and not (sharded_dir / "checkpoint.pt").exists()
    fresh = _model()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh_view = training_state(fresh, fresh_opt)
    assert Checkpoint(sharded_dir).load_into(fresh_view, 0)
    expected = _flat(training_state(model, opt))
    for key, t in _flat(fresh_view).items():
        assert torch.equal(t, expected[key]), key
    # and the loaded model and optimizer continue as the reference does
    tokens = torch.randint(0, V, (4, S + 1), generator=torch.Generator().manual_seed(9))
    for m, o in ((model, opt), (fresh, fresh_opt)):
        logits = m(tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        o.step()
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_a_two_rank_sharded_checkpoint_loads_on_four_ranks(tmp_path):
    """More ranks than saved it: ranks 2 and 3 have no saved RNG state, and the collective
    loads must still match on every rank (an early return on those ranks deadlocked)."""
    model, opt = _trained_reference()
    full_dir, sharded_dir = tmp_path / "full", tmp_path / "sharded"
    full_dir.mkdir()
    sharded_dir.mkdir()
    save_checkpoint(full_dir, training_state(model, opt), {"step": 2, "config": {}})
    _spawn(1, 2, "none", str(full_dir), sharded_dir)              # saved by 2 ranks (ep=2)
    _spawn(2, 2, "fsdp", str(full_dir), sharded_dir, str(sharded_dir), 2)   # loaded by 4

