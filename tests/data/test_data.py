import json

import numpy as np
import pytest

from moekit.data.catalog import Document, load_documents
from moekit.data.stream import BatchSampler, PackedSplit, build_token_cache
from moekit.data.tokenizer import eos_id, train_tokenizer


def test_parlspeech_from_the_registry_is_real_multilingual_text(parl_docs):
    tags = {d.tag for d in parl_docs}
    assert tags == {"de", "en", "es", "nl"}
    assert any("Präsident" in d.text for d in parl_docs if d.tag == "de")


def test_user_data_text_dir_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.md").write_text("markdown text")
    (tmp_path / "d" / "empty.txt").write_text("   ")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "hola", "lang": "es"}) + "\n\n"
                                      + json.dumps({"text": "hallo", "tag": "de"}) + "\n")
    assert load_documents(tmp_path / "a.txt") == [Document("first document", "a")]
    assert load_documents(tmp_path / "d") == [Document("markdown text", "x")]
    assert [d.tag for d in load_documents(tmp_path / "c.jsonl")] == ["es", "de"]
    (tmp_path / "n.jsonl").write_text('{"text": null}\n{"text": "kept"}\n')      # null: skipped as blank
    assert load_documents(tmp_path / "n.jsonl") == [Document("kept", "n")]
    for bad in ('["a", "b"]', "12345", '{"x": 1}', "true"):
        (tmp_path / "b.jsonl").write_text(f'{{"text": "fine"}}\n{{"text": {bad}}}\n')
        with pytest.raises(ValueError, match=r"b.jsonl:2: 'text' is .*, not a string"):
            load_documents(tmp_path / "b.jsonl")


def test_one_long_text_file_becomes_documents_at_paragraph_breaks(tmp_path):
    paras = [f"Paragraph {i}: " + "word " * 100 for i in range(40)]     # about 510 characters each
    (tmp_path / "book.txt").write_text("\n\n".join(paras) + "\n \n")
    docs = load_documents(tmp_path / "book.txt")
    assert len(docs) == 10 and {d.tag for d in docs} == {"book"}
    assert all(len(d.text) >= 2000 for d in docs)
    assert "\n\n".join(d.text for d in docs) == "\n\n".join(paras)   # nothing lost, in order


def test_text_file_without_blank_lines_is_cut_at_line_breaks(tmp_path):
    lines = [f"Sentence {i} says something about the weather today." for i in range(400)]  # ~52 chars
    text = "\n".join(lines) + "\n"
    (tmp_path / "lines.txt").write_text(text)
    docs = load_documents(tmp_path / "lines.txt")
    assert len(docs) > 5 and {d.tag for d in docs} == {"lines"}
    assert all(len(d.text) >= 2000 for d in docs[:-1])
    assert "\n".join(d.text for d in docs) == text                      # nothing lost, in order
    tok = train_tokenizer(lines, vocab_size=300)
    meta = build_token_cache(docs, tok, tmp_path / "cache")
    assert meta["train_docs"] > 0 and meta["train_tokens"] > 0


def test_bad_user_data_is_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_documents(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no text"):
        load_documents(tmp_path / "empty")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_documents(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="not in the catalog"):
        load_documents("wikipedia")


def test_tokenizer_roundtrips_any_text():
    tok = train_tokenizer(["Meine Damen und Herren", "Señorías", "Dames en heren"] * 20, vocab_size=300)
    for text in ["Meine Damen", "ñandú 🦙", "tab\tand\nnewline"]:
        assert tok.decode(tok.encode(text).ids) == text
    assert eos_id(tok) == 0


def test_token_cache_split_windows_and_tags(tmp_path, parl_docs):
    docs = parl_docs[:120]
    tok = train_tokenizer((d.text for d in docs), vocab_size=400)
    meta = build_token_cache(docs, tok, tmp_path, val_fraction=0.1)
    assert meta["train_docs"] + meta["val_docs"] == 120 and 0 < meta["val_docs"] < 30
    again = build_token_cache(docs, tok, tmp_path, val_fraction=0.1)
    assert again == meta
    train = PackedSplit.open(tmp_path, "train", seq_len=32)
    assert len(train) == (meta["train_tokens"] - 1) // 32
    x, y, tags = train.batch([0, 5])
    assert x.shape == y.shape == (2, 32)
    assert np.array_equal(x[0, 1:].numpy(), y[0, :-1].numpy())          # next-token targets
    assert tags[0] == meta["tags"].index(docs[0].tag)


def test_batch_sampler_resumes_its_position():
    a = BatchSampler(100, 8, seed=3)
    first = [a.next() for _ in range(20)]   # crosses an epoch boundary (12 batches per epoch)
    b = BatchSampler(100, 8, seed=3)
    for _ in range(7):
        b.next()
    c = BatchSampler(100, 8, seed=3)
    c.load_state_dict(b.state_dict())
    assert [c.next() for _ in range(13)] == first[7:]
    assert sorted(sum(first[:12], [])) == sorted(set(sum(first[:12], [])))   # no repeats in an epoch
    with pytest.raises(ValueError, match="batch_size"):
        BatchSampler(5, 8, seed=0)


def test_batch_sampler_resumes_on_another_world_size_without_repeats():
    two = [BatchSampler(100, 5, seed=1, rank=r, world_size=2) for r in range(2)]
    seen = [w for _ in range(4) for s in two for w in s.next()]          # 4 global batches of 10
    one = BatchSampler(100, 5, seed=1)
    one.load_state_dict(two[0].state_dict())
    seen += [w for _ in range(12) for w in one.next()]                    # the rest of the epoch
    assert len(seen) == 100 and len(set(seen)) == 100                     # every window exactly once
    back = [BatchSampler(100, 5, seed=1, rank=r, world_size=2) for r in range(2)]
    for s in back:
        s.load_state_dict(one.state_dict())
    assert all(s.epoch == 1 or s.step_in_epoch == 10 for s in back)
    assert back[0].next() != [] and back[1].next() != []


def _binary_bytes() -> bytes:
    """A real executable (ELF/Mach-O: NUL bytes near the start)."""
    import shutil
    import sys
    from pathlib import Path
    exe = Path(shutil.which("ls") or sys.executable).resolve()
    return exe.read_bytes()[:65536]


def test_binary_user_data_is_refused_naming_the_file(tmp_path):
    (tmp_path / "ls").write_bytes(_binary_bytes())
    with pytest.raises(ValueError, match=r"'.*/ls' looks binary \(NUL bytes in the first 8 KiB\)") as err:
        load_documents(tmp_path / "ls")
    assert "\n" not in str(err.value)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "good.md").write_text("some text")
    (tmp_path / "d" / "ls.txt").write_bytes(_binary_bytes())
    with pytest.raises(ValueError, match=r"ls\.txt' looks binary"):
        load_documents(tmp_path / "d")
    (tmp_path / "ctl.txt").write_bytes(bytes(range(1, 32)) * 10)     # control bytes, no NUL
    with pytest.raises(ValueError, match="control characters"):
        load_documents(tmp_path / "ctl.txt")
    (tmp_path / "u16.txt").write_bytes("Präsident".encode("utf-16"))
    with pytest.raises(ValueError, match="UTF-16"):
        load_documents(tmp_path / "u16.txt")
    (tmp_path / "nul.jsonl").write_bytes(b'{"text": "a\x00b"}\n')
    with pytest.raises(ValueError, match="nul.jsonl' looks binary"):
        load_documents(tmp_path / "nul.jsonl")


def _moekit_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "moekit" and r.levelname == "WARNING"]


def test_latin1_text_is_decoded_as_cp1252_with_one_warning(tmp_path, caplog):
    text = "Der Präsident grüßt die Abgeordneten. Ein Euro: €.\n"
    raw = text.encode("cp1252")                                            # ä ü ß €: 4 non-UTF-8 bytes
    (tmp_path / "de.txt").write_bytes(raw)
    with caplog.at_level("WARNING", logger="moekit"):
        docs = load_documents(tmp_path / "de.txt")
    assert docs == [Document(text, "de")]
    assert "Präsident" in docs[0].text and "\ufffd" not in docs[0].text
    [msg] = _moekit_warnings(caplog)
    assert "de.txt" in msg and f"4 bytes of {len(raw)} were not UTF-8; decoded the file as cp1252" in msg
    caplog.clear()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_bytes("Präsident \x81".encode("latin-1"))   # 0x81: not cp1252
    with caplog.at_level("WARNING", logger="moekit"):
        assert load_documents(tmp_path / "d")[0].text == "Präsident \x81"
    [msg] = _moekit_warnings(caplog)
    assert "x.txt" in msg and "2 bytes of 11 were" in msg and "latin-1" in msg


def test_utf8_with_a_few_broken_bytes_keeps_utf8_and_marks_them(tmp_path, caplog):
    (tmp_path / "m.txt").write_bytes("Präsident Señorías ".encode() + b"\xff")
    with caplog.at_level("WARNING", logger="moekit"):
        [doc] = load_documents(tmp_path / "m.txt")
    assert doc.text == "Präsident Señorías \ufffd"
    [msg] = _moekit_warnings(caplog)
    assert "1 byte of 23 were not UTF-8; replaced them with U+FFFD" in msg


def test_jsonl_with_invalid_utf8_follows_the_same_rule(tmp_path, caplog):
    (tmp_path / "c.jsonl").write_bytes('{"text": "Señorías", "lang": "es"}\r\n'.encode("latin-1"))
    with caplog.at_level("WARNING", logger="moekit"):
        assert load_documents(tmp_path / "c.jsonl") == [Document("Señorías", "es")]
    [msg] = _moekit_warnings(caplog)
    assert "c.jsonl" in msg and "2 bytes of" in msg


def test_utf8_bom_and_crlf_read_like_plain_utf8(tmp_path, caplog):
    paras = [f"Párrafo {i}: " + "palabra " * 100 for i in range(10)]
    (tmp_path / "lf.txt").write_text("\n\n".join(paras), encoding="utf-8")
    (tmp_path / "crlf.txt").write_bytes(b"\xef\xbb\xbf" + "\r\n\r\n".join(paras).encode())
    with caplog.at_level("WARNING", logger="moekit"):
        crlf = load_documents(tmp_path / "crlf.txt")
    assert [d.text for d in crlf] == [d.text for d in load_documents(tmp_path / "lf.txt")]
    assert len(crlf) > 1 and not _moekit_warnings(caplog)


def test_empty_corpus_name_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("not meant as training data")
    monkeypatch.chdir(tmp_path)
    for blank in ("", "  "):
        with pytest.raises(ValueError, match="data.corpus=.* is empty"):
            load_documents(blank)


def test_processes_fetching_one_corpus_at_once_all_get_it(tmp_path, parl_docs):
    """Two runs (or two test workers) reading a catalog corpus for the first time at once: each
    writes the cached JSONL under a name of its own, so none finds another's temporary file
    gone (the fixed name parlspeech.tmp made one of two concurrent `moekit train`s fail)."""
    import os
    import shutil
    import subprocess
    import sys

    from moekit.data.catalog import cache_dir
    cache = tmp_path / "cache"
    shutil.copytree(cache_dir() / "packages", cache / "packages")     # no download: the race is the write
    code = ("from moekit.data.catalog import load_documents; import sys; "
            "sys.stdout.write(str(len(load_documents('parlspeech'))))")
    env = {**os.environ, "MOEKIT_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-300:] for _, err in results]
    assert {out for out, _ in results} == {str(len(parl_docs))}
    assert sorted(os.listdir(cache / "corpora")) == ["parlspeech.jsonl"]          # no temporary left
