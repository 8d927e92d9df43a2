"""compare: delta signs, the forgetting threshold, gates and exit codes, pairing rows by id, --reuse,
the HTML report (escaped text, embedded PNG) and atomic writes. No model runs: the evaluators are
replaced by a fake run_tasks that writes TaskResults the way tunesmith.eval.run does."""
from __future__ import annotations

import base64
import json
import os
import re

import pytest
import yaml

from tunesmith import cli
from tunesmith.config import EvalTaskSection
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.eval import compare as cmp
from tunesmith.eval import report
from tunesmith.eval.results import TaskResult, write_result


def result(task, metrics, primary, kind="generation", examples=()):
    return TaskResult(task=task, kind=kind, model="m", metrics=metrics, primary=primary, n=len(examples),
                      examples=list(examples))


def task(name, role="task", kind="generation", **kw):
    return EvalTaskSection(name=name, role=role, kind=kind, path=f"{name}.jsonl", **kw)


def one(t, base_metrics, tuned_metrics, primary, threshold=2.0, gates=None, kind="generation"):
    return cmp.compare_results({t.name: result(t.name, base_metrics, primary, kind)},
                               {t.name: result(t.name, tuned_metrics, primary, kind)}, [t], threshold, gates)


# ---- deltas and forgetting ------------------------------------------------------------------------

@pytest.mark.parametrize("metric,base,tuned,expected,unit", [
    ("accuracy", 0.50, 0.62, (0.62 - 0.50) * 100, "pp"),            # rates: percentage points
    ("exact_match", 0.9, 0.4, (0.4 - 0.9) * 100, "pp"),
    ("perplexity", 10.0, 8.0, (10.0 - 8.0) / 10.0 * 100, "%"),      # lower is better: improvement positive
    ("perplexity", 8.0, 10.0, (8.0 - 10.0) / 8.0 * 100, "%"),
    ("bits_per_byte", 0.8, 0.6, (0.8 - 0.6) / 0.8 * 100, "%"),      # lower-is-better even inside [0, 1]
    ("bleu", 20.0, 25.0, (25.0 - 20.0) / 20.0 * 100, "%"),          # unbounded higher-is-better: relative
    ("bleu", 0.0, 3.0, 3.0, "abs"),                                 # no relative change from 0
])
def test_delta_signs_and_units(metric, base, tuned, expected, unit):
    delta, got_unit = cmp.metric_delta(metric, base, tuned)
    assert got_unit == unit
    assert delta == pytest.approx(expected, abs=1e-9)
    # The convention: positive exactly when the tuned model is better.
    better = tuned > base if metric not in ("perplexity", "bits_per_byte") else tuned < base
    assert (delta > 0) == better


def test_missing_or_non_numeric_metric_has_no_delta():
    c = cmp.compare_results({"t": result("t", {"acc": 0.5, "only_base": 1.0}, "acc")},
                            {"t": result("t", {"acc": 0.7, "note": "x"}, "acc")}, [task("t")])
    d = {x.metric: x for x in c.tasks[0].deltas}
    assert d["acc"].delta == pytest.approx(20.0)
    assert d["only_base"].delta is None and d["only_base"].tuned is None
    assert d["note"].delta is None


def test_forgetting_flag_at_the_threshold_boundary():
    general = task("general", role="general")
    # (0.48 - 0.50) * 100 is -2.0000000000000018 in floats: exactly the threshold must not be flagged.
    assert not one(general, {"acc": 0.50}, {"acc": 0.48}, "acc").tasks[0].forgetting
    assert one(general, {"acc": 0.50}, {"acc": 0.4799}, "acc").tasks[0].forgetting
    assert one(general, {"acc": 0.50}, {"acc": 0.48}, "acc", threshold=1.0).tasks[0].forgetting
    # Only general tasks are checked, and only their primary metric.
    assert not one(task("ft"), {"acc": 0.9}, {"acc": 0.1}, "acc").tasks[0].forgetting
    assert not one(general, {"acc": 0.5, "f1": 0.9}, {"acc": 0.5, "f1": 0.1}, "acc").tasks[0].forgetting
    # Lower-is-better primary: perplexity 10 -> 10.2 is a 2% drop (allowed), 10 -> 10.3 a 3% drop.
    ppl = task("wiki", role="general", kind="perplexity")
    assert not one(ppl, {"perplexity": 10.0}, {"perplexity": 10.2}, "perplexity", kind="perplexity").forgetting
    c = one(ppl, {"perplexity": 10.0}, {"perplexity": 10.3}, "perplexity", kind="perplexity")
    assert c.forgetting == ["wiki"]
    assert not one(ppl, {"perplexity": 10.0}, {"perplexity": 7.0}, "perplexity", kind="perplexity").forgetting


# ---- gates ----------------------------------------------------------------------------------------

def test_gates_pass_fail_and_errors():
    t = task("qa")
    c = one(t, {"exact_match": 0.2, "rouge_l": 0.3}, {"exact_match": 0.3, "rouge_l": 0.29}, "exact_match",
            gates={"qa/exact_match": 10.0, "qa/rouge_l": -0.5})
    g = {x.gate: x for x in c.gates}
    assert g["qa/exact_match"].passed and g["qa/exact_match"].delta == pytest.approx(10.0)  # at the minimum: pass
    assert not g["qa/rouge_l"].passed                                                    # -1 pp < -0.5
    assert not c.gates_passed
    with pytest.raises(ConfigError, match=r"no task named 'qb'; tasks: qa"):
        one(t, {"exact_match": 0.2}, {"exact_match": 0.3}, "exact_match", gates={"qb/exact_match": 0})
    with pytest.raises(ConfigError, match=r"no metric 'acc'; its metrics: exact_match, rouge_l"):
        one(t, {"exact_match": 0.2, "rouge_l": 0.1}, {"exact_match": 0.3, "rouge_l": 0.1}, "exact_match",
            gates={"qa/acc": 0})


def test_parse_task_and_gate_flags():
    t = cmp.parse_task_flag("mmlu=multiple_choice:C:/data/mmlu:dev.jsonl")
    assert (t.name, t.kind, t.path, t.role) == ("mmlu", "multiple_choice", "C:/data/mmlu:dev.jsonl", "task")
    for bad, msg in [("mmlu", "NAME=KIND:PATH"), ("mmlu=data.jsonl", "NAME=KIND:PATH"),
                     ("x=classify:data.jsonl", "unknown kind 'classify'"), ("a/b=generation:d.jsonl", "slash"),
                     ("=generation:d.jsonl", "NAME=KIND:PATH")]:
        with pytest.raises(ConfigError, match=msg):
            cmp.parse_task_flag(bad)
    assert cmp.parse_gate_flag("qa/exact_match=-1.5") == ("qa/exact_match", -1.5)
    for bad in ("qa/exact_match", "qa=3", "qa/em=lots"):
        with pytest.raises(ConfigError, match="TASK/METRIC=MIN"):
            cmp.parse_gate_flag(bad)


# ---- per-example diffs ----------------------------------------------------------------------------

def row(i, pred, score, ref="r"):
    return {"id": i, "input": f"q{i}", "reference": ref, "prediction": pred, "score": score}


def test_example_diffs_pair_rows_by_id_not_position():
    base = result("t", {"acc": 0.5}, "acc", examples=[row(1, "x", 1.0), row(2, "y", 0.0), row(3, "z", 0.0),
                                                       row(4, "w", 1.0), row(6, "v", 0.0)])
    # Tuned rows in another order; id 2 missing, id 5 extra; id 3 same; id 6 same score, new prediction.
    tuned = result("t", {"acc": 0.5}, "acc", examples=[row(4, "w2", 0.0), row(6, "v2", 0.0), row(3, "z", 0.0),
                                                        row(5, "u", 1.0), row(1, "x", 1.0), row(7, "s", 1.0)])
    tuned.examples.insert(0, row(9, "p", 1.0))
    base.examples.append(row(9, "p", 0.0))
    diffs, counts = cmp.example_diffs("t", base, tuned)
    by_id = {d["id"]: d for d in diffs}
    assert set(by_id) == {4, 6, 9}                          # 1 and 3 agree exactly
    assert (by_id[4]["base"], by_id[4]["tuned"], by_id[4]["change"]) == ("w", "w2", "regressed")
    assert by_id[9]["change"] == "improved" and by_id[6]["change"] == "changed"
    assert [d["change"] for d in diffs] == ["regressed", "improved", "changed"]  # regressions first
    assert by_id[4]["input"] == "q4" and by_id[4]["reference"] == "r"
    assert counts == {"paired": 5, "only_base": 1, "only_tuned": 2, "improved": 1, "regressed": 1, "changed": 1}


def test_duplicate_example_id_is_an_error():
    base = result("t", {}, "acc", examples=[row(1, "a", 1.0), row(1, "b", 0.0)])
    with pytest.raises(TunesmithError, match="id '1' appears twice in the base results"):
        cmp.example_diffs("t", base, result("t", {}, "acc", examples=[row(1, "a", 1.0)]))


# ---- running both sides: fake evaluators, --reuse, the CLI ----------------------------------------

METRICS = {  # (spec, adapter) -> task -> metrics
    ("base-model", True): {"qa": {"exact_match": 0.20}, "general": {"acc": 0.60}},
    ("tuned-model", True): {"qa": {"exact_match": 0.55}, "general": {"acc": 0.55}},
}


@pytest.fixture
def fake_eval(monkeypatch):
    calls = []

    def run_tasks(spec, tasks, out_dir, adapter=True):
        calls.append((str(spec), adapter, [t.name for t in tasks]))
        table = METRICS[(os.path.basename(str(spec)) if os.path.isdir(spec) else str(spec), adapter)]
        out = {}
        for t in tasks:
            m = table[t.name]
            primary = next(iter(m))
            good = round(m[primary] * 10)
            rows = [row(i, f"<b>{spec}</b> & {i}" if i >= good else f"ans{i}", float(i < good), ref=f"ref<{i}>")
                    for i in range(10)]
            out[t.name] = result(t.name, m, primary, examples=rows)
            write_result(out_dir, out[t.name])
        return out

    monkeypatch.setattr(cmp, "run_tasks", run_tasks)
    return calls


def write_config(path, gates=None, threshold=2.0):
    path.write_text(yaml.safe_dump({"eval": {
        "tasks": [{"name": "qa", "kind": "generation", "path": "qa.jsonl"},
                  {"name": "general", "role": "general", "kind": "multiple_choice", "path": "mc.jsonl"}],
        "gates": gates or {}, "forgetting_threshold": threshold}}))
    return path


def test_cli_exit_codes_tables_and_outputs(tmp_path, fake_eval, capsys):
    cfg = write_config(tmp_path / "c.yaml", gates={"qa/exact_match": 30})
    out = tmp_path / "out"
    assert cli.main(["compare", "base-model", "tuned-model", "--config", str(cfg), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"qa\s+exact_match\s+20\.0%\s+55\.0%\s+\+35\.00 pp\s+primary, gate >= \+30: pass", printed)
    assert re.search(r"general\s+acc\s+60\.0%\s+55\.0%\s+-5\.00 pp\s+primary, FORGETTING", printed)
    assert [c[:2] for c in fake_eval] == [("base-model", True), ("tuned-model", True)]
    saved = json.loads((out / "compare.json").read_text())
    assert saved["forgetting"] == ["general"] and saved["gates_passed"] is True
    assert (out / "base" / "qa.json").is_file() and (out / "tuned" / "general.json").is_file()
    assert (out / "compare.html").is_file()

    # Forgetting fails the command only when asked to; a failed gate always does; a --gate overrides config.
    args = ["compare", "base-model", "tuned-model", "--config", str(cfg), "--out", str(out), "--reuse"]
    assert cli.main([*args, "--fail-on-forgetting"]) == 1
    assert cli.main([*args, "--threshold", "5"]) == 0                      # a 5-point drop is within 5
    assert cli.main([*args, "--fail-on-forgetting", "--threshold", "5"]) == 0
    assert cli.main([*args, "--gate", "qa/exact_match=36"]) == 1
    assert cli.main([*args, "--gate", "general/acc=-5"]) == 0
    capsys.readouterr()
    assert cli.main([*args, "--gate", "mmlu/acc=0"]) == 2
    assert "no task named 'mmlu'; tasks: qa, general" in capsys.readouterr().err
    assert cli.main([*args, "--gate", "qa/accuracy=0"]) == 2
    assert "task 'qa' has no metric 'accuracy'; its metrics: exact_match" in capsys.readouterr().err
    assert len(fake_eval) == 2  # every later call reused the first results


def test_task_flags_and_one_run_dir_form(tmp_path, fake_eval, monkeypatch):
    run = tmp_path / "tuned-model"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "manifest.json").write_text("{}")
    write_config(run / "config.yaml", gates={"qa/exact_match": 10})
    METRICS[("tuned-model", False)] = METRICS[("base-model", True)]
    try:
        # One run directory: its base model (adapter off) against it, tasks and gates from its config.yaml.
        assert cli.main(["compare", str(run)]) == 0
        assert [c[:2] for c in fake_eval] == [(str(run), False), (str(run), True)]
        assert fake_eval[0][2] == ["qa", "general"]
        saved = json.loads((run / "eval" / "compare" / "compare.json").read_text())
        assert saved["gates"][0]["gate"] == "qa/exact_match" and saved["base"].endswith("(base)")
        # --task flags alone: only the named tasks, none of the run config's tasks or gates.
        fake_eval.clear()
        assert cli.main(["compare", "base-model", str(run), "--task", "qa=generation:qa.jsonl",
                         "--out", str(tmp_path / "o2")]) == 0
        assert [c[2] for c in fake_eval] == [["qa"], ["qa"]]
    finally:
        del METRICS[("tuned-model", False)]
    with pytest.raises(ConfigError, match="no tasks"):
        cmp.compare("base-model", "tuned-model", [], tmp_path / "o3")
    with pytest.raises(ConfigError, match="repeated: qa"):
        cmp.compare("base-model", "tuned-model", [task("qa"), task("qa")], tmp_path / "o3")


def test_reuse_only_when_model_and_settings_match(tmp_path, fake_eval):
    tasks = [task("qa"), task("general", role="general")]
    out = tmp_path / "o"
    cmp.compare("base-model", "tuned-model", tasks, out, log=lambda m: None)
    assert len(fake_eval) == 2
    cmp.compare("base-model", "tuned-model", tasks, out, reuse=True, log=lambda m: None)
    assert len(fake_eval) == 2                                           # nothing re-run
    cmp.compare("base-model", "tuned-model", tasks, out, log=lambda m: None)
    assert len(fake_eval) == 4                                           # without --reuse: everything again
    changed = [task("qa", limit=5), tasks[1]]
    cmp.compare("base-model", "tuned-model", changed, out, reuse=True, log=lambda m: None)
    assert fake_eval[4:] == [("base-model", True, ["qa"]), ("tuned-model", True, ["qa"])]
    cmp.compare("base-model", "tuned-model", changed, out, reuse=True, log=lambda m: None)
    assert len(fake_eval) == 6                                           # the new settings are now on record
    METRICS[("other-model", True)] = METRICS[("tuned-model", True)]
    try:
        cmp.compare("base-model", "other-model", changed, out, reuse=True, log=lambda m: None)
    finally:
        del METRICS[("other-model", True)]
    assert fake_eval[6:] == [("other-model", True, ["qa", "general"])]  # another model: its side re-runs
    # The data itself is part of the settings: an edited test file is evaluated again.
    data = tmp_path / "qa.jsonl"
    data.write_text('{"text": "one"}\n')
    on_file = [EvalTaskSection(name="qa", kind="generation", path=str(data))]
    cmp.compare("base-model", "tuned-model", on_file, out, reuse=True, log=lambda m: None)
    cmp.compare("base-model", "tuned-model", on_file, out, reuse=True, log=lambda m: None)
    assert len(fake_eval) == 9
    data.write_text('{"text": "two"}\n')
    cmp.compare("base-model", "tuned-model", on_file, out, reuse=True, log=lambda m: None)
    assert len(fake_eval) == 11


def test_a_crash_midway_does_not_leave_stale_settings_on_record(tmp_path, fake_eval, monkeypatch):
    tasks = [task("qa")]
    out = tmp_path / "o"
    cmp.compare("base-model", "tuned-model", tasks, out, log=lambda m: None)
    good = cmp.run_tasks

    def crashing(spec, ts, out_dir, adapter=True):
        good(spec, ts, out_dir, adapter)  # writes the new results, then fails before returning
        raise RuntimeError("evaluator crashed")

    monkeypatch.setattr(cmp, "run_tasks", crashing)
    with pytest.raises(RuntimeError):
        cmp.compare("base-model", "tuned-model", [task("qa", limit=3)], out, reuse=True, log=lambda m: None)
    monkeypatch.setattr(cmp, "run_tasks", good)
    n = len(fake_eval)
    cmp.compare("base-model", "tuned-model", tasks, out, reuse=True, log=lambda m: None)
    assert len(fake_eval) == n + 1  # qa's file may be from limit=3 now, so it is not reused


# ---- HTML ----------------------------------------------------------------------------------------

def html_comparison(n_diffs=30):
    base_rows = [row(i, f"<script>alert({i})</script> & co", 1.0, ref=f'"quoted" <ref {i}>') for i in range(n_diffs)]
    tuned_rows = [row(i, f"tuned <i>{i}</i>", 0.0 if i % 2 else 1.0, ref=f'"quoted" <ref {i}>')
                  for i in range(n_diffs)]
    return cmp.compare_results(
        {"qa": result("qa", {"exact_match": 0.2}, "exact_match", examples=base_rows),
         "general": result("general", {"acc": 0.6}, "acc"),
         "wiki": result("wiki", {"perplexity": 12.0, "nll": 2.48}, "perplexity", kind="perplexity")},
        {"qa": result("qa", {"exact_match": 0.55}, "exact_match", examples=tuned_rows),
         "general": result("general", {"acc": 0.5}, "acc"),
         "wiki": result("wiki", {"perplexity": 9.0, "nll": 2.2}, "perplexity", kind="perplexity")},
        [task("qa"), task("general", role="general"), task("wiki", role="general", kind="perplexity")],
        gates={"qa/exact_match": 40})


def test_html_report_escapes_text_embeds_pngs_and_caps_diffs(tmp_path):
    path = report.write_html(html_comparison(), tmp_path / "r.html", cap=5)
    text = path.read_text(encoding="utf-8")
    assert "<script>alert" not in text and "<i>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in text  # id 1 regressed: shown first
    assert "tuned &lt;i&gt;1&lt;/i&gt;" in text and "&quot;quoted&quot; &lt;ref 1&gt;" in text
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(pngs) == 2 and all(base64.b64decode(p).startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    assert "src=\"http" not in text and "<link" not in text          # self-contained
    # 30 rows differ in prediction; 5 shown, the rest counted.
    assert text.count("&lt;script&gt;alert(") == 5 and "and 25 more" in text
    assert re.search(r'class="verdict bad" id="forgetting">Forgetting flagged on general', text)
    assert re.search(r"qa/exact_match</td><td class=\"num\">\+40</td><td class=\"num\">\+35\.00 pp</td>"
                     r"<td class=\"neg\">FAIL", text)
    assert re.search(r'<tr class="primary"><td>wiki</td>.*?\+25\.00 %', text)  # 12 -> 9 is +25% better


def test_html_write_is_atomic(tmp_path, monkeypatch):
    c = html_comparison(3)
    target = tmp_path / "r.html"

    def broken_plot(_):
        raise RuntimeError("plotting failed")

    with monkeypatch.context() as m:
        m.setattr(report, "plot_deltas", broken_plot)
        with pytest.raises(RuntimeError):
            report.write_html(c, target)
    assert list(tmp_path.iterdir()) == []

    def broken_replace(src, dst):
        raise OSError("disk full")

    report.write_html(c, target)
    before = target.read_bytes()
    with monkeypatch.context() as m:
        m.setattr(os, "replace", broken_replace)
        with pytest.raises(OSError):
            report.write_html(html_comparison(4), target)
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"] and target.read_bytes() == before


# ---- the real evaluators on two tiny random models ----------------------------------------------

def test_compare_with_the_real_evaluators(tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch, capsys):
    from conftest import tiny_llama, write_jsonl

    other = tmp_path / "tiny-other"
    tiny_llama(len(tiny_tokenizer), seed=1).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    rows = [{"messages": [{"role": "user", "content": f"Order {i}: {i} mugs"},
                          {"role": "assistant", "content": f"{i} mugs"}]} for i in range(5)]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    out = tmp_path / "out"
    args = ["compare", str(tiny_model_dir), str(other), "--out", str(out), "--task", f"qa=generation:{data}",
            "--task", f"ppl=perplexity:{data}"]
    assert cli.main([*args, "--gate", "ppl/perplexity=-1000"]) == 0
    saved = json.loads((out / "compare.json").read_text())
    for name in ("qa", "ppl"):
        b = json.loads((out / "base" / f"{name}.json").read_text())
        t = json.loads((out / "tuned" / f"{name}.json").read_text())
        entry = next(x for x in saved["tasks"] if x["task"] == name)
        for d in entry["deltas"]:
            want, _ = cmp.metric_delta(d["metric"], b["metrics"][d["metric"]], t["metrics"][d["metric"]])
            assert d["delta"] == want
        differ = {rb["id"] for rb, rt in zip(b["examples"], t["examples"])
                  if (rb.get("prediction"), rb.get("score")) != (rt.get("prediction"), rt.get("score"))}
        assert {x["id"] for x in entry["diffs"]} == differ and entry["counts"]["paired"] == 5
        # each side's speed, as its results file has it, in compare.json and in the printed table
        assert entry["speed"] == {"base": b["speed"], "tuned": t["speed"]} and b["speed"]["examples_per_s"] > 0
    qa_speed = next(x for x in saved["tasks"] if x["task"] == "qa")["speed"]
    assert qa_speed["base"]["generated_tokens"] > 0 and qa_speed["tuned"]["tokens_per_s"] > 0
    printed = capsys.readouterr().out
    assert f"qa speed: base {qa_speed['base']['examples_per_s']:.2f} examples/s" in printed
    ppl = next(x for x in saved["tasks"] if x["task"] == "ppl")
    b_ppl = json.loads((out / "base" / "ppl.json").read_text())["metrics"]["perplexity"]
    t_ppl = json.loads((out / "tuned" / "ppl.json").read_text())["metrics"]["perplexity"]
    assert ppl["primary"] == "perplexity" and b_ppl != t_ppl
    assert (next(d for d in ppl["deltas"] if d["metric"] == "perplexity")["delta"] > 0) == (t_ppl < b_ppl)

    def must_not_run(*a, **k):
        raise AssertionError("--reuse should have read the results back")

    monkeypatch.setattr(cmp, "run_tasks", must_not_run)
    assert cli.main([*args, "--reuse"]) == 0
