"""The run report: routing breakdowns, the HTML page, and how a real browser renders it."""

import re
import shutil
import subprocess

import numpy as np
import pytest

from moekit.cli.main import main as cli
from moekit.config import MoEConfig, RunConfig
from moekit.data.stream import PackedSplit
from moekit.model import ModelConfig, MoETransformer
from moekit.model.routing import RoutingBreakdown, routing_breakdown, token_tags
from moekit.train.trainer import train


def test_mutual_information_bounds():
    one_to_one = RoutingBreakdown(["a", "b"], {0: np.array([[10, 0], [0, 30]])})
    assert one_to_one.mutual_information(0) == pytest.approx(one_to_one.class_entropy(0))
    independent = RoutingBreakdown(["a", "b"], {0: np.array([[10, 30], [5, 15]])})
    assert independent.mutual_information(0) == pytest.approx(0.0, abs=1e-12)


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory, parl_subset):
    run = tmp_path_factory.mktemp("report") / "run"
    cfg = RunConfig.from_dict({
        "data": {"corpus": str(parl_subset), "vocab_size": 512, "seq_len": 32},
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128,
                  "moe": {"d_ff": 64, "num_experts": 4, "top_k": 2}},
        "train": {"batch_size": 8, "max_steps": 12, "eval_every": 4, "eval_batches": 2, "log_every": 2}})
    train(cfg, run, progress=False)
    assert cli(["report", str(run), "--windows", "64"]) == 0
    return run


def test_report_has_every_section_and_embedded_plots(reported_run, capsys):
    page = (reported_run / "report.html").read_text()
    for section in ("summary", "losses", "load-over-time", "final-load", "by-language",
                    "by-frequency", "throughput"):
        assert f'id="{section}"' in page, section
    assert 'id="drops"' not in page                       # dropless: nothing can be dropped
    assert 'id="experts-per-token"' not in page           # top-2: every token gets 2 experts
    assert len(re.findall(r'src="data:image/png;base64,', page)) >= 6
    assert "http" not in page.split("<body>")[1]          # self-contained: nothing to fetch
    mi = [float(v) for v in re.findall(r"<tr><td>\d+</td><td>([0-9.]+)</td>", page)]
    assert len(mi) == 2 and all(0 <= v <= 2 for v in mi)  # 4 languages: at most 2 bits


def test_report_in_a_real_browser(reported_run, tmp_path):
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no Chromium on this machine (apt install chromium)")
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2400",
                    f"--screenshot={shot}", (reported_run / "report.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    import matplotlib.pyplot as plt
    pixels = plt.imread(shot)
    assert pixels.shape[0] == 2400 and pixels.shape[1] == 1200
    dark = (pixels[..., :3].mean(-1) < 0.5).mean()
    assert 0.005 < dark < 0.5        # text and plots drawn, not a blank or black page


def test_routing_by_tag_gives_every_token_its_own_documents_tag():
    # 3 windows of S=4 over 2 documents: tag 0 at tokens [0, 6), tag 1 at [6, 13)
    split = PackedSplit(np.arange(13), np.array([0, 6]), np.array([0, 1]), ["de", "en"], 4)
    assert len(split) == 3
    assert token_tags(split, [1, 2]).tolist() == [0, 0, 1, 1, 1, 1, 1, 1]   # window 1 spans both
    moe = MoEConfig(d_model=32, d_ff=32, num_experts=4, top_k=2)
    model = MoETransformer(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, d_ff=64, moe=moe))
    by_tag, _ = routing_breakdown(model, split, np.zeros(50, dtype=np.int64), batch_size=2)
    assert by_tag.counts[0].sum(1).tolist() == [6 * 2, 6 * 2]   # tokens per tag x top_k (not 8 and 4)


def test_one_tag_corpus_has_no_language_section_and_capacity_shows_drops(tmp_path, parl_docs):
    """A corpus with one tag gets no one-row 'by language' heatmap; a run with a capacity keeps
    the dropped-fraction panel; the load panels share one colour scale."""
    text = tmp_path / "speeches.txt"
    one = [d.text for d in parl_docs[:120] if d.tag == parl_docs[0].tag]
    text.write_text("\n\n".join(one), encoding="utf-8")
    run = tmp_path / "run"
    cfg = RunConfig.from_dict({
        "data": {"corpus": str(text), "vocab_size": 512, "seq_len": 32},
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128,
                  "moe": {"d_ff": 64, "num_experts": 4, "top_k": 2, "capacity_factor": 1.0}},
        "train": {"batch_size": 8, "max_steps": 6, "eval_every": 3, "eval_batches": 2, "log_every": 2}})
    train(cfg, run, progress=False)
    assert cli(["report", str(run), "--windows", "32"]) == 0
    page = (run / "report.html").read_text()
    assert 'id="by-language"' not in page and "I(expert; language)" not in page
    assert 'id="drops"' in page and 'id="by-frequency"' in page
    assert page.count("colour scale") == 1
