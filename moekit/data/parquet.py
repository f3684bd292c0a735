"""Parquet corpora: the text column of a ``.parquet`` file or of a directory of shards, read with
pyarrow one record batch at a time.

FineWeb, Dolma and most Hugging Face datasets ship as Parquet shards (``datasets``'
``Dataset.to_parquet`` writes one). Each row is a document, tagged with the file's stem (or the
directory's name). Rows whose text is null, empty or only whitespace are skipped, as the other
formats skip blank documents: a null is a row without text, not an error.

Only the named column is read, ``BATCH_ROWS`` rows at a time, so no table of a whole shard is ever
built; :class:`ParquetDocuments` is a sequence that reads the shards again on every pass (the
tokenizer's training, the token cache's key, the tokenization) instead of a list holding the
corpus's text. A directory's shards are its ``*.parquet`` files at any depth, in sorted path
order; its other files (a dataset card's README.md) are not read.

Opening checks every shard and counts its documents (one pass over the column in Arrow, no
Python strings). Each problem is one ValueError line naming the shard: not Parquet or corrupt,
no such column (naming the columns there are), a column that is not text, no text at all.
"""

from __future__ import annotations

import bisect
import copy
import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

from moekit.data.document import Document

BATCH_ROWS = 1024      # rows per record batch: the most text held at once is one batch's


def parquet_shards(path: Path) -> list[Path]:
    """The Parquet files ``path`` names: itself (a ``.parquet`` file), or a directory's
    ``*.parquet`` files at any depth in sorted order; [] when it names none."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*.parquet") if p.is_file())
    return [path] if path.suffix == ".parquet" else []


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("reading a Parquet corpus needs pyarrow, which is not installed here; "
                         "pip install pyarrow") from None
    return pa, pc, pq


def _is_text(pa, t) -> bool:
    """A string column, or a dictionary-encoded one (pandas' ``category``)."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _columns(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class ParquetDocuments(Sequence):
    """The documents of a Parquet corpus (``path``: a file or a directory of shards), column
    ``column``, read again from the shards on every iteration; ``docs[:n]`` is the first n of
    them, still unread.

    Example:
        >>> import tempfile, pyarrow as pa, pyarrow.parquet as pq
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = Path(tmp) / "web.parquet"
        ...     pq.write_table(pa.table({"text": ["one page", None, " ", "another"]}), path)
        ...     docs = ParquetDocuments(path)
        ...     print(len(docs), [d.text for d in docs], docs[1].tag)
        2 ['one page', 'another'] web
    """

    def __init__(self, path: str | Path, column: str = "text"):
        self.path, self.column = Path(path), column
        self.tag = self.path.stem if self.path.is_file() else self.path.resolve().name
        self.shards = parquet_shards(self.path)
        if not self.shards:
            raise ValueError(f"data {str(self.path)!r} holds no .parquet files; give a Parquet file or a "
                             "directory of .parquet shards")
        # (shard, row group, documents in it), and the running total of documents at each one's end
        self._groups: list[tuple[int, int, int]] = []
        rows = 0
        for s in range(len(self.shards)):
            pf = self._open(s)
            rows += pf.metadata.num_rows
            for g in range(pf.metadata.num_row_groups):
                self._groups.append((s, g, sum(len(t) for t in self._texts(pf, s, [g], strings=False))))
        self._ends = list(itertools.accumulate(n for _, _, n in self._groups))
        total = self._limit = self._ends[-1] if self._ends else 0
        if total == 0:
            what = f"its {rows:,} rows of column {column!r} are null or blank" if rows else "it has no rows"
            raise ValueError(f"data {str(self.path)!r} holds no text: {what}; point at a corpus with text "
                             "in it")

    def _open(self, s: int):
        """Shard ``s`` as a ``pyarrow.parquet.ParquetFile``, its ``column`` checked."""
        pa, _, pq = _pyarrow()
        shard = self.shards[s]
        try:
            pf = pq.ParquetFile(shard)
            schema = pf.schema_arrow
        except (pa.ArrowException, OSError) as err:
            raise self._unreadable(shard, err) from None
        if self.column not in schema.names:
            raise ValueError(f"data {str(shard)!r} has no column {self.column!r}; its columns are "
                             f"{_columns(schema.names)}: set data.text_column to the one holding the text")
        kind = schema.field(self.column).type
        if not _is_text(pa, kind):
            texts = [f.name for f in schema if _is_text(pa, f.type)]
            which = f"its string columns: {_columns(texts)}" if texts else "it has none: cast one to string"
            raise ValueError(f"data {str(shard)!r}: column {self.column!r} holds {kind}, not text; set "
                             f"data.text_column to a string column ({which})")
        return pf

    @staticmethod
    def _unreadable(shard: Path, err: Exception) -> ValueError:
        why = " ".join(str(err).split())[:160]
        return ValueError(f"data {str(shard)!r} is not a readable Parquet file (pyarrow: {why}); give a "
                          "Parquet file or a directory of .parquet shards, or write the file again")

    def _texts(self, pf, s: int, groups: list[int] | None = None, strings: bool = True) -> Iterator:
        """The kept (non-null, non-blank) texts of shard ``s`` (open as ``pf``; its row ``groups``,
        else all), a batch at a time: lists of str, or Arrow arrays when not ``strings``."""
        pa, pc, _ = _pyarrow()
        batches = pf.iter_batches(batch_size=BATCH_ROWS, row_groups=groups, columns=[self.column])
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as err:      # a corrupt page shows only when read
                raise self._unreadable(self.shards[s], err) from None
            if batch is None:
                return
            col = batch.column(0)
            if pa.types.is_dictionary(col.type):            # pandas' category: decoded to its strings
                col = col.dictionary_decode()
            if pa.types.is_string_view(col.type):           # the compute kernels take string, not views
                col = col.cast(pa.large_string())
            kept = col.filter(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0))   # nulls drop
            yield kept.to_pylist() if strings else kept

    def __len__(self) -> int:
        return self._limit

    def __iter__(self) -> Iterator[Document]:
        left = self._limit
        for s in range(len(self.shards)):
            for texts in self._texts(self._open(s), s):
                for text in texts[:left]:
                    yield Document(text, self.tag)
                left -= min(left, len(texts))
                if left == 0:
                    return

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if start == 0 and step == 1:             # docs[:n] (data.max_docs): the first n, unread
                first = copy.copy(self)
                first._limit = stop
                return first
            return [self[j] for j in range(start, stop, step)]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} of {n}")
        i %= n
        g = bisect.bisect_right(self._ends, i)      # the row group holding document i
        s, group, _ = self._groups[g]
        skip = i - (self._ends[g - 1] if g else 0)
        for texts in self._texts(self._open(s), s, [group]):
            if skip < len(texts):
                return Document(texts[skip], self.tag)
            skip -= len(texts)
        raise ValueError(f"data {str(self.shards[s])!r} changed while it was read; read it again")

    def __repr__(self) -> str:
        return (f"ParquetDocuments({str(self.path)!r}, column={self.column!r}: {len(self)} documents in "
                f"{len(self.shards)} shard{'s' * (len(self.shards) != 1)})")
