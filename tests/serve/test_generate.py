"""Cached generation against its slow twin, batching, sampling cuts, and the CLI."""

from __future__ import annotations

import pytest
import torch

from moekit.model.config import ModelConfig
from moekit.model.transformer import KVCache, MoETransformer
from moekit.moe.config import MoEConfig
from moekit.serve.generate import next_tokens, sample_batch

V = 101


def model_of(moe=None, vocab=V, **kw) -> MoETransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=96, moe=moe,
                      **kw)
    model = MoETransformer.build(cfg).eval()
    with torch.no_grad():                   # sharper logits: greedy choices far from ties
        model.lm_head.weight.mul_(4)
    return model


MODELS = {
    "dense": lambda: model_of(),
    "moe-top2": lambda: model_of(MoEConfig(d_model=64, d_ff=64, num_experts=4, top_k=2)),
    "moe-shared-gqa": lambda: model_of(MoEConfig(d_model=64, d_ff=32, num_experts=8, top_k=2,
                                                 num_shared_experts=1), n_kv_heads=2, qk_norm="head"),
    "moe-sigmoid": lambda: model_of(MoEConfig(d_model=64, d_ff=64, num_experts=4, top_k=1, router="sigmoid",
                                              aux_loss_free=True)),
    # a dynamic number of experts per token: cached decoding routes one token at a time (stats=False)
    "moe-top-p": lambda: model_of(MoEConfig(d_model=64, d_ff=32, num_experts=8, dynamic_k="top_p", top_p=0.6,
                                            max_k=4, target_k=2)),
    "moe-null": lambda: model_of(MoEConfig(d_model=64, d_ff=32, num_experts=8, top_k=3, dynamic_k="null",
                                           num_null_experts=4)),
    "moe-relu": lambda: model_of(MoEConfig(d_model=64, d_ff=32, num_experts=8, dynamic_k="relu", max_k=4)),
}
PROMPTS = [[1, 2, 3, 4, 5], [7], [9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 11, 12, 13]]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cached_greedy_equals_uncached_token_for_token(name):
    model = MODELS[name]()
    cached = sample_batch(model, PROMPTS, 40, temperature=0)
    uncached = sample_batch(model, PROMPTS, 40, temperature=0, use_cache=False)
    assert cached == uncached
    assert [len(c) for c in cached] == [40, 40, 40]
    assert len({tuple(c) for c in cached}) == 3     # the rows did not collapse into one
    m = model.cfg.moe
    if m is not None and m.dynamic:                 # the premise: tokens do get different numbers of experts
        with torch.no_grad():
            hist = model(torch.tensor(PROMPTS[2:])).moe[0].experts_per_token
        assert (hist > 0).sum() >= 2, hist


def test_batched_rows_equal_each_prompt_alone():
    model = MODELS["moe-top2"]()
    batched = sample_batch(model, PROMPTS, 30, temperature=0)
    assert batched == [sample_batch(model, [p], 30, temperature=0)[0] for p in PROMPTS]


def test_left_padded_prefill_gives_each_rows_own_logits():
    model = MODELS["moe-shared-gqa"]()
    short, long_ = torch.tensor([[5, 6, 7]]), torch.tensor([[1, 2, 3, 4, 5, 6]])
    cache = KVCache.empty(model.cfg, 2, 8, pad_B=torch.tensor([3, 0]))
    padded = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long_])
    with torch.no_grad():
        logits = model(padded, cache=cache).logits
        torch.testing.assert_close(logits[0, 3:], model(short).logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[1], model(long_).logits[0], atol=1e-5, rtol=1e-5)
        step = model(torch.tensor([[8], [7]]), cache=cache).logits[:, 0]
        torch.testing.assert_close(step[0], model(torch.tensor([[5, 6, 7, 8]])).logits[0, -1], atol=1e-5,
                                   rtol=1e-5)
    assert torch.isfinite(logits).all() and cache.length == 7


def test_eos_stops_each_row_and_the_cache_drops_it():
    model = MODELS["moe-top2"]()
    free = sample_batch(model, PROMPTS, 20, temperature=0)
    # an end-of-text that one row draws early and another never draws
    eos = next(t for t in free[0][:10] if any(t not in row for row in free))
    stopped = sample_batch(model, PROMPTS, 20, temperature=0, eos=eos)
    assert stopped == sample_batch(model, PROMPTS, 20, temperature=0, eos=eos, use_cache=False)
    assert len(stopped[0]) <= 10 and max(len(r) for r in stopped) == 20
    for row, full in zip(stopped, free):                # each row is its free run cut after eos
        cut = full.index(eos) + 1 if eos in full else len(full)
        assert row == full[:cut]


def test_past_max_seq_len_the_cache_restarts_and_goes_on():
    model = model_of(MoEConfig(d_model=64, d_ff=64, num_experts=4, top_k=2))
    model.cfg.max_seq_len = 16              # rope tables stay longer; the model refuses past 16 anyway
    out = sample_batch(model, [list(range(1, 15))], 30, temperature=0)[0]
    assert len(out) == 30
    # up to the window the two paths agree
    assert out[:2] == sample_batch(model, [list(range(1, 15))], 2, temperature=0, use_cache=False)[0]


def test_sampled_output_is_seeded_and_equal_with_and_without_cache():
    model = MODELS["dense"]()
    runs = [sample_batch(model, PROMPTS, 15, temperature=1.0, top_k=20, top_p=0.9, use_cache=c,
                         generator=torch.Generator().manual_seed(3)) for c in (True, False, True)]
    assert runs[0] == runs[1] == runs[2]
    other = sample_batch(model, PROMPTS, 15, temperature=1.0, generator=torch.Generator().manual_seed(4))
    assert other != runs[0]


def test_top_p_keeps_the_smallest_nucleus_and_renormalises():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([next_tokens(logits, 1.0, 0, 0.7, g) for _ in range(4000)]).flatten()
    counts = torch.bincount(draws, minlength=4).float() / len(draws)
    assert counts[2] == 0 and counts[3] == 0            # 0.5 + 0.3 already reach 0.7
    assert abs(counts[0] - 0.625) < 0.03 and abs(counts[1] - 0.375) < 0.03
    assert next_tokens(logits, 1.0, 0, 0.4, g).item() == 0      # the most likely always stays
    assert (torch.stack([next_tokens(logits, 1.0, 1, 1.0, g) for _ in range(50)]) == 0).all()   # top-k 1
    two = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    assert next_tokens(two, 0.0).tolist() == [1, 0]      # greedy, per row


@pytest.mark.parametrize("kw, needle", [
    ({"top_p": 0.0}, "top_p=0.0"), ({"top_p": 1.01}, "top_p=1.01"), ({"temperature": -1}, "temperature=-1"),
])
def test_bad_sampling_settings_are_one_line(kw, needle):
    with pytest.raises(ValueError, match=needle):
        sample_batch(MODELS["dense"](), PROMPTS, 3, **kw)


def test_a_cache_too_small_is_refused():
    model = MODELS["dense"]()
    cache = KVCache.empty(model.cfg, 1, 4)
    with pytest.raises(ValueError, match="do not fit a cache"):
        model(torch.ones(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="exceeds ModelConfig.max_seq_len"):
        KVCache.empty(model.cfg, 1, 97)


def test_cli_generates_a_batch_of_prompts(tmp_path, capsys):
    from moekit.cli.main import main as cli
    from moekit.config import RunConfig
    from moekit.data.tokenizer import train_tokenizer
    from moekit.store.run_dir import save_export
    texts = ["the cat sat on the mat", "a dog ran in the park", "birds sing in the morning"] * 20
    tok = train_tokenizer(texts, vocab_size=300)
    model = model_of(vocab=tok.get_vocab_size())
    cfg = RunConfig.from_dict({"model": {"vocab_size": tok.get_vocab_size()}})
    save_export(model, tok, cfg, tmp_path / "m")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\n\na dog\n")
    args = ["generate", str(tmp_path / "m"), "--prompt", "birds", "--prompts-file", str(prompts),
            "--max-new-tokens", "6", "--temperature", "0"]
    assert cli(args) == 0
    out = capsys.readouterr()
    assert out.out.count("\n\n") == 2 and out.out.startswith("birds")
    assert "3 prompt(s)" in out.err and "tokens/s" in out.err
    assert cli(args + ["--no-cache"]) == 0
    assert capsys.readouterr().out == out.out           # the slow twin writes the same text


def test_tag_routed_model_generates_each_row_under_its_own_tag():
    model = model_of(MoEConfig(d_model=64, d_ff=64, num_experts=4, top_k=1, router_input="token+tag",
                               route_tags=["de", "en"]))
    tags = ["de", "en", "de"]
    cached = sample_batch(model, PROMPTS, 25, temperature=0, tags=tags)
    assert cached == sample_batch(model, PROMPTS, 25, temperature=0, tags=tags, use_cache=False)
    assert cached[1] == sample_batch(model, [PROMPTS[1]], 25, temperature=0, tags="en")[0]
    with pytest.raises(ValueError, match="2 tags for 3 prompts"):
        sample_batch(model, PROMPTS, 2, tags=["de", "en"])


def test_a_rows_output_does_not_depend_on_a_long_batch_mate():
    model = model_of(MoEConfig(d_model=64, d_ff=64, num_experts=4, top_k=2))
    model.cfg.max_seq_len = 32              # the long row fills the cache and restarts twice
    short, long_ = [3, 4, 5], list(range(1, 31))
    alone = sample_batch(model, [short], 20, temperature=0)[0]      # it ends at 23 < 32 - 32 // 4
    assert alone == sample_batch(model, [short], 20, temperature=0, use_cache=False)[0]
    together = sample_batch(model, [short, long_], 20, temperature=0)
    assert together[0] == alone and len(together[1]) == 20


def test_a_tiny_temperature_is_greedy_not_a_crash():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    assert next_tokens(logits, 1e-45, 50, 0.9).tolist() == [1, 0]


def test_on_step_is_called_once_per_decoding_step():
    steps = []
    out = sample_batch(model_of(), [[1, 2], [3]], 7, temperature=0, on_step=lambda: steps.append(1))
    assert len(steps) == 7 == max(len(o) for o in out)


def test_a_long_generation_shows_progress_on_a_terminal(tmp_path):
    """--max-new-tokens 100000 printed nothing for minutes: on a terminal stderr shows a bar that
    counts the new tokens; the test reads it through a pseudo-terminal, then stops the process."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import subprocess
    import sys
    import termios
    import time
    from pathlib import Path
    export = Path(__file__).parent.parent / "fixtures" / "wave2-dirs" / "export"
    main_fd, sub_fd = pty.openpty()
    fcntl.ioctl(sub_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))   # a terminal's size
    proc = subprocess.Popen([sys.executable, "-m", "moekit", "generate", str(export), "--prompt", "Mr",
                             "--max-new-tokens", "100000", "--temperature", "0"],
                            stdout=subprocess.DEVNULL, stderr=sub_fd, stdin=subprocess.DEVNULL)
    os.close(sub_fd)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and b"/100000" not in seen:
            if not select.select([main_fd], [], [], 1)[0]:
                continue
            try:
                seen += os.read(main_fd, 4096)
            except OSError:          # the terminal closed: the process ended
                break
        assert b"generating" in seen and b"/100000" in seen, seen[-400:]
    finally:
        proc.kill()
        proc.wait()
        os.close(main_fd)
