"""The benchmarks' like-for-like machinery (benchmarks/_same_steps.py): what makes a tunesmith row
and a TRL row train the same steps, and the check that stops a benchmark when they did not."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _same_steps as same  # noqa: E402

from tunesmith.config import load_config  # noqa: E402
from tunesmith.training.logging import read_metrics  # noqa: E402


def test_untrain_after_eos_drops_only_trained_targets_right_after_eos():
    eos = 2
    ids = torch.tensor([[5, 6, eos, 9, 0], [5, eos, 9, 7, eos]])
    labels = torch.tensor([[-100, 6, eos, 9, -100], [-100, -100, 9, 7, eos]])
    assert same.untrain_after_eos(ids, labels, eos, -100) == 2  # row 0 position 3, row 1 position 2
    assert labels.tolist() == [[-100, 6, eos, -100, -100], [-100, -100, -100, 7, eos]]
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    assert same.untrain_after_eos(ids[:1], mask, eos, 0) == 1 and mask.tolist() == [[0, 1, 1, 0, 0]]


def row(**kw):
    base = {"steps": 2, "losses": [1.0, 0.8], "mean_loss": 0.9, "tokens_fed": [3, 4, 5, 6], "tokens": 18,
            "fingerprint": "abc"}
    return {**base, **kw}


@pytest.mark.parametrize("change, problem", [
    ({}, None),
    ({"steps": 3}, "3 steps"),
    ({"tokens_fed": [4, 3, 5, 6]}, "first difference at item 0"),
    ({"tokens": 19}, "tokens differ"),
    ({"fingerprint": "abd"}, "fingerprint differ"),
    ({"losses": [1.01, 0.8]}, "step-1 losses differ"),
    ({"mean_loss": 0.93}, "mean losses over the epoch differ"),
])
def test_check_rows_names_each_way_rows_can_differ(change, problem):
    problems = same.check_rows({"a": row(), "b": row(**change)}, [3, 4, 5, 6], 2, 0.005, 0.02)
    assert (problems == []) if problem is None else any(problem in p for p in problems), problems


def test_follow_steps_gives_the_same_run_whatever_the_micro_batches(tiny_model_dir, order_data, tmp_path,
                                                                    monkeypatch):
    """parallel_examples 1 and 2 split a step of 8 into different micro-batches; with the benchmark's
    steps they train the same examples per step, from the same recorded initial weights."""
    import tunesmith.recipes.sft as sft
    import tunesmith.training.loop as loop

    order = [[15, 2, 9, 4, 11, 0, 6, 13], [1, 8, 3, 14, 5, 12, 7, 10]]
    runs = []
    for k in (1, 2):
        monkeypatch.setattr(loop, "epoch_batches", loop.epoch_batches)  # restored after the test
        monkeypatch.setattr(sft, "prepare_model", sft.prepare_model)
        seen = same.follow_steps(order)
        cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.train={order_data['train']}",
                                 f"run.output_dir={tmp_path / str(k)}", "run.name=r", "train.batch_size=8",
                                 "train.epochs=1", "train.lr=1e-2", "method.r=8", f"train.parallel_examples={k}"])
        run = sft.run_sft(cfg)
        losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
        runs.append((losses, seen, json.loads((run / "manifest.json").read_text())["tokens"]))
    (l1, s1, t1), (l2, s2, t2) = runs
    assert len(l1) == 2 and l1 == pytest.approx(l2, rel=1e-5)
    assert s1["fingerprint"] == s2["fingerprint"]
    assert s1["tokens_fed"] == s2["tokens_fed"] and len(s1["tokens_fed"]) == 16
    assert t1 == t2 == sum(s1["tokens_fed"])


def test_follow_steps_refuses_items_it_was_not_built_for(tiny_model_dir, order_data, tmp_path, monkeypatch):
    import tunesmith.recipes.sft as sft
    import tunesmith.training.loop as loop

    monkeypatch.setattr(loop, "epoch_batches", loop.epoch_batches)
    monkeypatch.setattr(sft, "prepare_model", sft.prepare_model)
    same.follow_steps([[0, 1, 2, 3]])  # 4 items; the data has 16
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.train={order_data['train']}",
                             f"run.output_dir={tmp_path}", "run.name=r", "train.batch_size=4", "method.r=8"])
    with pytest.raises(SystemExit, match="16 items"):
        sft.run_sft(cfg)
