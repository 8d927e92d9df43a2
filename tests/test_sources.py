"""Data sources (every file kind gives the same Examples), streaming, mixing by weight, and the
message each kind of bad input produces."""
from __future__ import annotations

import csv
import gzip
import json
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest

from conftest import SHARED_DATA, write_jsonl
from tunesmith.config import SourceSection, load_config
from tunesmith.data import sources
from tunesmith.data.dataset import load_examples
from tunesmith.data.mix import draw, load_mixture, shares
from tunesmith.data.sources import expand_source, iter_records
from tunesmith.errors import DataError

# Awkward values on purpose: delimiters, quotes, newlines, tabs and non-ASCII survive every format.
ALPACA = [{"instruction": f"Task {i}, with a comma", "input": 'say "hi"\tthen\nleave' if i % 2 else "",
           "output": f"Réponse {i} ✓"} for i in range(7)]
CHATS = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
         for i in range(5)]
real = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")


# --- writers, one per source kind -------------------------------------------------------------

def write_json(path: Path, rows, key: str | None = None) -> Path:
    path.write_text(json.dumps({key: rows} if key else rows), encoding="utf-8")
    return path


def write_delimited(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict], row_group_size: int | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def write_dataset(path: Path, rows: list[dict]) -> Path:
    import datasets

    datasets.disable_progress_bars()
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def gzipped(path: Path) -> Path:
    out = path.with_name(path.name + ".gz")
    out.write_bytes(gzip.compress(path.read_bytes()))
    return out


def loaded(spec, **kw) -> list:
    return [ex.messages for ex in load_examples(spec, **kw).examples]


def error_of(spec, **kw) -> str:
    with pytest.raises(DataError) as e:
        load_examples(spec, **kw)
    return str(e.value)


# --- every kind of source gives the same Examples --------------------------------------------

@pytest.mark.parametrize("kind", ["json", "json_object", "csv", "tsv", "parquet", "datasets",
                                  "jsonl.gz", "json.gz", "csv.gz", "tsv.gz"])
def test_each_source_kind_equals_jsonl(tmp_path, kind):
    expected = loaded(write_jsonl(tmp_path / "ref.jsonl", ALPACA))
    writers = {"json": lambda: write_json(tmp_path / "d.json", ALPACA),
               "json_object": lambda: write_json(tmp_path / "d.json", ALPACA, key="data"),
               "csv": lambda: write_delimited(tmp_path / "d.csv", ALPACA),
               "tsv": lambda: write_delimited(tmp_path / "d.tsv", ALPACA, "\t"),
               "parquet": lambda: write_parquet(tmp_path / "d.parquet", ALPACA),
               "datasets": lambda: write_dataset(tmp_path / "saved", ALPACA),
               "jsonl.gz": lambda: gzipped(write_jsonl(tmp_path / "d.jsonl", ALPACA)),
               "json.gz": lambda: gzipped(write_json(tmp_path / "d.json", ALPACA)),
               "csv.gz": lambda: gzipped(write_delimited(tmp_path / "d.csv", ALPACA)),
               "tsv.gz": lambda: gzipped(write_delimited(tmp_path / "d.tsv", ALPACA, "\t"))}
    assert loaded(writers[kind]()) == expected and len(expected) == len(ALPACA)


@pytest.mark.parametrize("kind", ["json", "parquet", "datasets", "jsonl.gz"])
def test_nested_records_survive_structured_kinds(tmp_path, kind):
    writers = {"json": lambda: write_json(tmp_path / "d.json", CHATS),
               "parquet": lambda: write_parquet(tmp_path / "d.parquet", CHATS),
               "datasets": lambda: write_dataset(tmp_path / "saved", CHATS),
               "jsonl.gz": lambda: gzipped(write_jsonl(tmp_path / "d.jsonl", CHATS))}
    assert loaded(writers[kind]()) == loaded(write_jsonl(tmp_path / "ref.jsonl", CHATS))


def test_locations_name_the_line_or_record(tmp_path):
    csv_path = write_delimited(tmp_path / "d.csv", ALPACA)  # rows 1, 3, 5 span two lines (a newline in input)
    starts = [ex.location for ex in load_examples(csv_path).examples]
    assert starts[:4] == [f"{csv_path}:2", f"{csv_path}:3", f"{csv_path}:5", f"{csv_path}:6"]
    assert load_examples(write_json(tmp_path / "d.json", ALPACA)).examples[2].location == f"{tmp_path}/d.json:record 3"
    pq_path = write_parquet(tmp_path / "d.parquet", ALPACA)
    assert load_examples(pq_path).examples[-1].location == f"{pq_path}:record 7"


def test_csv_values_are_strings_and_columns_can_be_mapped(tmp_path):
    path = write_delimited(tmp_path / "d.csv", [{"text": "Where is my card?", "label": "7"}])
    assert next(iter_records(path)).record == {"text": "Where is my card?", "label": "7"}
    res = load_examples(path, columns={"instruction": "text", "output": "label"})
    assert res.examples[0].messages[-1] == {"role": "assistant", "content": "7"} and dict(res.formats) == {"alpaca": 1}


def test_datasets_dict_asks_for_a_split_and_split_dir_loads(tmp_path):
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_list(ALPACA)
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "dd"))
    msg = error_of(tmp_path / "dd")
    assert str(tmp_path / "dd") in msg and "train, test" in msg and str(tmp_path / "dd" / "train") in msg
    assert len(loaded(tmp_path / "dd" / "test")) == 2
    assert [p.name for p in expand_source(tmp_path / "dd" / "train")] == ["data-00000-of-00001.arrow"]


def test_glob_concatenates_matches_in_sorted_order_and_skips_quarantine_files(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", CHATS[2:4])
    gzipped(write_jsonl(tmp_path / "a.jsonl", CHATS[:2])).rename(tmp_path / "a.jsonl.gz")
    (tmp_path / "a.jsonl").unlink()
    write_delimited(tmp_path / "c.csv", [{"prompt": "q4", "completion": "a4"}])
    (tmp_path / "b.jsonl.quarantine.jsonl").write_text('{"where": "x", "error": "y", "raw": "z"}\n')
    res = load_examples(str(tmp_path / "*"))
    assert [ex.messages[0]["content"] for ex in res.examples] == ["q0", "q1", "q2", "q3", "q4"]
    assert [p.name for p in expand_source(str(tmp_path / "*"))] == ["a.jsonl.gz", "b.jsonl", "c.csv"]


# --- streaming: the first record arrives after reading a small prefix; memory stays flat -------

def _spy_open(monkeypatch) -> list:
    opened = []

    def spy(*args, **kw):
        f = open(*args, **kw)
        opened.append(f)
        return f

    monkeypatch.setattr(sources, "open", spy, raising=False)
    return opened


@pytest.fixture(scope="module")
def big_rows():
    import random

    rng = random.Random(0)  # random text keeps the gzip variant large too
    return [{"instruction": rng.randbytes(100).hex(), "output": f"answer {i}"} for i in range(20_000)]


@pytest.mark.parametrize("name", ["big.jsonl", "big.csv", "big.tsv", "big.jsonl.gz", "big.csv.gz"])
def test_readers_stream_instead_of_reading_the_whole_file(tmp_path, monkeypatch, big_rows, name):
    plain = tmp_path / name.removesuffix(".gz")
    if plain.suffix == ".jsonl":
        write_jsonl(plain, big_rows)
    else:
        write_delimited(plain, big_rows, "\t" if plain.suffix == ".tsv" else ",")
    path = gzipped(plain) if name.endswith(".gz") else plain
    opened = _spy_open(monkeypatch)
    rows = iter_records(path)
    assert next(rows).record["output"] == "answer 0"
    read, size = opened[0].tell(), path.stat().st_size
    assert size > 40_000 and read < size / 4, f"read {read} of {size} bytes before the first record"
    rows.close()


def test_parquet_is_read_batch_by_batch(tmp_path, monkeypatch, big_rows):
    import pyarrow.parquet as pq

    path = write_parquet(tmp_path / "big.parquet", big_rows, row_group_size=2000)
    fetched = []
    real_iter = pq.ParquetFile.iter_batches

    def counting(self, *a, **kw):
        for batch in real_iter(self, *a, **kw):
            fetched.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **kw: pytest.fail("read the whole file"))
    rows = iter_records(path)
    assert next(rows).record["output"] == "answer 0"
    assert fetched == [sources.BATCH_ROWS]
    rows.close()


def test_memory_does_not_grow_with_file_size(tmp_path, big_rows):
    path = write_jsonl(tmp_path / "big.jsonl", big_rows)
    tracemalloc.start()
    try:
        n = sum(1 for _ in iter_records(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == len(big_rows) and peak < path.stat().st_size / 10, f"peak {peak} for {path.stat().st_size} bytes"


# --- mixing by weight ------------------------------------------------------------------------

def _source(tmp_path, name: str, n: int, weight: float) -> SourceSection:
    rows = [{"prompt": f"{name}-{i}", "completion": "ok"} for i in range(n)]
    return SourceSection(path=str(write_jsonl(tmp_path / f"{name}.jsonl", rows)), weight=weight)


def _names(result) -> list[str]:
    return [ex.messages[0]["content"] for ex in result.examples]


def test_mix_counts_follow_weights_and_upsampling_repeats_evenly(tmp_path, capsys):
    a, b = _source(tmp_path, "a", 120, 3.0), _source(tmp_path, "b", 280, 1.0)
    res = load_mixture([a, b], seed=1)
    names = Counter(_names(res))
    assert len(res.examples) == 400 and dict(res.formats) == {"prompt_completion": 400}
    a_counts = Counter(n for k, n in names.items() if k.startswith("a-"))
    b_counts = Counter(n for k, n in names.items() if k.startswith("b-"))
    assert a_counts == {2: 60, 3: 60}  # 300 = 120 each twice, then 60 of them a third time
    assert b_counts == {1: 100}  # 100 of 280, without replacement
    assert res.parts[0] == {"path": a.path, "weight": 3.0, "available": 120, "drawn": 300, "unique": 120}
    assert f"mix: {a.path} 300 (weight 3.0, 120 unique of 120); {b.path} 100 (weight 1.0, 100 unique" \
        in capsys.readouterr().out


def test_mix_is_shuffled_together_and_seeded(tmp_path):
    srcs = [_source(tmp_path, "a", 50, 1.0), _source(tmp_path, "b", 50, 1.0)]
    first, again, other = (_names(load_mixture(srcs, seed=s)) for s in (7, 7, 8))
    assert first == again and first != other and sorted(first) == sorted(other)
    assert {n[0] for n in first[:20]} == {"a", "b"}  # interleaved, not source after source


def test_shares_keep_the_total_and_draw_repeats_evenly():
    assert shares(400, [3, 1]) == [300, 100]
    assert shares(100, [1, 1, 1]) == [34, 33, 33] and shares(7, [1, 1]) == [4, 3] and shares(5, [0.01, 100]) == [0, 5]
    import random

    assert sorted(Counter(draw(list("abcd"), 10, random.Random(0))).values()) == [2, 2, 3, 3]
    assert len(set(draw(list("abcdef"), 4, random.Random(0)))) == 4  # without replacement


def test_mix_reads_every_source_kind_with_its_columns_and_format(tmp_path):
    write_parquet(tmp_path / "p.parquet", CHATS)
    write_dataset(tmp_path / "saved", ALPACA)
    write_delimited(tmp_path / "c.csv", [{"q": "x", "a": "y"}] * 3)
    gzipped(write_jsonl(tmp_path / "g.jsonl", CHATS))
    srcs = [SourceSection(path=str(tmp_path / "p.parquet")), SourceSection(path=str(tmp_path / "saved"), weight=2),
            SourceSection(path=str(tmp_path / "c.csv"), columns={"prompt": "q", "completion": "a"}),
            SourceSection(path=str(tmp_path / "g.jsonl.gz"), format="messages")]
    res = load_mixture(srcs, system_prompt="Be brief.", seed=0)
    assert len(res.examples) == 5 + 7 + 3 + 5 and set(res.formats) <= {"messages", "alpaca", "prompt_completion"}
    assert all(ex.messages[0] == {"role": "system", "content": "Be brief."} for ex in res.examples)


def test_recipe_loads_the_mixture_and_hashes_every_source_kind(tmp_path):
    from tunesmith.recipes.sft import data_files_of, load_training_examples

    write_dataset(tmp_path / "saved", ALPACA)
    gzipped(write_jsonl(tmp_path / "g.jsonl", CHATS))
    write_jsonl(tmp_path / "v.jsonl", CHATS)
    cfg = load_config(None, [f"data.validation={tmp_path / 'v.jsonl'}"])
    cfg.data.sources = [SourceSection(path=str(tmp_path / "saved")), SourceSection(path=str(tmp_path / "*.gz"))]
    assert len(load_training_examples(cfg).examples) == 12
    assert [p.name for p in data_files_of(cfg)] == ["data-00000-of-00001.arrow", "g.jsonl.gz", "v.jsonl"]


# --- bad input: each message names the file (and line/field) and the fix -----------------------

def test_malformed_json_line_names_file_line_and_problem(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    msg = error_of(path)
    assert f"{path}:2: malformed JSON" in msg and "column" in msg
    path.write_text('{"prompt": "a", "completion": "b"}\n[1, 2]\n')
    assert f"{path}:2: a record must be a JSON object, got list" in error_of(path)
    path.write_text('{"prompt": "\\ud83d\\ude00 fine", "completion": "b"}\n{"prompt": "\\ud800", "completion": "b"}\n')
    assert f"{path}:2: holds an unpaired UTF-16 surrogate" in error_of(path)


@pytest.mark.parametrize("name,content,expected", [
    ("e.jsonl", b"", "the file is empty (0 bytes)"),
    ("e.csv", b"", "the file is empty (0 bytes)"),
    ("e.parquet", b"", "the file is empty (0 bytes)"),
    ("e.jsonl", b"\n  \n", "holds no records"),
    ("e.json", b"  \n", "the file is empty"),
    ("e.json", b"[]", "holds no records"),
    ("e.csv", b"instruction,output\n", "holds no records"),
    ("e.tsv", b"\n\n", "needs a header row"),
    ("e.jsonl.gz", gzip.compress(b""), "holds no records"),
])
def test_empty_files_are_named(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    msg = error_of(path)
    assert str(path) in msg and expected in msg


@pytest.mark.parametrize("name,content,line", [
    ("d.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff\xfe", "completion": "b"}\n', 2),
    ("d.csv", b'prompt,completion\na,b\n"x\ny",\xe9t\xe9\n', 3),
    ("d.json", b'[\n{"prompt": "a", "completion": "b"},\n{"prompt": "\xff"}]', 3),
])
def test_non_utf8_bytes_name_file_and_line(tmp_path, name, content, line):
    path = tmp_path / name
    path.write_bytes(content)
    msg = error_of(path)
    assert f"{path}:{line}: not UTF-8" in msg and "re-encode the file as UTF-8" in msg


def test_utf8_bom_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffprompt,completion\na,b\n".encode())
    assert next(iter_records(path)).record == {"prompt": "a", "completion": "b"}


def test_missing_column_names_the_column_and_the_config_key(tmp_path):
    path = write_delimited(tmp_path / "d.csv", [{"text": "hi", "category": "x"}])
    msg = error_of(path, columns={"instruction": "text", "output": "label"})
    assert f"{path}:2:" in msg and "['label']" in msg and "data.columns" in msg and "'category'" in msg


@pytest.mark.parametrize("record,field", [
    ({"messages": "hello"}, "field 'messages' must be a non-empty list"),
    ({"instruction": "a", "output": 3}, "field 'output' must be a string, got int"),
    ({"instruction": "a", "output": "b", "system": ["x"]}, "field 'system' must be a string, got list"),
    ({"prompt": "a", "completion": None}, "field 'completion' must be a string, got NoneType"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role 'robot'"),
])
def test_wrong_types_name_line_and_field(tmp_path, record, field):
    path = write_jsonl(tmp_path / "d.jsonl", [CHATS[0], record])
    msg = error_of(path)
    assert f"{path}:2:" in msg and field in msg


def test_chosen_equal_to_rejected_is_refused(tmp_path):
    same = {"prompt": "q", "chosen": "a", "rejected": "a"}
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, same])
    assert f"{path}:2: chosen equals rejected" in error_of(path)


@pytest.mark.parametrize("name,expected", [
    ("notes.txt", "unsupported file type '.txt'"),
    ("data.gz", "unknown inner type ''"),
    ("data.xml.gz", "unknown inner type '.xml'"),
    ("data.parquet.gz", "Parquet compresses itself"),
])
def test_unsupported_types_say_what_is_supported(tmp_path, name, expected):
    path = tmp_path / name
    path.write_text("x")
    msg = error_of(path)
    assert str(path) in msg and expected in msg and ".jsonl, .json, .csv, .tsv" in msg


def test_missing_paths_globs_and_plain_directories(tmp_path):
    assert f"data file not found: {tmp_path / 'no.jsonl'}" in error_of(tmp_path / "no.jsonl")
    assert f"no files match {tmp_path}/*.jsonl.gz" in error_of(f"{tmp_path}/*.jsonl.gz")
    (tmp_path / "plain").mkdir()
    assert "not one saved by `datasets`" in error_of(tmp_path / "plain")


def test_corrupt_gzip_is_a_data_error_naming_the_file(tmp_path):
    good = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in CHATS * 200))
    cases = {"truncated.jsonl.gz": good[: len(good) // 2], "notgzip.jsonl.gz": b'{"text": "plain"}\n',
             "garbled.jsonl.gz": good[:20] + bytes(200) + good[220:]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        msg = error_of(tmp_path / name)
        assert f"{tmp_path / name}: corrupt or truncated gzip data" in msg, msg
    (tmp_path / "hidden.jsonl").write_bytes(good)
    assert "rename it to hidden.jsonl.gz" in error_of(tmp_path / "hidden.jsonl")


def test_corrupt_parquet_and_datasets_dir_are_data_errors(tmp_path):
    good = write_parquet(tmp_path / "good.parquet", ALPACA).read_bytes()
    for name, data in {"junk.parquet": b"not parquet at all", "cut.parquet": good[: len(good) // 2],
                       "nofooter.parquet": good[:-8]}.items():
        (tmp_path / name).write_bytes(data)
        assert f"{tmp_path / name}: not a readable Parquet file" in error_of(tmp_path / name)
    saved = write_dataset(tmp_path / "saved", ALPACA)
    (saved / "data-00000-of-00001.arrow").write_bytes(b"garbage")
    assert f"{saved}: cannot read this `datasets` directory" in error_of(saved)


def test_csv_row_problems_name_the_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\na,b\nc,d,e\n')
    assert f"{path}:3: has 3 fields but the header names 2" in error_of(path)
    path.write_text('prompt,completion\na,b\n"c"x,d\n')
    assert f"{path}:3: malformed CSV" in error_of(path)
    path.write_text('prompt,prompt\na,b\n')
    assert "['prompt'] appear twice in the header" in error_of(path)


def test_json_document_problems(tmp_path):
    path = write_json(tmp_path / "two.json", {"train": CHATS, "test": CHATS})
    assert f"{path}: a JSON object must hold exactly one list" in error_of(path) and "'train'" in error_of(path)
    path.write_text(json.dumps(CHATS[0]) + "\n" + json.dumps(CHATS[1]) + "\n")
    assert f"{path}:2: malformed JSON: Extra data" in error_of(path) and "name the file .jsonl" in error_of(path)
    write_json(path, [CHATS[0], "oops"])
    assert f"{path}:record 2: a record must be a JSON object, got str" in error_of(path)


def test_bad_oasst_rows_are_reported_not_crashed_on(tmp_path):
    root = {"message_id": "m1", "parent_id": None, "role": "prompter", "text": "hi"}
    reply = {"message_id": "m2", "parent_id": "m1", "role": "assistant", "text": "hello"}
    path = write_jsonl(tmp_path / "o.jsonl", [root, reply, {**reply, "parent_id": "m2"}])
    assert f"{path}:3: message_id 'm2' was already used at {path}:2" in error_of(path)
    write_jsonl(path, [root, {**reply, "parent_id": ["m1"]}])
    assert f"{path}:2: field 'parent_id' must be a string" in error_of(path, fmt="oasst")
    write_jsonl(path, [root, {"text": "x"}])
    assert f"{path}:2: an oasst row needs" in error_of(path, fmt="oasst")


# --- quarantine (--skip-invalid) ---------------------------------------------------------------

def test_skip_invalid_quarantines_each_bad_row_with_where_error_and_raw(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(CHATS[0]).encode() + b"\n{broken\n" + b'{"messages": 5}\n'
                     + b'{"prompt": "\xff", "completion": "x"}\n' + json.dumps(CHATS[1]).encode() + b"\n")
    res = load_examples(path, skip_invalid=True)
    assert len(res.examples) == 2 and [r["where"] for r in res.invalid] == [f"{path}:{n}" for n in (2, 3, 4)]
    quarantine = Path(f"{path}.quarantine.jsonl")
    rows = [json.loads(line) for line in quarantine.read_text().splitlines()]
    assert [r["where"] for r in rows] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert "malformed JSON" in rows[0]["error"] and rows[0]["raw"] == "{broken\n"
    assert "field 'messages'" in rows[1]["error"] and rows[1]["raw"] == {"messages": 5}
    assert "not UTF-8" in rows[2]["error"] and rows[2]["raw"].startswith('{"prompt": "\ufffd')
    assert str(quarantine) in res.describe()


def test_quarantine_holds_values_json_cannot(tmp_path):
    import datetime

    rows = [{"prompt": "a", "completion": c, "blob": b"\x00", "at": datetime.date(2024, 1, 2)} for c in ("b", None)]
    path = write_parquet(tmp_path / "d.parquet", rows)
    res = load_examples(path, skip_invalid=True, quarantine=tmp_path / "q.jsonl")
    row = json.loads((tmp_path / "q.jsonl").read_text())
    assert len(res.examples) == 1 and row["where"] == f"{path}:record 2" and "got NoneType" in row["error"]
    assert row["raw"]["at"] == "2024-01-02" and row["raw"]["blob"] == "b'\\x00'"


def test_all_rows_invalid_points_to_the_quarantine(tmp_path):
    path = write_delimited(tmp_path / "d.csv", [{"text": "a", "category": "b"}] * 3)
    msg = error_of(path, columns={"instruction": "text", "output": "label"}, skip_invalid=True)
    assert "all 3 rows are invalid" in msg and f"{path}.quarantine.jsonl" in msg and "['label']" in msg


def test_train_skip_invalid_flag_sets_config(tmp_path, monkeypatch):
    import tunesmith.recipes.sft as sft
    from tunesmith.cli import main

    seen = []
    monkeypatch.setattr(sft, "run_sft", lambda cfg, resume=False, force=False: seen.append(cfg))
    (tmp_path / "c.yaml").write_text("train:\n  lr: 0.001\n")
    assert main(["train", str(tmp_path / "c.yaml"), "--skip-invalid", "train.seed=3"]) == 0
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    assert [c.data.skip_invalid for c in seen] == [True, False] and seen[0].train.seed == 3


# --- real data --------------------------------------------------------------------------------

@real
def test_real_banking77_csv_with_columns():
    res = load_examples(SHARED_DATA / "banking77" / "train.csv", columns={"instruction": "text", "output": "category"})
    assert len(res.examples) == 10003 and dict(res.formats) == {"alpaca": 10003}
    assert res.examples[0].messages[-1]["content"] == "card_arrival"


@real
def test_real_hh_rlhf_through_gzip_refuses_identical_pairs(tmp_path):
    path = SHARED_DATA / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
    res = load_examples(path, skip_invalid=True, quarantine=tmp_path / "q.jsonl")
    assert len(res.examples) + len(res.invalid) == 2354 and dict(res.formats) == {"preference": len(res.examples)}
    assert 0 < len(res.invalid) < 10 and all("chosen equals rejected" in r["error"] for r in res.invalid)
    both = load_examples(str(SHARED_DATA / "hh-rlhf" / "*" / "test.jsonl.gz"), skip_invalid=True,
                         quarantine=tmp_path / "q2.jsonl")
    assert len(both.examples) + len(both.invalid) == 2354 + 2749
