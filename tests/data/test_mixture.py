"""data.mixture: sources with weights and tags; weighted, resumable sampling; per-source
validation losses."""

import json
from collections import Counter

import pytest

from moekit.cli.main import main as cli
from moekit.config import RunConfig
from moekit.data.catalog import load_documents
from moekit.data.mixture import MixtureSplit, WeightedSampler, check_mixture, source_documents

from ..train.test_faults import one_line_error


def mixture(path):
    return [{"source": f"{path}:de", "weight": 3.0, "tag": "de"}, {"source": f"{path}:en", "tag": "en"},
            {"source": f"{path}:es", "weight": 0.5}]


@pytest.mark.parametrize("bad, match", [
    ([{"source": "news-en"}], "at least 2 sources"),
    ([{"source": "a"}, {"weight": 1}], r"mixture\[1\].*needs a source"),
    ([{"source": "a"}, {"source": "b", "weight": 0}], r"mixture\[1\].weight=0"),
    ([{"source": "a"}, {"source": "b", "weight": True}], "weight=True"),
    ([{"source": "a", "tag": "x"}, {"source": "b", "tag": "x"}], "tag 'x' is given twice"),
    ([{"source": "a"}, {"source": "b", "share": 2}], "unknown key 'share'"),
    ([{"source": "a", "weight": float("inf")}, {"source": "b"}], "finite"),
    ([{"source": "a", "weight": 1e308}, {"source": "b", "weight": 1e308}], "finite"),
    ([{"source": "a", "tag": ""}, {"source": "b"}], "non-empty name"),
    ("news-en", "at least 2 sources"),
])
def test_bad_mixtures(bad, match):
    with pytest.raises(ValueError, match=match):
        check_mixture(bad)
    with pytest.raises(ValueError, match=match):
        RunConfig.from_dict({"data": {"mixture": bad}})


def test_defaults_and_one_tag_of_a_corpus(parl_subset):
    entries = check_mixture(mixture(parl_subset))
    assert [e["weight"] for e in entries] == [3.0, 1.0, 0.5]
    assert entries[2]["tag"] == "es"                           # a corpus tag's name
    assert check_mixture([{"source": "a/speeches.jsonl"}, {"source": "task:rotten-tomatoes"}])[0]["tag"] == \
        "speeches"
    docs = source_documents(f"{parl_subset}:de", "german")
    assert len(docs) == 75 and {d.tag for d in docs} == {"german"}
    with pytest.raises(ValueError, match=r"tagged 'fr'; its tags are \['de', 'en', 'es', 'nl'\]"):
        source_documents(f"{parl_subset}:fr", "fr")
    assert len(load_documents(f"{parl_subset}:en")) == 75      # data.corpus takes "corpus:tag" too


class _Part:
    def __init__(self, n):
        self.n, self.seq_len = n, 4

    def __len__(self):
        return self.n


def test_sampler_follows_the_weights_and_resumes_exactly():
    split = MixtureSplit([_Part(50), _Part(30), _Part(20)], ["a", "b", "c"], [3.0, 1.0, 1.0])
    s = WeightedSampler(split, batch_size=40, seed=0)
    picks = [split.locate(i)[0] for _ in range(100) for i in s.next()]
    share = {k: v / len(picks) for k, v in Counter(picks).items()}
    assert share[0] == pytest.approx(0.6, abs=0.02) and share[1] == pytest.approx(0.2, abs=0.02)
    state = s.state_dict()
    ahead = [s.next() for _ in range(5)]
    again = WeightedSampler(split, batch_size=40, seed=0)
    again.load_state_dict(json.loads(json.dumps(state)))
    assert [again.next() for _ in range(5)] == ahead
    # a source's windows come in a permutation: no window twice before all were seen
    t = WeightedSampler(split, batch_size=10, seed=1)
    firsts = [i for _ in range(30) for i in t.next() if split.locate(i)[0] == 2][:20]
    assert sorted(firsts) == list(range(80, 100))


def test_ranks_split_the_global_batch():
    split = MixtureSplit([_Part(50), _Part(30)], ["a", "b"], [1.0, 1.0])
    whole = WeightedSampler(split, batch_size=8, seed=3, rank=0, world=1)
    ranks = [WeightedSampler(split, batch_size=4, seed=3, rank=r, world=2) for r in range(2)]
    for _ in range(3):
        assert whole.next() == ranks[0].next() + ranks[1].next()


def test_a_mixture_run_logs_every_source_and_resumes(parl_subset, tmp_path, capsys):
    sets = {"data.vocab_size": 512, "data.seq_len": 32, "model.d_model": 32, "model.n_layers": 1,
            "model.n_heads": 2, "model.moe.d_ff": 32, "model.moe.num_experts": 4, "train.batch_size": 4,
            "train.max_steps": 6, "train.eval_every": 3, "train.eval_batches": 1, "train.save_every": 3,
            "train.log_every": 3}
    recipe = tmp_path / "mix.toml"
    lines = [f'[[data.mixture]]\nsource = "{e["source"]}"\nweight = {e.get("weight", 1.0)}\n'
             + (f'tag = "{e["tag"]}"\n' if "tag" in e else "") for e in mixture(parl_subset)]
    recipe.write_text("".join(lines))
    argv = ["--config", str(recipe), "--no-progress",
            *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    assert cli(["train", "--out", str(tmp_path / "whole"), *argv]) == 0
    assert cli(["train", "--out", str(tmp_path / "parts"), *argv, "--stop-at", "3"]) == 0
    assert cli(["train", "--resume", str(tmp_path / "parts"), "--no-progress"]) == 0
    rows = {}
    for run in ("whole", "parts"):
        rows[run] = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    strip = [[{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows[run]] for run in rows]
    assert strip[0] == strip[1]                                 # the resumed run logs the same
    val = [r for r in rows["whole"] if "loss/val" in r]
    tags = ["de", "en", "es"]
    for r in val:
        parts = [r[f"loss/val/{t}"] for t in tags]
        assert r["loss/val"] == pytest.approx((3 * parts[0] + parts[1] + 0.5 * parts[2]) / 4.5)
    capsys.readouterr()
    assert cli(["eval", str(tmp_path / "whole")]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(ev) >= {f"val_loss/{t}" for t in tags}
    assert cli(["report", str(tmp_path / "whole")]) == 0
    assert 'id="by-source"' in (tmp_path / "whole" / "report.html").read_text()


def test_mixture_and_task_together_is_one_line(tmp_path, capsys, parl_subset):
    assert cli(["train", "--out", str(tmp_path / "x"), "--set", "data.task=rotten-tomatoes", "--set",
                f'data.mixture=[{{source="{parl_subset}:de"}}, {{source="{parl_subset}:en"}}]']) != 0
    one_line_error(capsys, "data.task")
    assert not (tmp_path / "x").exists()
