"""`tunesmith data prepare`: seeded split before cleaning, dedup across splits, PII, atomic output."""
import json
from pathlib import Path

import pytest
import yaml

from conftest import SHARED_DATA, write_jsonl
from test_dedup_pii import PLANTED, one_word_changed, planted_text, sentence
from tunesmith.cli import main
from tunesmith.config import parse_config
from tunesmith.data import prepare as prep
from tunesmith.data.dataset import load_examples
from tunesmith.errors import ConfigError

N = 60
FRACTIONS = {"validation_fraction": 0.2, "test_fraction": 0.2}


def chat(i: int, user: str | None = None, answer: str | None = None) -> dict:
    return {"messages": [{"role": "user", "content": user or f"Row {i}: " + sentence(i, 40)},
                         {"role": "assistant", "content": answer or sentence(10_000 + i, 40)}]}


def config(tmp_path: Path, data: Path, **prepare) -> dict:
    return {"data": {"train": str(data)},
            "prepare": {"output_dir": str(tmp_path / "out"), "workers": 1, **FRACTIONS, **prepare}}


def run(cfg: dict) -> dict:
    return prep.prepare(parse_config(cfg))


def read(out: Path, split: str) -> list[dict]:
    path = out / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def first_user(row: dict) -> str:
    return row["messages"][0]["content"]


def test_split_is_seeded_and_disjoint(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [chat(i) for i in range(N)])
    a = run(config(tmp_path, data, seed=1))
    files_a = {s: (tmp_path / "out" / f"{s}.jsonl").read_text() for s in prep.SPLITS}
    run(config(tmp_path, data, seed=1))
    assert files_a == {s: (tmp_path / "out" / f"{s}.jsonl").read_text() for s in prep.SPLITS}
    run(config(tmp_path, data, seed=2))
    assert files_a["test"] != (tmp_path / "out" / "test.jsonl").read_text()
    sets = {s: {first_user(r) for r in read(tmp_path / "out", s)} for s in prep.SPLITS}
    assert a["written"] == {"train": 36, "validation": 12, "test": 12}
    assert not (sets["train"] & sets["test"] or sets["train"] & sets["validation"] or sets["test"] & sets["validation"])
    assert len(sets["train"] | sets["validation"] | sets["test"]) == N


def test_split_rows_counts_and_order():
    split = prep.split_rows(10, 0.2, 0.1, seed=0)
    assert split.count("validation") == 2 and split.count("test") == 1
    assert split == prep.split_rows(10, 0.2, 0.1, seed=0) != prep.split_rows(10, 0.2, 0.1, seed=3)


def plant(rows: list[dict], seed: int) -> tuple[int, int, int, int]:
    """A near copy of a test row placed where the seed sends a train row, and an exact copy of a
    validation row placed at another train position. Returns (test i, train j, val k, train l)."""
    split = prep.split_rows(len(rows), FRACTIONS["validation_fraction"], FRACTIONS["test_fraction"], seed)
    i, k = split.index("test"), split.index("validation")
    j, l = [n for n, s in enumerate(split) if s == "train"][:2]
    rows[j] = chat(j, first_user(rows[i]), one_word_changed(rows[i]["messages"][1]["content"], 20))
    rows[l] = chat(l, first_user(rows[k]).upper(), rows[k]["messages"][1]["content"])
    return i, j, k, l


def test_duplicates_of_held_out_rows_are_removed_from_train(tmp_path):
    rows = [chat(i) for i in range(N)]
    i, j, k, l = plant(rows, seed=0)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    report = run(config(tmp_path, data, seed=0))
    out = tmp_path / "out"
    train_users = [first_user(r) for r in read(out, "train")]
    assert first_user(rows[i]) in [first_user(r) for r in read(out, "test")]
    assert first_user(rows[i]) not in train_users and first_user(rows[l]) not in train_users
    removed = {r["where"]: r for r in report["removed"]["rows"]}
    assert removed[f"{data}:{j + 1}"]["reason"] == "near_duplicate"
    assert removed[f"{data}:{j + 1}"]["duplicate_of"] == f"{data}:{i + 1}"
    assert removed[f"{data}:{l + 1}"] == {"where": f"{data}:{l + 1}", "split": "train", "reason": "exact_duplicate",
                                        "duplicate_of": f"{data}:{k + 1}", "kept_in": "validation"}
    assert report["removed"]["counts"] == {"near_duplicate": 1, "exact_duplicate": 1}


def test_dedup_none_keeps_copies(tmp_path):
    rows = [chat(i) for i in range(N)]
    plant(rows, seed=0)
    report = run(config(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), dedup="none"))
    assert report["removed"]["counts"] == {} and sum(report["written"].values()) == N


def pii_rows() -> list[dict]:
    return [chat(i) for i in range(20)] + [chat(100 + n, answer=planted_text(k)) for n, k in enumerate(PLANTED)]


def test_pii_redact(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", pii_rows())
    report = run(config(tmp_path, data, pii="redact"))
    text = "".join((tmp_path / "out" / f"{s}.jsonl").read_text() for s in prep.SPLITS)
    for value in PLANTED.values():
        assert value.splitlines()[0] not in text
    assert text.count("[REDACTED_") == len(PLANTED)
    assert report["pii"]["counts"] == {k: 1 for k in PLANTED}
    assert report["pii"]["rows_redacted"] == len(PLANTED) and sum(report["written"].values()) == 20 + len(PLANTED)


def test_pii_drop_and_keep(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", pii_rows())
    report = run(config(tmp_path, data, pii="drop"))
    assert report["removed"]["counts"] == {"pii": len(PLANTED)} and sum(report["written"].values()) == 20
    assert "REDACTED" not in "".join((tmp_path / "out" / f"{s}.jsonl").read_text() for s in prep.SPLITS)
    report = run(config(tmp_path, data, pii="keep"))
    text = "".join((tmp_path / "out" / f"{s}.jsonl").read_text() for s in prep.SPLITS)
    assert PLANTED["aws_access_key"] in text and report["pii"]["rows_redacted"] == 0


def test_report_counts_match_files(tmp_path):
    rows = [chat(i) for i in range(N)]
    plant(rows, seed=0)
    rows += [chat(200 + n, answer=planted_text(k)) for n, k in enumerate(PLANTED)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    report = run(config(tmp_path, data, pii="drop"))
    on_disk = json.loads((tmp_path / "out" / prep.REPORT).read_text())
    assert on_disk == report
    assert {s: len(read(tmp_path / "out", s)) for s in prep.SPLITS} == report["written"]
    assert sum(report["written"].values()) + len(report["removed"]["rows"]) == report["records"] == len(rows)
    assert sum(report["removed"]["counts"].values()) == len(report["removed"]["rows"])
    for reason, count in report["removed"]["counts"].items():
        assert sum(r["reason"] == reason for r in report["removed"]["rows"]) == count
    for split, counts in report["removed"]["by_split"].items():
        assert report["split_before_cleaning"].get(split, 0) - sum(counts.values()) == report["written"][split]


def test_length_filters_and_contamination(tmp_path, tiny_model_dir, tiny_tokenizer):
    from tunesmith.data.tokenize import render

    rows = [chat(i) for i in range(N)] + [chat(N, "Hi", "Yo"), chat(N + 1, answer=sentence(77, 400))]
    short = len(tiny_tokenizer(render(tiny_tokenizer, rows[N]["messages"]), add_special_tokens=False)["input_ids"])
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    split = prep.split_rows(len(rows), FRACTIONS["validation_fraction"], FRACTIONS["test_fraction"], seed=0)
    victim = split.index("train")
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"q": " ".join(first_user(rows[victim]).split()[3:20])}])
    cfg = config(tmp_path, data, min_tokens=short + 1, max_tokens=600, contamination_eval=[str(evals)])
    cfg["model"] = {"name": str(tiny_model_dir)}
    report = run(cfg)
    reasons = {r["where"]: r["reason"] for r in report["removed"]["rows"]}
    assert reasons[f"{data}:{N + 1}"] == "too_short" and reasons[f"{data}:{N + 2}"] == "too_long"
    assert reasons[f"{data}:{victim + 1}"] == "contaminated"
    assert report["removed"]["counts"] == {"too_short": 1, "too_long": 1, "contaminated": 1}


def test_outputs_round_trip_for_every_kind(tmp_path):
    rows = [chat(i) for i in range(4)] + [{"text": sentence(50 + i, 30)} for i in range(4)] + [
        {"prompt": sentence(60 + i, 10), "chosen": sentence(70 + i, 10), "rejected": sentence(80 + i, 10)}
        for i in range(4)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    run(config(tmp_path, data, validation_fraction=0.0, test_fraction=0.0))
    out = tmp_path / "out"
    assert not (out / "test.jsonl").exists() and not (out / "validation.jsonl").exists()
    before = [(e.kind, e.messages, e.text, e.prompt, e.chosen, e.rejected) for e in load_examples(data).examples]
    after = [(e.kind, e.messages, e.text, e.prompt, e.chosen, e.rejected)
             for e in load_examples(out / "train.jsonl").examples]
    assert before == after


def test_a_crash_leaves_no_half_written_output(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", [chat(i) for i in range(N)])
    run(config(tmp_path, data))
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = {"n": 0}
    real = prep.to_record

    def dies_midway(ex):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(ex)

    monkeypatch.setattr(prep, "to_record", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        run(config(tmp_path, data, seed=5))
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert prep.REPORT not in after  # no report: the set is known to be incomplete
    assert set(after) == set(before) - {prep.REPORT}  # no temp files left behind
    assert after["train.jsonl"] == before["train.jsonl"]  # the file being written was not replaced


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="prepare.near_dup_threshold"):
        parse_config({"prepare": {"near_dup_treshold": 0.9}})
    data = write_jsonl(tmp_path / "d.jsonl", [chat(i) for i in range(5)])
    with pytest.raises(ConfigError, match="leaves nothing to train on"):
        run(config(tmp_path, data, validation_fraction=0.5, test_fraction=0.5))


def test_cli_prepare(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [chat(i) for i in range(N)])
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config(tmp_path, data)))
    assert main(["data", "prepare", str(cfg_path), "prepare.seed=3"]) == 0
    assert "60 records -> train 36, validation 12, test 12" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / prep.REPORT).read_text())["prepare"]["seed"] == 3


# --- real data (skipped when ../shared/data is absent) -------------------------------------------

needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared datasets not present")


@needs_data
def test_real_banking77_csv(tmp_path):
    cfg = {"data": {"train": str(SHARED_DATA / "banking77" / "train.csv"),
                    "columns": {"instruction": "text", "output": "category"}},
           "prepare": {"output_dir": str(tmp_path / "out"), "workers": 1}}
    report = run(cfg)
    assert report["records"] == 10003
    assert report["removed"]["counts"]["exact_duplicate"] == 4  # 4 repeated (text, category) rows in the file
    assert sum(report["written"].values()) + len(report["removed"]["rows"]) == 10003
    assert report["split_before_cleaning"] == {"train": 9003, "validation": 500, "test": 500}


@needs_data
def test_real_hh_rlhf_preference_round_trip(tmp_path):
    cfg = {"data": {"train": str(SHARED_DATA / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"), "skip_invalid": True},
           "prepare": {"output_dir": str(tmp_path / "out"), "workers": 1, "dedup": "exact", "pii": "keep"}}
    report = run(cfg)
    assert report["invalid"]["count"] == 2  # two rows whose chosen equals rejected
    assert Path(report["invalid"]["quarantine"]).is_file()
    back = load_examples(tmp_path / "out" / "train.jsonl").examples
    assert len(back) == report["written"]["train"] and {e.kind for e in back} == {"preference"}
