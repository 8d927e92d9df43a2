"""The lm-eval harness runner, and agreement between lm-eval and tunesmith's own multiple choice."""
import math

import pytest

from conftest import SHARED_DATA, tiny_llama, write_jsonl
from tunesmith.config import EvalTaskSection
from tunesmith.errors import TunesmithError
from tunesmith.eval import multiple_choice as mc
from tunesmith.eval.mc_formats import load_items
from tunesmith.eval.results import read_results
from tunesmith.generation import InferenceModel

pytest.importorskip("lm_eval")
from tunesmith.eval.harness import local_task_yaml, run_harness  # noqa: E402

ARC = SHARED_DATA / "arc" / "ARC-Easy-test.jsonl"
needs_arc = pytest.mark.skipif(not ARC.is_file(), reason="shared ARC data absent")

COLOURS = ["red", "dark blue", "green", "a pale yellow", "black"]


def small_arc(path, n=9):
    rows = [{"id": f"c{i}", "question": f"Which colour is thing number {i}?",
             "choices": {"text": COLOURS[i % 2: i % 2 + 3 + i % 2], "label": list("ABCD"[: 3 + i % 2])},
             "answerKey": "ABC"[i % 3]} for i in range(n)]
    return write_jsonl(path, rows)


def lm_eval_task(yaml_path):
    from lm_eval.tasks import TaskManager

    return next(iter(TaskManager(include_defaults=False).load([str(yaml_path)])["tasks"].values()))


@needs_arc
def test_local_yaml_prompts_equal_ours_through_lm_eval_itself(tmp_path):
    """lm-eval's own task functions, run on the YAML we write, build exactly our prompts —
    zero-shot and with shots (lm-eval's shots are read back out of its context)."""
    task = lm_eval_task(local_task_yaml(ARC, tmp_path / "arc_local.yaml"))
    docs = list(task.test_docs())
    items, _ = load_items(ARC)
    by_question = {it.question: it for it in items}
    assert len(docs) == len(items) == 2376
    for i in [0, 7, 100, 2375]:
        doc, item = docs[i], items[i]
        assert task.fewshot_context(doc, 0) == item.text
        assert (task.doc_to_choice(doc), task.doc_to_target(doc)) == (item.choices, item.gold)
        task.set_fewshot_seed(i)
        theirs = task.fewshot_context(doc, 3)
        shots = [by_question[block.split("\n")[0].removeprefix("Question: ")] for block in theirs.split("\n\n")[:-1]]
        assert len(shots) == 3 and mc.build_context(item, shots) == theirs


@pytest.fixture(scope="module")
def tiny_im(tiny_tokenizer):
    return InferenceModel(tiny_llama(len(tiny_tokenizer), seed=11).eval(), tiny_tokenizer, "tiny")


def test_run_harness_agrees_with_tunesmith_and_writes_results(tmp_path, tiny_im):
    data = small_arc(tmp_path / "colours.jsonl")
    tasks_dir = tmp_path / "tasks"
    local_task_yaml(data, tasks_dir / "colours.yaml", task_name="colours_lm")
    results = run_harness(tiny_im, [str(tasks_dir)], tmp_path / "eval", batch_size=4)  # a directory of YAMLs
    harness = results["colours_lm"]
    ours = mc.evaluate(tiny_im, EvalTaskSection(name="colours", kind="multiple_choice", path=str(data), batch_size=3))
    assert harness.kind == "harness" and harness.n == ours.n == 9 and harness.primary == "acc"
    for theirs, mine in zip(sorted(harness.examples, key=lambda r: r["id"]), ours.examples):
        assert theirs["loglikelihoods"] == pytest.approx(mine["loglikelihoods"], abs=1e-4)
        assert (theirs["score"], theirs["score_norm"]) == (mine["score"], mine["score_norm"])
    assert len({r["prediction"] for r in ours.examples}) > 1  # not one constant answer
    assert harness.metrics["acc"] == pytest.approx(ours.metrics["acc"])
    assert harness.metrics["acc_norm"] == pytest.approx(ours.metrics["acc_norm"])
    p, n = harness.metrics["acc"], harness.n
    assert harness.metrics["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    saved = read_results(tmp_path / "eval")["colours_lm"]
    assert saved.metrics == harness.metrics and len(saved.examples) == 9


def test_harness_limit_and_bad_task_specs(tmp_path, tiny_im):
    yaml_path = local_task_yaml(small_arc(tmp_path / "c.jsonl"), tmp_path / "c.yaml", task_name="c_lm")
    assert run_harness(tiny_im, [str(yaml_path)], None, limit=4)["c_lm"].n == 4
    with pytest.raises(TunesmithError, match="task file not found"):
        run_harness(tiny_im, [str(tmp_path / "missing.yaml")], None)
    with pytest.raises(TunesmithError, match="data file not found"):
        local_task_yaml(tmp_path / "nope.jsonl", tmp_path / "n.yaml")
    gone = local_task_yaml(small_arc(tmp_path / "gone.jsonl"), tmp_path / "gone.yaml", task_name="gone_lm")
    (tmp_path / "gone.jsonl").unlink()
    with pytest.raises(TunesmithError, match=r"could not load the task in .*gone\.yaml"):
        run_harness(tiny_im, [str(gone)], None)


def test_named_hub_tasks_fail_offline_with_a_local_yaml_hint(tiny_im):
    with pytest.raises(TunesmithError, match=r"arc_easy.*dataset_path: json.*data_files"):
        run_harness(tiny_im, ["arc_easy"], None, limit=2)
    with pytest.raises(TunesmithError, match="unknown lm-eval task 'no_such_task_xyz'"):
        run_harness(tiny_im, ["no_such_task_xyz"], None, limit=2)


@pytest.mark.slow
@needs_arc
def test_embedded_model_arc_easy_same_predictions_as_lm_eval(tmp_path, embedded_model):
    """20 real ARC-Easy questions on SmolLM2: lm-eval and tunesmith pick the same answers."""
    from tunesmith.generation import load_for_inference

    im = load_for_inference(embedded_model.path)
    yaml_path = local_task_yaml(ARC, tmp_path / "arc_local.yaml")
    harness = run_harness(im, [str(yaml_path)], None, limit=20, batch_size=16)["arc_local"]
    ours = mc.evaluate(im, EvalTaskSection(name="arc", kind="multiple_choice", path=str(ARC), limit=20))
    theirs = sorted(harness.examples, key=lambda r: r["id"])
    assert [r["prediction"] for r in theirs] == [ours.examples[i]["loglikelihoods"].index(
        max(ours.examples[i]["loglikelihoods"])) for i in range(20)]
    diff = max(abs(a - b) for t, o in zip(theirs, ours.examples)
               for a, b in zip(t["loglikelihoods"], o["loglikelihoods"]))
    assert diff < 1e-3
    assert abs(harness.metrics["acc"] - ours.metrics["acc"]) < 0.005
    assert harness.metrics["acc_norm"] == pytest.approx(ours.metrics["acc_norm"])
