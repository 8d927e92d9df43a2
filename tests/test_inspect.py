"""`tunesmith data inspect`: every number in the report checked against a hand count."""
import json

import pytest

from conftest import SHARED_DATA, write_jsonl
from test_dedup_pii import PLANTED, one_word_changed, planted_text, sentence
from tunesmith.cli import main
from tunesmith.data.audit import AuditSettings, audit
from tunesmith.data.inspect import InspectOptions, inspect_file
from tunesmith.data.records import Example
from tunesmith.data.tokenize import render

REQUIRED = ["records", "invalid", "exact_duplicates", "near_duplicates", "pii", "truncated_fraction",
            "trained_token_fraction", "empty_mask_rows", "missing_eos_rows", "contaminated_rows"]


def chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def ntok(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def opts(model_dir, **kw) -> InspectOptions:
    return InspectOptions(model=str(model_dir), workers=1, **kw)


@pytest.fixture
def mask_rows(tiny_tokenizer):
    """Four rows built around a max_length M so that each lands in one case:
    fits / answer cut (EOS lost) / prompt alone longer than M (nothing trained) /
    only the template's trailing newline cut (truncated, but the EOS survives)."""
    tok = tiny_tokenizer
    fits = chat("Hi there.", "Hello.")
    edge = chat("What is the capital of France?", "Paris is the capital.")
    m = ntok(tok, render(tok, edge["messages"])) - 1  # chatml ends "<|im_end|>\n": the "\n" is cut
    cut = chat("Hi.", "Paris " * m)
    long_prompt = chat("France " * (m + 5), "Paris.")
    return tok, m, [fits, cut, long_prompt, edge]


def test_token_counts_match_hand_counts(tmp_path, tiny_model_dir, mask_rows):
    tok, m, rows = mask_rows
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    r = inspect_file(str(path), opts(tiny_model_dir, max_length=m)).report

    def full(row):
        return ntok(tok, render(tok, row["messages"]))

    def prompt(row):
        return ntok(tok, render(tok, row["messages"][:1], add_generation_prompt=True))

    def answer(row):
        return ntok(tok, row["messages"][1]["content"]) + 1  # + the trained EOS

    fits, cut, long_prompt, edge = rows
    assert full(fits) <= m < full(cut) and prompt(cut) < m < prompt(long_prompt) and full(edge) == m + 1
    kept = full(fits) + m + m + m
    trained = answer(fits) + (m - prompt(cut)) + 0 + answer(edge)
    assert r["trained_token_fraction"] == round(trained / kept, 6)
    assert r["truncated_fraction"] == 0.75
    where = [f"{path}:{i}" for i in range(1, 5)]
    assert r["empty_mask_rows"] == {"count": 1, "locations": [where[2]]}
    assert r["missing_eos_rows"] == {"count": 1, "locations": [where[1]]}
    assert r["tokens"]["lengths"]["max"] == full(long_prompt)


def test_last_assistant_mask_and_empty_rows(tmp_path, tiny_model_dir, tiny_tokenizer):
    conv = {"messages": [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "Yes."},
                         {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "No."}]}
    path = write_jsonl(tmp_path / "d.jsonl", [conv])
    r = inspect_file(str(path), opts(tiny_model_dir, train_on="last_assistant")).report
    trained = ntok(tiny_tokenizer, "No.") + 1
    total = ntok(tiny_tokenizer, render(tiny_tokenizer, conv["messages"]))
    assert r["trained_token_fraction"] == round(trained / total, 6)
    assert r["empty_mask_rows"]["count"] == 0 and r["missing_eos_rows"]["count"] == 0


def dirty_rows():
    """Distinct rows plus planted exact and near duplicates and one row per PII kind."""
    base = [chat(f"Question {i}: " + sentence(i, 30), sentence(1000 + i, 30)) for i in range(12)]
    exact = chat(base[2]["messages"][0]["content"].upper() + "  ", base[2]["messages"][1]["content"])
    near = chat(base[5]["messages"][0]["content"], one_word_changed(base[5]["messages"][1]["content"], 15))
    pii_rows = [chat("Contact details?", planted_text(kind)) for kind in PLANTED]
    return base + [exact, near] + pii_rows


def test_duplicates_pii_and_contamination(tmp_path, tiny_model_dir):
    rows = dirty_rows()
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    eval_q = rows[7]["messages"][0]["content"]
    eval_path = write_jsonl(tmp_path / "eval.jsonl", [{"question": "unrelated " + sentence(5000, 20)},
                                                      {"question": eval_q, "answer": "x"}])
    r = inspect_file(str(path), opts(tiny_model_dir, eval_files=[str(eval_path)])).report
    loc = [f"{path}:{i}" for i in range(1, len(rows) + 1)]
    assert r["exact_duplicates"]["groups"] == 1 and r["exact_duplicates"]["rows"] == 1
    assert r["exact_duplicates"]["examples"][0]["locations"] == [loc[2], loc[12]]
    near = r["near_duplicates"]
    assert (near["pairs"], near["clusters"], near["rows"]) == (1, 1, 1)
    assert near["examples"][0]["locations"] == [loc[5], loc[13]]
    assert r["pii"] == {kind: 1 for kind in PLANTED}
    assert r["pii_rows"]["rows"] == len(PLANTED)
    assert r["contaminated_rows"]["count"] == 1
    assert r["contaminated_rows"]["rows"][0]["where"] == loc[7]
    assert r["contaminated_rows"]["rows"][0]["eval_row"] == f"{eval_path}:2"
    assert r["records"]["total"] == len(rows) and r["records"]["by_format"] == {"messages": len(rows)}


def test_cli_writes_json_and_png_and_never_shows_pii(tmp_path, tiny_model_dir, capsys):
    rows = dirty_rows()
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    out, png = tmp_path / "report.json", tmp_path / "lengths.png"
    assert main(["data", "inspect", str(path), "--model", str(tiny_model_dir), "--max-length", "64",
                 "--json", str(out), "--plot", str(png), "--workers", "1"]) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert set(REQUIRED) <= set(report)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "exact duplicates: 1 groups" in text and "PII and secrets: 8 rows" in text
    for value in PLANTED.values():
        for line in value.splitlines():  # the private key's lines, one by one
            assert line not in text and line not in out.read_text()
    assert "[REDACTED_" in out.read_text()


def test_invalid_rows_stop_with_location_or_are_listed(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(chat("a", "b")) + "\n{not json\n" + json.dumps({"messages": []}) + "\n")
    assert main(["data", "inspect", str(path), "--model", str(tiny_model_dir), "--workers", "1"]) == 2
    assert f"{path}:2: malformed JSON" in capsys.readouterr().err
    r = inspect_file(str(path), opts(tiny_model_dir, skip_invalid=True)).report
    assert [x["where"] for x in r["invalid"]] == [f"{path}:2", f"{path}:3"]
    assert r["records"]["total"] == 1
    assert not list(tmp_path.glob("*.quarantine.jsonl"))  # inspecting writes nothing beside the data


def test_preference_rows_are_counted_and_measured(tmp_path, tiny_model_dir, tiny_tokenizer):
    tok = tiny_tokenizer
    row = {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "I think it is Lyon, maybe."}
    path = write_jsonl(tmp_path / "p.jsonl", [row, chat("Hi", "Hello")])
    r = inspect_file(str(path), opts(tiny_model_dir)).report
    user = [{"role": "user", "content": row["prompt"]}]

    def length(side):
        return ntok(tok, render(tok, user + [{"role": "assistant", "content": row[side]}]))

    pref = r["preference"]
    assert pref["rows"] == 1 and r["records"]["by_kind"] == {"preference": 1, "chat": 1}
    assert pref["prompt_chosen"]["max"] == length("chosen")
    assert pref["prompt_rejected"]["max"] == length("rejected")


def test_workers_give_the_same_audit_as_one_process(tiny_tokenizer):
    examples = [Example("chat", f"f:{i}", "messages", messages=chat(sentence(i % 300, 12), sentence(i, 8))["messages"])
                for i in range(700)]
    s = AuditSettings(max_length=40, num_perm=64)
    one, two = audit(examples, tiny_tokenizer, s, workers=1), audit(examples, tiny_tokenizer, s, workers=2)
    assert one.keys == two.keys and one.tokens == two.tokens and one.pii == two.pii
    assert (one.signatures == two.signatures).all()


# --- real data (skipped when ../shared/data is absent) -------------------------------------------

needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared datasets not present")


@needs_data
def test_real_self_instruct_seed_tasks(tiny_model_dir):
    path = SHARED_DATA / "self-instruct" / "seed_tasks.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    r = inspect_file(str(path), opts(tiny_model_dir, max_length=256)).report
    assert len(rows) == 175
    assert r["records"]["total"] == sum(len(x["instances"]) for x in rows)
    assert r["records"]["by_format"] == {"self_instruct": r["records"]["total"]}
    assert 0 < r["trained_token_fraction"] < 1 and 0 < r["truncated_fraction"] < 1  # tiny vocab: long rows


@needs_data
def test_real_fastchat_sharegpt(tiny_model_dir):
    path = SHARED_DATA / "fastchat" / "dummy_conversation.json"
    r = inspect_file(str(path), opts(tiny_model_dir, max_length=512)).report
    assert r["records"]["by_format"] == {"sharegpt": 500}
    assert set(REQUIRED) <= set(r)
