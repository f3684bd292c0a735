"""Fine-tuning tasks: the catalog task, user JSONL, the fixed split, completion-only targets and
accuracy from the label tokens' likelihood."""

import json

import numpy as np
import pytest
import torch

from moekit.data.task_split import IGNORE, TaskSplit, accuracy, build_task_cache
from moekit.data.tasks import Example, Task, load_task, split_of
from moekit.data.tokenizer import eos_id, train_tokenizer
from moekit.model.config import ModelConfig
from moekit.model.transformer import MoETransformer
from moekit.moe.config import MoEConfig


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _labelled(n=60):
    label = ["bad", "good", "good"]
    return [{"text": f"item {i} is {label[i % 3]} " * (1 + i % 4), "label": label[i % 3]} for i in range(n)]


def test_rotten_tomatoes_drops_plots_and_splits_by_movie():
    task = load_task("rotten-tomatoes")
    n = {s: len(v) for s, v in task.splits.items()}
    assert sum(n.values()) == 7403 + 5405                     # the 1,097 plot rows are gone
    assert 0.75 < n["train"] / sum(n.values()) < 0.85 and n["val"] > 900 and n["test"] > 900
    labels = [e.label for v in task.splits.values() for e in v]
    assert labels.count(1) == 7403 and labels.count(0) == 5405
    assert task.labels == [" negative", " positive"]
    ex = task.splits["train"][0]
    assert ex.prompt.startswith("Review: ") and ex.prompt.endswith("\nSentiment:")
    assert ex.completion == task.labels[ex.label]
    assert load_task("rotten-tomatoes").splits["test"] == task.splits["test"]      # fixed


def test_jsonl_classification_and_fixed_split(tmp_path):
    rows = _labelled()
    task = load_task(str(_write(tmp_path / "t.jsonl", rows)))
    assert task.labels == [" bad", " good"]
    every = [e for v in task.splits.values() for e in v]
    assert len(every) == len(rows) and all(e.completion == task.labels[e.label] for e in every)
    shuffled = load_task(str(_write(tmp_path / "u.jsonl", rows[::-1])))   # the split follows the content
    assert sorted(e.prompt for e in shuffled.splits["test"]) == sorted(e.prompt for e in task.splits["test"])
    assert split_of("x") == split_of("x")


def test_jsonl_prompt_completion(tmp_path):
    rows = [{"prompt": f"Q{i}:", "completion": f" A{i}"} for i in range(40)]
    task = load_task(str(_write(tmp_path / "pc.jsonl", rows)))
    assert task.labels is None
    assert all(e.label is None for v in task.splits.values() for e in v)


@pytest.mark.parametrize("rows, match", [
    ([{"question": "a", "answer": "b"}], "neither schema"),
    ([{"prompt": "a", "completion": "  "}], "completion is empty"),
    ([{"prompt": "a", "completion": "b"}, {"text": "a", "label": "x"}], "mixes"),
    (["not json"], "not JSON"),
    (["[1, 2]"], "not a JSON object"),
    ([{"text": "", "label": "x"}], "empty text or label"),
    # a value of another JSON type is not turned into the string "None", "True" or "['x']"
    ([{"text": "a", "label": None}], r"bad.jsonl:1: \"label\" is null; give the label as a string"),
    ([{"text": "a", "label": True}], r"bad.jsonl:1: \"label\" is true"),
    ([{"text": "a", "label": 0.5}], r"bad.jsonl:1: \"label\" is 0.5"),
    ([{"text": "a", "label": "pos"}, {"text": "b", "label": 3}],
     r"bad.jsonl:2: label 3 is an integer while line 1's \('pos'\) is a string"),
    ([{"text": ["a"], "label": "pos"}], r"bad.jsonl:1: \"text\" is \[\"a\"\], not a string"),
    ([{"prompt": "a", "completion": None}], r"bad.jsonl:1: \"completion\" is null, not a string"),
    ([{"prompt": "a", "completion": "b", "label": "x"}], r"bad.jsonl:1: has fields of both schemas"),
    ([{"prompt": ["x"], "completion": "b"}], r"bad.jsonl:1: \"prompt\" is \[\"x\"\], not a string"),
])
def test_bad_task_files(tmp_path, rows, match):
    with pytest.raises(ValueError, match=match):
        load_task(str(_write(tmp_path / "bad.jsonl", rows)))


def test_labels_are_names_and_task_labels_need_labels(tmp_path):
    rows = [{"text": f"t{i}", "label": ["1", " 1", "2"][i % 3]} for i in range(40)]
    task = load_task(str(_write(tmp_path / "n.jsonl", rows)))
    assert task.labels == [" 1", " 2"]                          # "1" and " 1" are one label
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(40)]
    assert load_task(str(_write(tmp_path / "i.jsonl", rows))).labels == [" 0", " 1"]   # class ids
    pc = _write(tmp_path / "pc.jsonl", [{"prompt": f"q{i}", "completion": " a"} for i in range(20)])
    with pytest.raises(ValueError, match="prompt/completion file"):
        load_task(str(pc), ["a", "b"])
    with pytest.raises(ValueError, match="has its own labels"):
        load_task("rotten-tomatoes", ["a", "b"])


def test_label_not_in_given_set(tmp_path):
    path = _write(tmp_path / "t.jsonl", _labelled())
    with pytest.raises(ValueError, match=r"t.jsonl:1: label 'bad' is not in data.task_labels"):
        load_task(str(path), ["good", "neutral"])
    assert load_task(str(path), ["bad", "good", "neutral"]).labels == [" bad", " good", " neutral"]


def test_missing_task():
    with pytest.raises(FileNotFoundError, match="not a catalog task"):
        load_task("no-such-task.jsonl")


@pytest.fixture
def split(tmp_path):
    task = load_task(str(_write(tmp_path / "t.jsonl", _labelled(80))))
    tok = train_tokenizer([e.prompt + e.completion for e in task.splits["train"]], vocab_size=300)
    build_task_cache(task, tok, tmp_path / "data")
    return TaskSplit.open(tmp_path / "data", "train", 12), task, tok


def test_targets_only_on_completion_and_eos(split):
    data, task, tok = split
    idx = list(range(6))
    x, y, tags = data.batch(idx)
    eos = eos_id(tok)
    for b, i in enumerate(idx):
        ex = task.splits["train"][i]
        completion = tok.encode(ex.completion).ids + [eos]
        got = [int(t) for t in y[b] if t != IGNORE]
        assert got == completion                    # the loss sees the completion and EOS, nothing else
        assert tags[b] == ex.label
    assert (y == IGNORE).any() and x.shape == y.shape


def test_long_prompt_cut_from_the_left(split):
    data, task, tok = split
    lengths = np.diff(data.starts)
    i = int(np.argmax(lengths))
    assert lengths[i] > data.seq_len + 1            # the fixture has an example longer than seq_len
    ids, p = data.example(i)
    assert len(ids) == data.seq_len + 1
    assert list(ids[p:]) == list(data.tokens[data.starts[i] + data.prompt_lens[i]:data.starts[i + 1]])


def test_token_tags_mark_padding(split):
    data, _, _ = split
    x, _, _ = data.batch([0, 1, 2])
    tags = data.token_tags([0, 1, 2]).reshape(x.shape)
    for b in range(3):
        n = len(data.example(b)[0]) - 1
        assert (tags[b, :n] >= 0).all() and (tags[b, n:] == -1).all()


def test_accuracy_equals_one_by_one_scoring(split):
    data, task, tok = split
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layers=2, n_heads=2, d_ff=64,
                      moe=MoEConfig(d_model=32, d_ff=32, num_experts=4))
    model = MoETransformer(cfg).eval().requires_grad_(False)
    n = 20
    right = 0
    for i in range(n):                              # unbatched, unpadded: the plain definition
        prompt = list(data.tokens[data.starts[i]:data.starts[i] + data.prompt_lens[i]])
        scores = []
        for label in data.label_ids:        # the model reads at most seq_len tokens: prompt + label[:-1]
            seq = (prompt + label)[-(data.seq_len + 1):]
            logp = torch.log_softmax(model(torch.tensor([seq[:-1]])).logits[0].float(), -1)
            scores.append(sum(float(logp[len(seq) - len(label) - 1 + k, t]) for k, t in enumerate(label))
                          / len(label))
        right += int(np.argmax(scores) == data.labels[i])
    assert accuracy(model, data, "cpu", batch_size=7, max_examples=n) == right / n


def test_task_needs_every_split(tmp_path):
    task = Task("tiny", {"train": [Example("a", " b")], "val": [], "test": [Example("c", " d")]}, None)
    tok = train_tokenizer(["a b c d"] * 5, vocab_size=260)
    with pytest.raises(ValueError, match="no val examples"):
        build_task_cache(task, tok, tmp_path / "data")
