"""Parquet corpora (moekit.data.parquet): a file or a directory of shards gives the documents its
text column holds, read a batch at a time, into the same token cache as the other formats; each
problem is one line naming the file."""

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import moekit.data.parquet as parquet
import moekit.data.stream as stream
from moekit.cli.main import main as cli
from moekit.config import RunConfig
from moekit.data.catalog import load_documents
from moekit.data.parquet import ParquetDocuments
from moekit.data.stream import build_token_cache
from moekit.data.tokenizer import train_tokenizer

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "wave2-dirs" / "corpus.txt"
CACHE_FILES = ["meta.json", "train.bin", "val.bin", "train_docs.npy", "val_docs.npy"]


@pytest.fixture(scope="module")
def txt_docs():
    """The fixture text as the .txt reader cuts it: 22 documents of >= 2,000 characters."""
    return load_documents(FIXTURE)


@pytest.fixture(scope="module")
def tok(txt_docs):
    return train_tokenizer((d.text for d in txt_docs), vocab_size=400)


def write(path: Path, columns: dict, row_group_size: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def with_gaps(texts: list[str]) -> list:
    """``texts`` with a null, an empty and a whitespace row after every third: rows without text."""
    out = []
    for i, t in enumerate(texts):
        out += [t] + ([None, "", " \n\t"] if i % 3 == 2 else [])
    return out


def cache_bytes(docs, tok, out: Path) -> dict:
    build_token_cache(docs, tok, out, val_fraction=0.2)
    return {name: (out / name).read_bytes() for name in CACHE_FILES}


def test_rows_are_the_documents_and_give_the_tokens_of_the_same_text_file(tmp_path, txt_docs, tok,
                                                                          monkeypatch):
    """A .txt corpus is cut into documents at blank lines; a Parquet row is one document as it
    stands. So a file whose rows are the .txt's documents (with rows without text between
    them, skipped) holds the same documents and gives the same token cache, byte for byte."""
    monkeypatch.setattr(parquet, "BATCH_ROWS", 5)           # batches cross the row groups of 4
    path = write(tmp_path / "corpus.parquet", {"text": with_gaps([d.text for d in txt_docs])})
    docs = load_documents(path)
    assert isinstance(docs, ParquetDocuments) and len(docs) == len(txt_docs) == 22
    assert list(docs) == list(txt_docs)                     # text and tag ("corpus", the file's stem)
    assert cache_bytes(docs, tok, tmp_path / "pq") == cache_bytes(txt_docs, tok, tmp_path / "txt")


def test_a_directory_of_shards_equals_the_single_file(tmp_path, txt_docs, tok):
    texts = [d.text for d in txt_docs]
    single = write(tmp_path / "one" / "corpus.parquet", {"text": texts})
    shards = tmp_path / "two" / "corpus"
    # written last, read first: shards go in sorted path order, at any depth; the card is not read
    write(shards / "train-00001-of-00002.parquet", {"text": texts[9:]}, row_group_size=5)
    write(shards / "data" / "train-00000-of-00002.parquet", {"text": with_gaps(texts[:9])})
    (shards / "README.md").write_text("# A dataset card, not training text\n")
    docs = load_documents(shards)
    assert [p.name for p in docs.shards] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert list(docs) == list(load_documents(single)) == list(txt_docs)
    assert cache_bytes(docs, tok, tmp_path / "dir") == cache_bytes(load_documents(single), tok,
                                                                   tmp_path / "file")


def test_a_named_column_is_read_and_the_sequence_is_sliced_without_reading(tmp_path, txt_docs):
    texts = [d.text for d in txt_docs]
    path = write(tmp_path / "web.parquet", {"id": list(range(len(texts))), "body": texts,
                                           "text": ["not this one"] * len(texts)})
    docs = load_documents(path, text_column="body")
    assert [d.text for d in docs] == texts and {d.tag for d in docs} == {"web"}
    first = docs[:5]                                          # data.max_docs: still a ParquetDocuments
    assert isinstance(first, ParquetDocuments) and len(first) == 5
    assert [d.text for d in first] == texts[:5]
    assert docs[9].text == texts[9] and docs[-1].text == texts[-1]      # a row group read on demand
    assert [d.text for d in docs[2:12:3]] == texts[2:12:3]
    with pytest.raises(IndexError):
        docs[len(texts)]
    meta = build_token_cache(first, train_tokenizer(texts[:5], 300), tmp_path / "c")
    assert meta["train_docs"] + meta["val_docs"] == 5


def test_jsonl_takes_the_same_text_column(tmp_path):
    path = tmp_path / "pages.jsonl"
    path.write_text(json.dumps({"body": "one page", "text": 3}) + "\n" + json.dumps({"body": "two"}) + "\n")
    assert [d.text for d in load_documents(path, text_column="body")] == ["one page", "two"]
    with pytest.raises(ValueError, match=r"pages.jsonl:1: not a JSON object with a 'content' field"):
        load_documents(path, text_column="content")


def test_the_token_cache_is_the_same_whatever_the_encoding_batch(tmp_path, txt_docs, tok, monkeypatch):
    """The cache is tokenized and written ENCODE_CHARS characters at a time; the cuts do not show."""
    whole = cache_bytes(txt_docs, tok, tmp_path / "whole")                 # 49,776 characters: one batch
    monkeypatch.setattr(stream, "ENCODE_CHARS", 5000)                       # about 3 documents a batch
    assert cache_bytes(txt_docs, tok, tmp_path / "cut") == whole


def test_a_full_disk_while_writing_the_token_cache_leaves_no_partial_file(tmp_path, txt_docs, tok):
    (tmp_path / "train.bin.tmp").symlink_to("/dev/full")
    with pytest.raises(OSError, match="No space left on device"):
        build_token_cache(txt_docs, tok, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def one_line(call) -> str:
    with pytest.raises(ValueError) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_each_problem_is_one_line_naming_the_file_and_the_fix(tmp_path):
    table = {"id": [1, 2, 3], "body": ["a page", "another", "a third"], "score": [0.5, 0.1, 0.9]}
    path = write(tmp_path / "web.parquet", table)
    assert re.search(r"'.*/web.parquet' has no column 'text'; its columns are id, body, score: set "
                     r"data.text_column to the one holding the text$", one_line(lambda: load_documents(path)))
    assert re.search(r"'.*/web.parquet': column 'id' holds int64, not text; set data.text_column to a string "
                     r"column \(its string columns: body\)$", one_line(lambda: load_documents(path, "id")))
    numbers = write(tmp_path / "numbers.parquet", {"id": [1, 2], "score": [0.5, 0.1]})
    assert "(it has none: cast one to string)" in one_line(lambda: load_documents(numbers, "id"))

    fake = tmp_path / "fake.parquet"
    fake.write_text("id,text\n1,a csv file named .parquet\n")
    assert re.search(r"'.*/fake.parquet' is not a readable Parquet file \(pyarrow: Parquet magic bytes not "
                     r"found", one_line(lambda: load_documents(fake)))
    raw = bytearray(path.read_bytes())
    at = pq.ParquetFile(path).metadata.row_group(0).column(1).data_page_offset
    raw[at:at + 16] = b"\xff" * 16                          # the header of column body's first page
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "corrupt.parquet").write_bytes(bytes(raw))
    assert "corrupt.parquet' is not a readable Parquet file (pyarrow: " in one_line(
        lambda: load_documents(tmp_path / "bad", "body"))

    blank = write(tmp_path / "blank.parquet", {"text": pa.array([None, "", "  \n", None], pa.string())})
    assert re.search(r"'.*/blank.parquet' holds no text: its 4 rows of column 'text' are null or blank; ",
                     one_line(lambda: load_documents(blank)))
    empty = write(tmp_path / "empty.parquet", {"text": pa.array([], pa.string())})
    assert "holds no text: it has no rows;" in one_line(lambda: load_documents(empty))

    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "rows.csv").write_text("text\nnot read\n")
    assert "holds no text (empty files, or no .txt, .md or .parquet files in the directory)" in one_line(
        lambda: load_documents(tmp_path / "nothing"))

    shards = tmp_path / "shards"                            # one shard without the column: that one is named
    write(shards / "a.parquet", {"text": ["fine"]})
    write(shards / "b.parquet", {"body": ["no text column"]})
    assert re.search(r"'.*/shards/b.parquet' has no column 'text'; its columns are body:",
                     one_line(lambda: load_documents(shards)))


def test_text_column_is_checked_where_it_is_defined():
    assert RunConfig.from_dict({"data": {"text_column": "body"}}).data.text_column == "body"
    for value in ("", "  ", 3):
        with pytest.raises(ValueError, match=rf"data.text_column={value!r}: must name a column"):
            RunConfig.from_dict({"data": {"text_column": value}})


TINY = ["data.vocab_size=300", "data.seq_len=32", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
        "model.d_ff=64", "model.moe.d_ff=32", "model.moe.num_experts=4", "train.batch_size=4",
        "train.eval_batches=1", "train.max_steps=2", "train.warmup_steps=1", "train.eval_every=2"]


def shard_dir(root: Path, column: str = "text") -> Path:
    """The fixture's 88 paragraphs as two shards of column ``column``."""
    paras = [p for p in re.split(r"\n[ \t]*\n", FIXTURE.read_text()) if p.strip()]
    write(root / "part-0.parquet", {"id": list(range(44)), column: paras[:44]}, row_group_size=16)
    write(root / "part-1.parquet", {"id": list(range(44, 88)), column: paras[44:]}, row_group_size=16)
    return root


def train(run: Path, corpus: Path, *sets: str) -> int:
    return cli(["train", "--out", str(run), "--no-progress", "--set", f'data.corpus="{corpus}"',
                *[a for s in (*TINY, *sets) for a in ("--set", s)]])


def test_moekit_train_runs_on_a_directory_of_parquet_shards(tmp_path):
    run = tmp_path / "run"
    assert train(run, shard_dir(tmp_path / "shards")) == 0
    meta = json.loads((run / "data" / "meta.json").read_text())
    assert meta["tags"] == ["shards"] and meta["train_docs"] + meta["val_docs"] == 88
    assert (run / "summary.json").exists()


def test_moekit_train_refuses_a_missing_column_in_one_line(tmp_path, capsys):
    assert train(tmp_path / "run", shard_dir(tmp_path / "shards", column="body")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert re.search(r"^moekit train: error: data '.*/part-0.parquet' has no column 'text'; its columns are "
                     r"id, body: set data.text_column", err)


def test_moekit_train_reads_the_column_data_text_column_names(tmp_path):
    run = tmp_path / "run"
    assert train(run, shard_dir(tmp_path / "shards", column="body"), "data.text_column=body") == 0
    assert json.loads((run / "data" / "meta.json").read_text())["train_docs"] > 0


def test_a_dictionary_encoded_column_reads_as_its_strings(tmp_path, txt_docs):
    """pandas writes a ``category`` column dictionary-encoded: it was refused as "not text"."""
    texts = [d.text for d in txt_docs][:6] * 2
    path = tmp_path / "cat.parquet"
    pq.write_table(pa.table({"text": pa.array(texts).dictionary_encode()}), path)
    assert pa.types.is_dictionary(pq.ParquetFile(path).schema_arrow.field("text").type)
    assert [d.text for d in load_documents(path)] == texts


def test_a_mixture_source_reads_data_text_column(tmp_path, txt_docs):
    from moekit.data.mixture import source_documents
    texts = [d.text for d in txt_docs][:5]
    path = write(tmp_path / "my corpus.parquet", {"body": texts})
    assert [d.text for d in source_documents(str(path), "web", "body")] == texts
    with pytest.raises(ValueError, match="has no column 'text'"):
        source_documents(str(path), "web")
