import csv
import json
import math
from types import SimpleNamespace

import pytest
import yaml

from conftest import SHARED_DATA, write_jsonl
from tunesmith.cli import main
from tunesmith.config import EvalTaskSection, load_config
from tunesmith.errors import DataError
from tunesmith.eval import tasks as tasks_mod
from tunesmith.eval.metrics import Context, score
from tunesmith.eval.results import read_result
from tunesmith.eval.tasks import evaluate, select
from tunesmith.eval.answer_end import json_end, line_end
from tunesmith.generation import cut_answer, generate, load_for_inference

BANKING = SHARED_DATA / "banking77"
FAKE_IM = SimpleNamespace(label="fake")  # with tasks.generate replaced, no model is needed


def chat(user: str, reply: str, system: str | None = None) -> dict:
    head = [{"role": "system", "content": system}] if system else []
    return {"messages": head + [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


@pytest.fixture(scope="module")
def im(tiny_model_dir):
    return load_for_inference(str(tiny_model_dir))


def fake_generate(monkeypatch, replies: dict[str, str]):
    """tasks.generate answering each prompt's last user message from `replies`; records its calls."""
    calls = []

    def fake(im, conversations, max_new_tokens, batch_size, temperature, top_p, seed=0, stop=(), end_at=None,
             stats=None):
        calls.append({"conversations": conversations, "max_new_tokens": max_new_tokens, "stop": stop,
                      "temperature": temperature, "seed": seed, "batch_size": batch_size, "end_at": end_at})
        return [cut_answer(replies[c[-1]["content"]], stop, end_at).strip() for c in conversations]

    monkeypatch.setattr(tasks_mod, "generate", fake)
    return calls


def test_select_limit_and_seeded_sample():
    t = EvalTaskSection(name="t", kind="generation", path="x")
    assert select(5, t) == [0, 1, 2, 3, 4]
    assert select(5, t.model_copy(update={"limit": 2})) == [0, 1]
    s = select(100, t.model_copy(update={"sample": 10, "seed": 3}))
    assert len(s) == 10 and s == sorted(s) and s == select(100, t.model_copy(update={"sample": 10, "seed": 3}))
    assert s != select(100, t.model_copy(update={"sample": 10, "seed": 4}))


def test_prompt_reference_rows_and_exact_match_on_the_model(im, tmp_path):
    rows = [chat("Order 2 mugs", "x"), chat("Hello there", "y"), chat("Deliver to Lyon", "z"),
            chat("What is the capital of France?", "w")]
    prompts = [r["messages"][:-1] for r in rows]
    preds = generate(im, prompts, max_new_tokens=8)
    for k in (0, 2):  # two references are exactly what the model says
        rows[k]["messages"][-1]["content"] = preds[k]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    res = evaluate(im, EvalTaskSection(name="qa", kind="generation", path=str(path), max_new_tokens=8,
                                       metrics=["exact_match", "rouge_l"], batch_size=3))
    assert [r["prediction"] for r in res.examples] == preds
    assert [r["id"] for r in res.examples] == [0, 1, 2, 3]
    assert [r["input"] for r in res.examples] == [r["messages"][0]["content"] for r in rows]
    assert [r["score"] for r in res.examples] == [1.0, float(preds[1] == "y"), 1.0, float(preds[3] == "w")]
    assert res.metrics["exact_match"] == sum(r["score"] for r in res.examples) / 4
    assert res.primary == "exact_match" and res.model == im.label and res.n == 4
    assert res.settings["records"] == 4 and res.settings["max_new_tokens"] == 8


def test_label_task_metrics_through_evaluate(monkeypatch, tmp_path):
    from sklearn.metrics import f1_score

    labels = ["card_arrival", "lost_card", "refund"]
    truth = ["card_arrival", "lost_card", "refund", "refund", "card_arrival", "lost_card"]
    said = ["Card_Arrival", "refund", "refund", "no idea", "card_arrival", "lost_card."]
    rows = [chat(f"q{k}", t) for k, t in enumerate(truth)]
    path = write_jsonl(tmp_path / "intents.jsonl", rows)
    calls = fake_generate(monkeypatch, {f"q{k}": s for k, s in enumerate(said)})
    t = EvalTaskSection(name="intents", kind="generation", path=str(path), metrics=["macro_f1", "accuracy"],
                        labels=labels, stop=["\n"], max_new_tokens=5, system_prompt="Answer with the intent.")
    res = evaluate(FAKE_IM, t)
    assert calls[0]["stop"] == ["\n"] and calls[0]["max_new_tokens"] == 5
    assert calls[0]["end_at"] is line_end and res.settings["answer_end"] == "line"  # auto, from the label metrics
    assert calls[0]["conversations"][0][0] == {"role": "system", "content": "Answer with the intent."}
    assert res.metrics["accuracy"] == pytest.approx(4 / 6)
    mapped = ["card_arrival", "refund", "refund", "<other>", "card_arrival", "lost_card"]
    assert res.metrics["macro_f1"] == pytest.approx(f1_score(truth, mapped, labels=labels, average="macro"))
    assert res.primary == "macro_f1"
    assert [r["score"] for r in res.examples] == [1, 0, 1, 0, 1, 1]


def test_bad_references_stop_before_generating(monkeypatch, tmp_path):
    fake_generate(monkeypatch, {})  # any call would raise KeyError
    path = write_jsonl(tmp_path / "d.jsonl", [chat("a", "refund"), chat("b", "typo_label")])
    t = EvalTaskSection(name="l", kind="generation", path=str(path), metrics=["accuracy"], labels=["refund"])
    with pytest.raises(DataError, match=r"d.jsonl:2.*'typo_label' is not one of"):
        evaluate(None, t)
    t = EvalTaskSection(name="j", kind="generation", path=str(path), metrics=["json"])
    with pytest.raises(DataError, match=r"d.jsonl:1.*not a JSON object"):
        evaluate(None, t)
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "just text"}])
    with pytest.raises(DataError, match="no reply to compare with"):
        evaluate(None, EvalTaskSection(name="x", kind="generation", path=str(text)))


def test_json_task_primary_is_field_accuracy(monkeypatch, tmp_path):
    ref = {"city": "Oslo", "item": "mug"}
    path = write_jsonl(tmp_path / "j.jsonl", [chat("a", json.dumps(ref)), chat("b", json.dumps(ref))])
    calls = fake_generate(monkeypatch, {"a": json.dumps(ref), "b": '{"city": "Oslo", "item": "cup"} I hope it helps'})
    res = evaluate(FAKE_IM,
                   EvalTaskSection(name="j", kind="generation", path=str(path), metrics=["json"]))
    assert calls[0]["end_at"] is json_end and res.settings["answer_end"] == "json"  # the answer ends at its "}"
    assert res.primary == "field_accuracy"
    assert res.metrics == {"field_accuracy": 0.75, "json_exact_match": 0.5, "json_valid": 1.0}
    assert [r["score"] for r in res.examples] == [1.0, 0.5]
    assert res.settings["json_fields"] == ["city", "item"]


@pytest.mark.skipif(not BANKING.is_dir(), reason="needs ../shared/data/banking77")
def test_banking77_csv_through_the_pipeline(monkeypatch):
    with open(BANKING / "test.csv", newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    fake_generate(monkeypatch, {r["text"]: "card_arrival" for r in table})
    labels = json.loads((BANKING / "categories.json").read_text())
    t = EvalTaskSection(name="banking77", kind="generation", path=str(BANKING / "test.csv"), sample=12, seed=1,
                        columns={"instruction": "text", "output": "category"}, labels=labels,
                        metrics=["accuracy", "macro_f1"])
    res = evaluate(FAKE_IM, t)
    assert res.settings["records"] == len(table) == 3080 and res.n == 12
    for row in res.examples:
        assert (row["input"], row["reference"]) == (table[row["id"]]["text"], table[row["id"]]["category"])
        assert row["score"] == float(row["reference"] == "card_arrival")
    assert res.metrics["accuracy"] == pytest.approx(sum(r["score"] for r in res.examples) / 12)


# ---- the command ---------------------------------------------------------------------------------

def recomputed(result) -> dict:
    rows = result.examples
    metrics = result.settings["metrics"]
    return score(metrics, [r["prediction"] for r in rows], [r["reference"] for r in rows],
                 Context(labels=result.settings["labels"], json_fields=result.settings["json_fields"])).corpus


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    from tunesmith.demo.orders import make_splits

    tmp = tmp_path_factory.mktemp("evaldata")
    splits = make_splits(11, {"train": 8, "test": 5})
    return {"train": write_jsonl(tmp / "train.jsonl", splits["train"]),
            "test": write_jsonl(tmp / "test.jsonl", splits["test"]), "dir": tmp}


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, eval_data):
    from tunesmith.recipes.sft import run_sft

    cfg_path = eval_data["dir"] / "train.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_model_dir)}, "data": {"train": str(eval_data["train"])},
        "train": {"max_steps": 3, "lr": 5e-2, "batch_size": 4},
        "run": {"name": "ev", "output_dir": str(eval_data["dir"])},
        "eval": {"tasks": [{"name": "orders", "kind": "generation", "path": str(eval_data["test"]),
                            "metrics": ["json", "exact_match"], "max_new_tokens": 12}]}}))
    return run_sft(load_config(cfg_path))


def test_eval_command_on_a_model_dir_writes_results(tiny_model_dir, eval_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", str(tiny_model_dir), "--task", f"qa=generation:{eval_data['test']}",
                 "--task", f"ppl=perplexity:{eval_data['test']}", "--metrics", "normalized_match", "chrf",
                 "--limit", "3", "--out", str(out)]) == 0
    qa, ppl = read_result(out / "qa.json"), read_result(out / "ppl.json")
    assert qa.n == 3 and qa.primary == "normalized_match" and qa.kind == "generation"
    assert qa.metrics == pytest.approx(recomputed(qa))
    rows = [json.loads(x) for x in eval_data["test"].read_text().splitlines()][:3]
    im = load_for_inference(str(tiny_model_dir))
    assert [r["prediction"] for r in qa.examples] == generate(im, [r["messages"][:-1] for r in rows],
                                                              max_new_tokens=64)
    assert ppl.n == 3 and ppl.primary == "perplexity"
    nll = sum(r["nll"] * r["tokens"] for r in ppl.examples) / sum(r["tokens"] for r in ppl.examples)
    assert ppl.metrics["perplexity"] == pytest.approx(math.exp(nll))
    printed = capsys.readouterr().out
    assert "examples/s" in printed and "normalized_match" in printed and "perplexity" in printed


def test_eval_command_on_a_run_uses_its_config_and_writes_into_the_run(tiny_run, capsys):
    assert main(["eval", str(tiny_run), "--limit", "4"]) == 0
    tuned = read_result(tiny_run / "eval" / "orders.json")
    assert tuned.model == tiny_run.name and tuned.n == 4 and tuned.primary == "field_accuracy"
    assert tuned.metrics == pytest.approx(recomputed(tuned))
    assert set(tuned.metrics) == {"field_accuracy", "json_exact_match", "json_valid", "exact_match"}
    assert main(["eval", str(tiny_run), "--no-adapter", "--limit", "4"]) == 0
    base = read_result(tiny_run / "eval" / "base" / "orders.json")
    assert base.model != tuned.model
    assert [r["prediction"] for r in base.examples] != [r["prediction"] for r in tuned.examples]


def test_eval_command_errors_are_clear(tiny_model_dir, eval_data, tmp_path, capsys):
    assert main(["eval", str(tiny_model_dir), "--task", f"qa=generation:{eval_data['test']}"]) == 2
    assert "pass --out DIR" in capsys.readouterr().err
    assert main(["eval", str(tiny_model_dir), "--out", str(tmp_path)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", str(tiny_model_dir), "--task", "qa:generation", "--out", str(tmp_path)]) == 2
    assert "NAME=KIND:PATH" in capsys.readouterr().err
    assert main(["eval", str(tiny_model_dir), "--task", "qa=generaton:x.jsonl", "--out", str(tmp_path)]) == 2
    assert "kind" in capsys.readouterr().err
    assert main(["eval", str(tiny_model_dir), "--task", f"qa=generation:{tmp_path}/missing.jsonl",
                 "--out", str(tmp_path)]) == 2
    assert "data not found" in capsys.readouterr().err


def test_harness_flag_calls_run_harness_with_the_loaded_model(tiny_model_dir, tmp_path, monkeypatch):
    import tunesmith.eval.harness as harness

    calls = []
    monkeypatch.setattr(harness, "run_harness", lambda im, tasks, out, limit: calls.append((im, tasks, out, limit)))
    assert main(["eval", str(tiny_model_dir), "--harness", "arc_easy, hellaswag", "--harness-limit", "5",
                 "--out", str(tmp_path)]) == 0
    (im, tasks, out, limit), = calls
    assert tasks == ["arc_easy", "hellaswag"] and out == tmp_path and limit == 5
    assert im.label == load_for_inference(str(tiny_model_dir)).label
