"""runs list/show/compare read run directories; trackers write what metrics.jsonl holds."""
import json

import pytest

from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.recipes.sft import run_sft
from tunesmith.training.logging import read_metrics


@pytest.fixture(scope="module")
def two_runs(tiny_model_dir, tmp_path_factory):
    from conftest import write_jsonl
    from tunesmith.demo.orders import make_splits

    tmp = tmp_path_factory.mktemp("runs")
    train = write_jsonl(tmp / "train.jsonl", make_splits(9, {"train": 8})["train"])
    runs = []
    for name, lr in (("a", "1e-2"), ("b", "1e-3")):
        cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.train={train}",
                                 f"run.output_dir={tmp / 'runs'}", f"run.name={name}", "train.max_steps=3",
                                 f"train.lr={lr}", "train.batch_size=4"])
        runs.append(run_sft(cfg))
    return runs


def test_runs_list_show_compare(two_runs, capsys, tmp_path):
    root = two_runs[0].parent
    (root / ".c.incomplete-1").mkdir()  # staging folders are not runs
    assert main(["runs", "list", "--dir", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["name", "kind", "model"] and [ln.split()[0] for ln in out[1:]] == ["a", "b"]
    assert main(["runs", "show", str(two_runs[0])]) == 0
    shown = capsys.readouterr().out
    assert "manifest.json" in shown and "adapter" in shown and '"torch"' in shown
    plot = tmp_path / "cmp.png"
    assert main(["runs", "compare", *map(str, two_runs), "--plot", str(plot)]) == 0
    cmp = capsys.readouterr().out
    assert "config differences" in cmp and "train.lr" in cmp and "run.name" not in cmp.split("config differences")[1]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert main(["runs", "show", str(tmp_path)]) == 2  # not a run: a clear error, exit 2


def test_trackers_receive_the_metrics(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from conftest import write_jsonl
    from tunesmith.demo.orders import make_splits

    train = write_jsonl(tmp_path / "train.jsonl", make_splits(10, {"train": 8})["train"])
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.train={train}", f"run.output_dir={tmp_path}",
                             "run.name=t", "train.max_steps=3", "train.batch_size=4",
                             "train.trackers=[tensorboard, mlflow, wandb]"])
    run = run_sft(cfg)
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [round(e.value, 5) for e in acc.Scalars("loss")] == [round(x, 5) for x in losses]

    mlflow.set_tracking_uri(f"sqlite:///{run / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient()
    (mrun,) = client.search_runs([client.get_experiment_by_name("tunesmith").experiment_id])
    assert [m.value for m in client.get_metric_history(mrun.info.run_id, "loss")] == pytest.approx(losses)
    assert mrun.data.params["train.lr"] == str(cfg.train.lr)

    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0
    assert json.loads((run / "manifest.json").read_text())["steps"] == 3
