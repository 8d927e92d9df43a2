"""Random and corrupted records and bytes through every loader: `load_examples` returns a
LoadResult or raises a DataError that names the file, never any other exception."""
from __future__ import annotations

import csv
import gzip
import io
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tunesmith.data.dataset import LoadResult, load_examples
from tunesmith.data.formats import FORMAT_NAMES
from tunesmith.errors import DataError

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEYS = ["messages", "conversations", "instruction", "input", "output", "prompt", "completion", "chosen",
        "rejected", "text", "instances", "system", "message_id", "parent_id", "role", "rank", "from", "value",
        "preferred_output", "non_preferred_output"]

scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False, width=32) | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), inner, max_size=3),
                           max_leaves=8)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "bot"]),
                                           "content": st.text(max_size=12)}), max_size=3)
words = st.text(min_size=1, max_size=12)
valid = st.one_of(  # rows that should load, so the happy path is exercised under corruption too
    st.fixed_dictionaries({"instruction": words, "output": words}),
    st.fixed_dictionaries({"prompt": words, "completion": words}),
    st.fixed_dictionaries({"prompt": words, "chosen": words, "rejected": words}),
    st.fixed_dictionaries({"text": words}),
    st.fixed_dictionaries({"messages": st.tuples(words, words).map(
        lambda qa: [{"role": "user", "content": qa[0]}, {"role": "assistant", "content": qa[1]}])}),
    st.tuples(words, words, words).map(lambda t: {  # OpenAI's preference format
        "input": {"messages": [{"role": "user", "content": t[0]}]},
        "preferred_output": [{"role": "assistant", "content": t[1]}],
        "non_preferred_output": [{"role": "assistant", "content": t[2]}]}),
)
records = valid | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5),
                                  st.text(max_size=20) | messages | json_values, max_size=5)
options = st.fixed_dictionaries({
    "fmt": st.sampled_from(["auto", *FORMAT_NAMES]),
    "columns": st.none() | st.dictionaries(st.sampled_from(["instruction", "output", "prompt", "completion", "text"]),
                                           st.sampled_from(KEYS), min_size=1, max_size=2),
    "skip_invalid": st.booleans(),
    "system_prompt": st.none() | st.just("Be brief."),
})


@st.composite
def corrupted(draw, payload: bytes) -> bytes:
    """The payload unchanged, cut short, with bytes overwritten or inserted, or replaced by noise."""
    how = draw(st.sampled_from(["keep", "cut", "overwrite", "insert", "noise"]))
    at = draw(st.integers(0, len(payload)))
    if how == "cut":
        return payload[:at]
    if how == "overwrite":
        return payload[:at] + draw(st.binary(min_size=1, max_size=8)) + payload[at + 8:]
    if how == "insert":
        return payload[:at] + draw(st.binary(min_size=1, max_size=8)) + payload[at:]
    if how == "noise":
        return draw(st.binary(max_size=300))
    return payload


def assert_loads_or_names_file(path: Path, opts: dict) -> None:
    try:
        result = load_examples(path, **opts)
    except DataError as exc:
        assert str(path) in str(exc), f"DataError does not name {path}: {exc}"
    else:
        assert isinstance(result, LoadResult) and result.examples


def as_jsonl(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def as_delimited(rows: list[dict], delimiter: str) -> bytes:
    out = io.StringIO()
    keys = sorted({k for r in rows for k in r}) or ["text"]
    w = csv.DictWriter(out, fieldnames=keys, delimiter=delimiter)
    w.writeheader()
    w.writerows({k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()} for r in rows)
    return out.getvalue().encode()


TEXT_KINDS = {".jsonl": as_jsonl, ".json": lambda rows: json.dumps(rows).encode(),
              ".csv": lambda rows: as_delimited(rows, ","), ".tsv": lambda rows: as_delimited(rows, "\t")}


def arrow_table(rows: list[dict]):
    """Arrow needs one storable type per column: when the rows have none, their values are stored
    as JSON text instead."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.Table.from_pylist(rows)
        pq.write_table(table, io.BytesIO())
        return table
    except (pa.ArrowException, TypeError, ValueError):
        return pa.Table.from_pylist([{k: json.dumps(v) for k, v in r.items()} for r in rows])


def parquet_bytes(rows: list[dict]) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(arrow_table(rows), buf)
    return buf.getvalue()


@SETTINGS
@given(rows=st.lists(records, max_size=6), kind=st.sampled_from(sorted(TEXT_KINDS)), opts=options, data=st.data())
def test_text_files(rows, kind, opts, data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"d{kind}"
        path.write_bytes(data.draw(corrupted(TEXT_KINDS[kind](rows))))
        assert_loads_or_names_file(path, opts)


@SETTINGS
@given(rows=st.lists(records, max_size=6), kind=st.sampled_from(sorted(TEXT_KINDS)), inner_or_outer=st.booleans(),
       opts=options, data=st.data())
def test_gzip_files(rows, kind, inner_or_outer, opts, data):
    payload = TEXT_KINDS[kind](rows)
    if inner_or_outer:
        packed = gzip.compress(data.draw(corrupted(payload)))
    else:
        packed = data.draw(corrupted(gzip.compress(payload)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"d{kind}.gz"
        path.write_bytes(packed)
        assert_loads_or_names_file(path, opts)


@SETTINGS
@given(rows=st.lists(records, max_size=6), opts=options, data=st.data())
def test_parquet_files(rows, opts, data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.parquet"
        path.write_bytes(data.draw(corrupted(parquet_bytes(rows))))
        assert_loads_or_names_file(path, opts)


@settings(SETTINGS, max_examples=50)
@given(rows=st.lists(records, max_size=5), opts=options, damage=st.sampled_from(["none", "arrow", "state", "info"]),
       data=st.data())
def test_datasets_directories(rows, opts, damage, data):
    import datasets

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "saved"
        try:
            saved = datasets.Dataset(arrow_table(rows))
        except (datasets.table.CastError, ValueError, TypeError):
            assume(False)  # datasets itself cannot hold these rows (e.g. a column named '\x00'): no such folder exists
        saved.save_to_disk(str(path))
        target = {"arrow": path / "data-00000-of-00001.arrow", "state": path / "state.json",
                  "info": path / "dataset_info.json"}.get(damage)
        if target is not None and target.exists():
            target.write_bytes(data.draw(corrupted(target.read_bytes())))
        assert_loads_or_names_file(path, opts)
