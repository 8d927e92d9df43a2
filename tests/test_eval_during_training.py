"""eval.during_training: tasks run on every checkpoint of a run, and a task metric picks the best one."""
import json

import pytest

from test_training import tiny_cfg
from tunesmith.errors import ConfigError
from tunesmith.eval.results import read_result
from tunesmith.recipes.sft import run_sft
from tunesmith.training.logging import read_metrics


def cfg_with_tasks(tiny_model_dir, order_data, out, *extra, **train):
    base = tiny_cfg(tiny_model_dir, order_data, out, **train)
    tasks = [{"name": "ppl", "kind": "perplexity", "path": str(order_data["validation"])},
             {"name": "orders", "kind": "generation", "path": str(order_data["validation"]), "max_new_tokens": 8,
              "metrics": ["exact_match", "json"], "json_fields": ["customer", "city"]}]
    data = base.model_dump(mode="json") | {"eval": {"tasks": tasks, "during_training": True}}
    return _with(data, extra)


def _with(data, extra):
    from tunesmith.config import apply_overrides, parse_config

    return parse_config(apply_overrides(data, list(extra)))


def test_tasks_run_on_every_checkpoint_and_are_logged(tiny_model_dir, order_data, tmp_path):
    run = run_sft(cfg_with_tasks(tiny_model_dir, order_data, tmp_path, "eval.during_training=true",
                                 max_steps=4, save_every=2))
    assert sorted(p.name for p in (run / "eval").iterdir() if p.is_dir()) == ["step-2", "step-4"]
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "eval/ppl/perplexity" in r]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:  # the logged numbers are the written results'
        step_result = read_result(run / "eval" / f"step-{r['step']}" / "ppl.json")
        assert r["eval/ppl/perplexity"] == pytest.approx(step_result.metrics["perplexity"], rel=1e-5)
        assert "eval/orders/exact_match" in r and "val_loss" in r
    # the run's own results are those of the saved (last) weights
    assert read_result(run / "eval" / "ppl.json").metrics == read_result(run / "eval" / "step-4" / "ppl.json").metrics
    assert read_result(run / "eval" / "orders.json").n == 4


def test_best_checkpoint_by_task_metric(tiny_model_dir, order_data, tmp_path):
    run = run_sft(cfg_with_tasks(tiny_model_dir, order_data, tmp_path, "eval.best_metric=ppl/perplexity",
                                 max_steps=6, save_every=1, restore_best="true", lr=0.05))
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "eval/ppl/perplexity" in r]
    best = min(rows, key=lambda r: r["eval/ppl/perplexity"])["step"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["best_step"] == best
    kept = read_result(run / "eval" / "ppl.json").metrics["perplexity"]
    assert kept == read_result(run / "eval" / f"step-{best}" / "ppl.json").metrics["perplexity"]


def test_best_metric_must_name_a_task(tiny_model_dir, order_data, tmp_path):
    with pytest.raises(ConfigError, match="no eval task named 'banking'"):
        run_sft(cfg_with_tasks(tiny_model_dir, order_data, tmp_path, "eval.best_metric=banking/accuracy",
                               max_steps=2, save_every=1))
    assert not any(p.name == "r1" for p in tmp_path.iterdir())
