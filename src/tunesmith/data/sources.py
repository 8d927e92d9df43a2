"""Reading raw records from data sources, streaming. Every problem is reported with its place.

A source is one file (.jsonl, .json, .csv, .tsv, .parquet; the text kinds also gzip-compressed
as .jsonl.gz ...), a glob of such files (data/*.jsonl.gz), or a directory written by the
`datasets` library's save_to_disk.

`iter_records` never raises for a bad row: it yields a RawRecord whose `error` says what is
wrong, so the caller can stop with that message or quarantine the row (--skip-invalid).
Whole-file problems (missing, empty, unsupported, corrupt) raise DataError naming the file and
the fix. JSONL, CSV, TSV and Parquet are read incrementally, so memory does not grow with the
file; a JSON document is parsed whole; a datasets directory is memory-mapped by `datasets`.
"""
from __future__ import annotations

import csv
import glob
import gzip
import json
import re
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from tunesmith.errors import DataError

BATCH_ROWS = 1024  # rows per Arrow batch: bounds memory for Parquet and datasets directories
GZIP_MAGIC = b"\x1f\x8b"
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
SUPPORTED = (".jsonl, .json, .csv, .tsv (each optionally .gz), .parquet, "
             "or a `datasets` save_to_disk directory")


@dataclass
class RawRecord:
    where: str                 # "file:line" (or "file:record N" for formats without lines)
    record: dict | None        # None when the row is invalid
    error: str | None = None   # why the row is invalid
    raw: str | None = None     # the row's raw text, for the quarantine file


Reader = Callable[[Path], Iterator[RawRecord]]


# --- opening files: the one place that touches gzip and decodes bytes -------------------------

def _is_gzip(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


@contextmanager
def _open_bytes(path: Path) -> Iterator[BinaryIO]:
    """The file's (decompressed) bytes. Corrupt or truncated gzip data surfaces as EOFError,
    zlib.error or OSError from deep inside the read loop; the user needs the file named instead."""
    try:
        with open(path, "rb") as raw:
            if not _is_gzip(path):
                if raw.peek(2)[:2] == GZIP_MAGIC:
                    raise DataError(f"{path}: the file is gzip-compressed but its name does not end in .gz; "
                                    f"rename it to {path.name}.gz")
                yield raw
                return
            # The gzip reader gets our file object (not a path) so all reading goes through one `open`.
            with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
                yield unzipped
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: corrupt or truncated gzip data ({exc}); re-create or re-download the file, "
                        "or drop the .gz suffix if it is not compressed") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from None


def _not_utf8(exc: UnicodeDecodeError, line_offset: str = "") -> str:
    return f"not UTF-8 text ({exc.reason} at byte {exc.start}{line_offset}); re-encode the file as UTF-8"


def _lines(f: BinaryIO) -> Iterator[tuple[str, str | None]]:
    """(text, error) per line. Undecodable bytes are replaced and reported for that line only, so
    one bad row does not cost the rest of the file."""
    for lineno, raw in enumerate(f, 1):
        error = None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            text, error = raw.decode("utf-8", "replace"), _not_utf8(exc, " of the line")
        yield (text.removeprefix("\ufeff") if lineno == 1 else text), error  # BOM from Windows editors


# --- JSON Lines and JSON ---------------------------------------------------------------------

def _record_problem(record, text: str) -> str | None:
    if not isinstance(record, dict):
        return f"a record must be a JSON object, got {type(record).__name__}"
    # JSON can escape half of a UTF-16 pair ("\ud800"); no UTF-8 file or tokenizer accepts the
    # result. The regex keeps the full check off lines without such escapes.
    if SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return "holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff); fix the text"
    return None


def _json_row(where: str, text: str) -> RawRecord:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return RawRecord(where, None, f"malformed JSON: {exc.msg} at column {exc.colno}; fix or remove the line", text)
    except RecursionError:
        return RawRecord(where, None, "JSON nested too deeply to read", text)
    problem = _record_problem(record, text)
    return RawRecord(where, None, problem, text) if problem else RawRecord(where, record)


def _iter_jsonl(path: Path) -> Iterator[RawRecord]:
    with _open_bytes(path) as f:
        for lineno, (text, error) in enumerate(_lines(f), 1):
            where = f"{path}:{lineno}"
            if error:
                yield RawRecord(where, None, error, text)
            elif text.strip():
                yield _json_row(where, text)


def _json_document(path: Path) -> tuple[str, object]:
    with _open_bytes(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: {_not_utf8(exc, ' of the file')}") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty; put a JSON array of records in it or leave it out")
    try:
        return text, json.loads(text)
    except json.JSONDecodeError as exc:
        hint = ("; it looks like one JSON value per line: name the file .jsonl" if exc.msg == "Extra data"
                else "; fix the file (a JSON file is parsed whole, so it cannot be read past this point)")
        raise DataError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg} at column {exc.colno}{hint}") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read") from None


def _records_list(doc, path: Path) -> list:
    if isinstance(doc, dict):
        lists = [k for k, v in doc.items() if isinstance(v, list)]
        if len(lists) != 1:
            found = f"it holds lists under {lists}" if lists else f"it has keys {sorted(doc)[:10]} and no list"
            raise DataError(f"{path}: a JSON object must hold exactly one list of records ({found}); "
                            "write a JSON array of records, or one record per line as .jsonl")
        return doc[lists[0]]
    if not isinstance(doc, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(doc).__name__}")
    return doc


def _iter_json(path: Path) -> Iterator[RawRecord]:
    text, doc = _json_document(path)
    for i, record in enumerate(_records_list(doc, path), 1):
        where = f"{path}:record {i}"
        problem = _record_problem(record, text)
        if problem:
            yield RawRecord(where, None, problem, json.dumps(record))  # ASCII escapes survive any content
        else:
            yield RawRecord(where, record)


# --- CSV and TSV -----------------------------------------------------------------------------

class _LineFeed:
    """Feeds decoded lines to csv.reader, keeping those of the record being read, so a bad record
    is reported with its raw text and any undecodable line in it. csv.reader pulls exactly the
    lines of one record per row, never ahead."""

    def __init__(self, f: BinaryIO):
        self.lines, self.current, self.error = _lines(f), [], None

    def __iter__(self):
        return self

    def __next__(self) -> str:
        text, error = next(self.lines)
        self.current.append(text)
        self.error = self.error or error
        return text

    def take(self) -> tuple[str, str | None]:
        raw, error = "".join(self.current), self.error
        self.current, self.error = [], None
        return raw, error


def _header(reader, feed: _LineFeed, path: Path, kind: str) -> list[str]:
    for row in reader:
        _, error = feed.take()
        if error:
            raise DataError(f"{path}:{reader.line_num}: header row is {error}")
        if row:
            duplicated = sorted({c for c in row if row.count(c) > 1})
            if duplicated:
                raise DataError(f"{path}:{reader.line_num}: column(s) {duplicated} appear twice in the header; "
                                "rename them so each column has one name")
            return row
    raise DataError(f"{path}: the file is empty; a {kind} file needs a header row naming its columns")


def _iter_delimited(path: Path, dialect: str, kind: str) -> Iterator[RawRecord]:
    # strict: a stray quote is an error to report, not text silently glued to the next field.
    # QUOTE_MINIMAL (the default) also reads TSV written by pandas, which quotes tabs and newlines.
    with _open_bytes(path) as f:
        feed = _LineFeed(f)
        reader = csv.reader(feed, dialect, strict=True)
        try:
            header = _header(reader, feed, path, kind)
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: malformed {kind} header ({exc})") from None
        while True:
            where = f"{path}:{reader.line_num + 1}"  # the line the record starts on
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raw, _ = feed.take()
                yield RawRecord(where, None, f"malformed {kind} ({exc}); check quotes in this row", raw)
                continue
            raw, error = feed.take()
            if error:
                yield RawRecord(where, None, error, raw)
            elif not row:  # a blank line
                continue
            elif len(row) != len(header):
                yield RawRecord(where, None, f"has {len(row)} fields but the header names {len(header)} "
                                             f"({', '.join(header)}); quote values that contain the delimiter", raw)
            else:
                yield RawRecord(where, dict(zip(header, row)))


# --- Arrow: Parquet files and `datasets` directories -----------------------------------------

def _arrow_rows(path: Path, batches: Iterator) -> Iterator[RawRecord]:
    n = 0
    for batch in batches:
        for record in batch.to_pylist():
            n += 1
            yield RawRecord(f"{path}:record {n}", record)


def _iter_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as pf:
            yield from _arrow_rows(path, pf.iter_batches(batch_size=BATCH_ROWS))
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:  # damaged string pages fail as they decode
        raise DataError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc}); "
                        "re-write or re-download it") from None


def _dataset_splits(path: Path) -> list[str] | None:
    """The splits of a saved DatasetDict, or None when `path` is not one."""
    index = path / "dataset_dict.json"
    if not index.is_file():
        return None
    try:
        splits = json.loads(index.read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{index}: unreadable DatasetDict index ({exc}); re-save it with save_to_disk") from None
    return [str(s) for s in splits] if isinstance(splits, list) else []


def _iter_datasets_dir(path: Path) -> Iterator[RawRecord]:
    import datasets
    import pyarrow as pa

    try:
        ds = datasets.load_from_disk(str(path))
        if not isinstance(ds, datasets.Dataset):
            raise DataError(f"{path}: holds a {type(ds).__name__}, not one Dataset; name one of its splits")
        # Arrow format skips per-row Python formatting; rows are read batch by batch from the mmap.
        yield from _arrow_rows(path, ds.with_format("arrow").iter(batch_size=BATCH_ROWS))
    except (pa.ArrowException, OSError, ValueError, LookupError, TypeError, AttributeError) as exc:
        # Damaged metadata or Arrow files fail deep inside `datasets` in many ways; all mean "re-save".
        raise DataError(f"{path}: cannot read this `datasets` directory ({type(exc).__name__}: {exc}); "
                        "re-save it with Dataset.save_to_disk") from None


# --- resolving a source spec -----------------------------------------------------------------

TEXT_READERS: dict[str, Reader] = {
    ".jsonl": _iter_jsonl, ".json": _iter_json,
    ".csv": partial(_iter_delimited, dialect="excel", kind="CSV"),
    ".tsv": partial(_iter_delimited, dialect="excel-tab", kind="TSV"),
}
BINARY_READERS: dict[str, Reader] = {".parquet": _iter_parquet}


def _file_reader(path: Path) -> Reader:
    name = path.name.lower()
    if _is_gzip(path):
        inner = Path(name[:-3]).suffix  # data.jsonl.gz -> .jsonl
        if inner in TEXT_READERS:
            return TEXT_READERS[inner]
        why = "Parquet compresses itself; drop the .gz" if inner == ".parquet" else f"unknown inner type '{inner}'"
        raise DataError(f"{path}: unsupported compressed file ({why}); use {SUPPORTED}")
    reader = {**TEXT_READERS, **BINARY_READERS}.get(Path(name).suffix)
    if reader is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use {SUPPORTED}")
    return reader


def _dir_reader(path: Path) -> Reader:
    splits = _dataset_splits(path)
    if splits is not None:
        named = " or ".join(str(path / s) for s in splits)
        raise DataError(f"{path}: a `datasets` DatasetDict with splits {', '.join(splits)}; name one split "
                        f"as the path: {named}")
    if not (path / "state.json").is_file():
        raise DataError(f"{path}: a directory, but not one saved by `datasets` save_to_disk (no state.json); "
                        f"name its files or a glob such as {path / '*.jsonl'}")
    return _iter_datasets_dir


def _reader(path: Path) -> Reader:
    if path.is_dir():
        return _dir_reader(path)
    reader = _file_reader(path)
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes); add records or leave it out of the data source")
    return reader


def resolve_source(spec: str | Path) -> list[Path]:
    """The readable units a source names: one file or `datasets` directory, or a glob's sorted
    matching files. Checks each is a supported kind before anything is read."""
    text = str(spec)
    if any(c in text for c in "*?["):
        # A quarantine file written next to the data must not be read back as data on the next run.
        paths = [Path(p) for p in sorted(glob.glob(text, recursive=True))
                 if Path(p).is_file() and not p.endswith(".quarantine.jsonl")]
        if not paths:
            raise DataError(f"no files match {text} (relative to {Path.cwd()}); check the pattern")
    else:
        paths = [Path(text)]
        if not paths[0].exists():
            raise DataError(f"data file not found: {text} (relative to {Path.cwd()}); check data paths in the config")
    for p in paths:
        _reader(p)
    return paths


def expand_source(spec: str | Path) -> list[Path]:
    """The files holding a source's data (for hashes): a `datasets` directory stands for its
    Arrow files."""
    files = []
    for p in resolve_source(spec):
        files += sorted(p.glob("*.arrow")) if p.is_dir() else [p]
    return files


def iter_records(spec: str | Path) -> Iterator[RawRecord]:
    """Raw records of a data source, streamed file by file."""
    for path in resolve_source(spec):
        n = 0
        for row in _reader(path)(path):
            n += 1
            yield row
        if n == 0:
            raise DataError(f"{path}: the file holds no records; add some or leave it out of the data source")
