"""A dynamic number of experts per token in the run report: the routing breakdown counts exactly
the experts the routers chose (never the "no expert" id E of an unused slot), and the HTML report
shows the experts per token of a dynamic run (and not of a fixed top-k one)."""

import html
import re

import numpy as np
import pytest
import torch

from moekit.cli.main import main as cli
from moekit.config import MoEConfig, RunConfig
from moekit.data.stream import PackedSplit
from moekit.model import ModelConfig, MoETransformer
from moekit.model.routing import FREQ_CLASSES, routing_breakdown, token_tags
from moekit.report.experts_per_token import experts_per_token_section
from moekit.train.trainer import train

E, V, S = 4, 50, 8
DYNAMIC = {"top_p": {"dynamic_k": "top_p", "top_p": 0.5},
           "null": {"dynamic_k": "null", "top_k": 2, "num_null_experts": 4},
           "relu": {"dynamic_k": "relu"}}


class PaddedSplit(PackedSplit):
    """A split whose last two positions of every window are padding (tag -1), as a task's."""

    def token_tags(self, indices):
        tags = token_tags(PackedSplit(self.tokens, self.doc_starts, self.doc_tags, self.tags, self.seq_len),
                          indices).reshape(len(indices), -1)
        tags[:, -2:] = -1
        return tags.reshape(-1)


def tiny(moe: dict, seed: int = 0) -> MoETransformer:
    torch.manual_seed(seed)
    cfg = MoEConfig(d_model=32, d_ff=32, num_experts=E, **{"top_k": 2, **moe})
    return MoETransformer(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, d_ff=64, moe=cfg))


def windows(split_cls=PackedSplit) -> tuple[PackedSplit, np.ndarray]:
    """11 windows of S tokens over three documents of two tags, and a frequency class per id."""
    rng = np.random.default_rng(0)
    split = split_cls(rng.integers(0, V, 11 * S + 1), np.array([0, 30, 61]), np.array([0, 1, 0]),
                      ["de", "en"], S)
    return split, rng.integers(0, len(FREQ_CLASSES), V)


def direct(model, split, freq_V):
    """Each MoE layer's experts_TK for every window (one forward of them all): the routers' own
    choices, with the tag and frequency class of every token."""
    out = {}
    hooks = [b.ffn.router.register_forward_hook(lambda m, i, o, j=j: out.__setitem__(j, o.experts_TK))
             for j, b in enumerate(model.blocks)]
    idx = list(range(len(split)))
    x_BS = split.batch(idx)[0]
    model.eval()
    with torch.no_grad():
        model(x_BS)
    for h in hooks:
        h.remove()
    return {j: e.numpy() for j, e in out.items()}, token_tags(split, idx), freq_V[x_BS.reshape(-1).numpy()]


@pytest.mark.parametrize("mode", sorted(DYNAMIC))
def test_breakdown_counts_exactly_what_dynamic_routers_chose(mode):
    model = tiny(DYNAMIC[mode])
    split, freq_V = windows(PaddedSplit)
    by_tag, by_freq = routing_breakdown(model, split, freq_V, batch_size=3)   # batches of 3, 3, 3, 2
    experts, tag_T, cls_T = direct(model, split, freq_V)
    real = split.token_tags(list(range(len(split)))) >= 0
    assert sorted(by_tag.counts) == sorted(by_tag.tokens) == [0, 1]
    for i, e_TK in experts.items():
        e_TK, tag, cls = e_TK[real], tag_T[real], cls_T[real]
        used_TK = e_TK < E
        k_T = used_TK.sum(1)
        assert (~used_TK).any() and len(set(k_T.tolist())) > 1   # unused slots (id E); k varies
        for b, c_T in ((by_tag, tag), (by_freq, cls)):
            want = np.zeros((len(b.labels), E), dtype=np.int64)
            for t, j in zip(*np.nonzero(used_TK)):
                want[c_T[t], e_TK[t, j]] += 1
            assert np.array_equal(b.counts[i], want)              # no sentinel column, none counted
            assert b.counts[i].sum() == used_TK.sum() < e_TK.size
            assert b.tokens[i].tolist() == np.bincount(c_T, minlength=len(b.labels)).tolist()
            assert b.tokens[i].sum() == real.sum() == len(split) * (S - 2)   # padding is no token
            ept = b.experts_per_token()[i]
            assert set(ept) == {b.labels[c] for c in set(c_T.tolist())}
            for c, label in enumerate(b.labels):
                if label in ept:
                    assert ept[label] == pytest.approx(k_T[c_T == c].mean(), abs=1e-12)
        lo, hi = model.blocks[i].ffn.cfg.k_range
        assert all(lo <= v <= hi for v in by_freq.experts_per_token()[i].values())
    assert by_freq.mutual_information(0) >= 0.0 and by_tag.class_entropy(0) > 0.0


@pytest.mark.parametrize("k", [1, 3])
def test_fixed_top_k_gives_exactly_k_experts_per_token_in_every_class(k):
    model = tiny({"top_k": k})
    split, freq_V = windows()
    by_tag, by_freq = routing_breakdown(model, split, freq_V, batch_size=4)
    for b in (by_tag, by_freq):
        ept = b.experts_per_token()
        assert sorted(ept) == [0, 1]
        assert all(v == k for layer in ept.values() for v in layer.values())
        assert all(b.tokens[i].sum() == len(split) * S for i in ept)
        assert all(b.counts[i].sum() == k * len(split) * S for i in ept)


def test_section_needs_a_varying_number_of_experts():
    def rows(hists, control=False):
        return [{"step": s, "moe/layer0/experts_per_token": sum(j * h for j, h in enumerate(hist)),
                 "moe/layer0/k_hist": hist, **({"moe/layer0/k_control": 0.5} if control else {})}
                for s, hist in zip((2, 4), hists)]
    fixed = [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]
    assert experts_per_token_section(rows(fixed), None, None) is None            # top-2: always 2
    assert experts_per_token_section([{"step": 2, "loss/lm": 1.0}], None, None) is None
    varying = experts_per_token_section(rows([[0.0, 0.0, 1.0], [0.25, 0.25, 0.5]]), None, None)
    assert varying.count("data:image/png") == 2      # expert choice: no controller, no breakdown
    controlled = experts_per_token_section(rows(fixed, control=True), None, None)
    assert controlled.count("data:image/png") == 3   # a controller logged its knob


def dynamic_run(root, corpus, moe: dict):
    run = root / "run"
    cfg = RunConfig.from_dict({
        "data": {"corpus": str(corpus), "vocab_size": 512, "seq_len": 32},
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128,
                  "moe": {"d_ff": 64, "num_experts": 4, "top_k": 2, **moe}},
        "train": {"batch_size": 8, "max_steps": 6, "eval_every": 3, "eval_batches": 2, "log_every": 2}})
    train(cfg, run, progress=False)
    return run


@pytest.mark.parametrize("moe", [{"dynamic_k": "top_p", "top_p": 0.5, "target_k": 2},
                                 {"dynamic_k": "relu", "target_k": 2}], ids=["top_p", "relu"])
def test_report_of_a_dynamic_run_shows_experts_per_token(tmp_path, parl_subset, moe, capsys):
    run = dynamic_run(tmp_path, parl_subset, moe)
    assert cli(["report", str(run)]) == 0
    assert "experts per token" in capsys.readouterr().out
    page = (run / "report.html").read_text()
    assert f"Experts per token (dynamic_k={moe['dynamic_k']})" in page
    assert f"dynamic_k={moe['dynamic_k']} (" in page and "target 2" in page     # the summary
    section = page.split('id="experts-per-token"')[1].split("</section>")[0]
    assert section.count("data:image/png") == 3      # curves, last histograms, controller (+ L1)
    assert "by token-frequency class" in section and "by language (tag)" in section
    heads = re.sub("<br>.*?</th>", "</th>", html.unescape(section))
    for label in (*FREQ_CLASSES, "all tokens"):
        assert heads.count(f"<th>{label}</th>") == (1 if label in FREQ_CLASSES else 2), label
    lo, hi = (1, 4) if moe["dynamic_k"] == "top_p" else (0, 4)
    rows = re.findall(r"<tr><td>\d+</td>(.*?)</tr>", section)
    assert [r.count("<td>") for r in rows] == [3 + 1] * 2 + [4 + 1] * 2   # 2 layers, 4 languages
    means = [float(v) for v in re.findall(r"<td>(\d+\.\d\d)</td>", section)]
    assert len(means) >= 2 * 3 and all(lo <= v <= hi for v in means)   # "-": a class with no tokens
