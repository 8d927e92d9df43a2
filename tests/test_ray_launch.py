"""launcher: ray. Slow: the same config trained by 2 Ray Train workers (CPU, gloo) gives the
1-process run's losses and adapter in one run directory. Fast: what the driver does before and
after Ray (missing package, arguments, resources, how a worker's failure is reported)."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tokenizer, tiny_llama, write_jsonl
from tunesmith.demo.orders import make_splits
from tunesmith.errors import ConfigError
from tunesmith.training.distributed import ray_launch
from tunesmith.training.distributed.group import DistributedError
from tunesmith.training.distributed.launch import LAUNCHERS, threads_per_rank

SRC = str(Path(__file__).resolve().parents[1] / "src")


def write_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: {name: model}\n"
                   "data: {train: train.jsonl, validation: val.jsonl}\n"
                   "method: {name: lora, r: 4, dropout: 0.0}\n"
                   "train: {max_steps: 3, batch_size: 4, lr: 0.01, save_every: 2}\n"
                   "run: {output_dir: runs}\n")
    return cfg


def tiny_project(tmp_path: Path) -> Path:
    """Model, data and a config whose paths are relative: the workers must resolve them from the
    command's directory, not Ray's."""
    tok = build_tokenizer()
    tiny_llama(len(tok)).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    write_jsonl(tmp_path / "train.jsonl", make_splits(7, {"train": 16})["train"])
    write_jsonl(tmp_path / "val.jsonl", make_splits(8, {"train": 4})["train"])
    return write_config(tmp_path)


def tunesmith(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC, "RAY_ADDRESS": "local"}  # never a cluster
    return subprocess.run([sys.executable, "-m", "tunesmith", "train", "cfg.yaml", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)


def losses(run: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.mark.slow
def test_two_ray_workers_train_the_one_process_run(tmp_path):
    pytest.importorskip("ray.train.torch")
    tiny_project(tmp_path)
    one = tunesmith(tmp_path, "run.name=one")
    assert one.returncode == 0, one.stderr
    ray = tunesmith(tmp_path, "run.name=ray", "train.distributed.launcher=ray", "train.distributed.workers=2")
    assert ray.returncode == 0, ray.stdout + ray.stderr
    assert "starting 2 Ray Train workers" in ray.stdout
    assert ray.stdout.count("step     3/3  loss") == 1  # rank 0's progress only

    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["one", "ray"]  # no staging or Ray files left
    assert sorted(p.name for p in (runs / "ray").iterdir()) == sorted(p.name for p in (runs / "one").iterdir())
    got, want = losses(runs / "ray"), losses(runs / "one")
    assert [s for s, _ in got] == [s for s, _ in want] and len(want) >= 3
    assert [l for _, l in got] == pytest.approx([l for _, l in want], rel=1e-4)
    a = load_file(runs / "ray" / "adapter" / "adapter_model.safetensors")
    b = load_file(runs / "one" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for k in b:
        # Adam's first steps move near-zero weights by ~lr whatever the gradient's size: atol
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)
    # nothing of Ray's in the command's directory either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml", "model", "runs", "train.jsonl", "val.jsonl"]


def test_launcher_registry_points_at_run_ray():
    module, fn = LAUNCHERS["ray"].split(":")
    assert module == ray_launch.__name__ and getattr(ray_launch, fn) is ray_launch.run_ray


def test_missing_ray_names_the_extra(tmp_path, monkeypatch):
    for name in ("ray", "ray.train", "ray.train.torch"):
        monkeypatch.setitem(sys.modules, name, None)  # `import ray` raises ImportError
    cfg = write_config(tmp_path)
    with pytest.raises(DistributedError, match=r"pip install 'tunesmith\[ray\]'.*launcher=torchrun"):
        ray_launch.run_ray(["train", str(cfg), "train.distributed.launcher=ray"], 2)


def test_arguments_are_checked_before_ray_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(ray_launch, "import_ray", lambda: pytest.fail("Ray was imported"))
    cfg = write_config(tmp_path)
    with pytest.raises(DistributedError, match="at least 1 worker"):
        ray_launch.run_ray(["train", str(cfg)], 0)
    with pytest.raises(DistributedError, match="runs `tunesmith train`, not `tunesmith runs`"):
        ray_launch.run_ray(["runs", "list"], 2)
    with pytest.raises(ConfigError):  # the config's own errors, as without Ray
        ray_launch.run_ray(["train", str(cfg), "train.distributed.launcher=slurm"], 2)


def test_ray_client_address_is_refused(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with pytest.raises(DistributedError, match="Ray Client address: run tunesmith on a node of the cluster"):
        ray_launch.connect(object(), 2)


def test_worker_resources():
    assert ray_launch.worker_resources({"CPU": 64.0}, 2, local=True) == (False, threads_per_rank(2))
    assert ray_launch.worker_resources({"CPU": 64.0}, 2, local=False) == (False, 1)
    assert ray_launch.worker_resources({"CPU": 8.0, "GPU": 4.0}, 4, local=True) == (True, 1)
    with pytest.raises(DistributedError, match="has 2 GPU\\(s\\).*at most 2 workers"):
        ray_launch.worker_resources({"GPU": 2.0}, 4, local=True)


def test_worker_resources_on_a_cluster_waits_with_a_note(capsys):
    assert ray_launch.worker_resources({"GPU": 2.0}, 4, local=False) == (True, 1)
    assert "Ray waits until it has enough" in capsys.readouterr().out


def test_forwarded_env(monkeypatch):
    monkeypatch.setenv("TUNESMITH_LOG_ALL_RANKS", "1")
    monkeypatch.setenv("PYTHONPATH", "/somewhere/only/here")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = ray_launch.forwarded_env(3)
    assert env["TUNESMITH_LOG_ALL_RANKS"] == "1" and env["OMP_NUM_THREADS"] == "3"
    assert env["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0" and "PYTHONPATH" not in env


class FakeWorkerGroupError(Exception):
    def __init__(self, failures):
        super().__init__("Training failed due to worker errors")
        self.worker_failures = failures


class Wrapped(Exception):  # how Ray may hand an exception back: with the worker's inside
    def __init__(self, cause):
        super().__init__("wrapped")
        self.cause = cause


def test_a_tunesmith_error_in_a_worker_comes_back_naming_its_rank(capsys):
    err = ConfigError("data.train: file x.jsonl does not exist")
    err.__notes__ = ["the staging folder was removed"]
    failure = ray_launch.as_rank_failure(1, err)
    assert failure.trace == ""
    failure = pickle.loads(pickle.dumps(failure))  # Ray pickles it from worker to driver
    message = ray_launch.describe(FakeWorkerGroupError({3: ray_launch.RankFailed(3, "later"), 1: Wrapped(failure)}))
    assert message.startswith("Ray worker rank 1 failed (ranks [3] failed too): data.train: file x.jsonl does not "
                              "exist\nthe staging folder was removed.")
    assert "--resume" in message and capsys.readouterr().err == ""


def test_another_error_in_a_worker_comes_back_with_its_traceback(capsys):
    def fail():
        raise ValueError("bad shape")

    try:
        fail()
    except ValueError as exc:
        failure = ray_launch.as_rank_failure(0, exc)
    message = ray_launch.describe(FakeWorkerGroupError({0: failure}))
    assert message.startswith("Ray worker rank 0 failed: ValueError: bad shape.")
    err = capsys.readouterr().err
    assert "Traceback" in err and "in fail" in err


def test_a_worker_that_died_and_a_failed_controller():
    died = ray_launch.describe(FakeWorkerGroupError({2: RuntimeError("The actor died unexpectedly")}))
    assert died.startswith("Ray worker rank 2 failed: RuntimeError: The actor died unexpectedly.")
    assert ray_launch.describe(RuntimeError("no placement")) == "the Ray Train run failed: no placement"


def test_other_ranks_print_nothing_unless_asked(capsys, monkeypatch):
    monkeypatch.delenv("TUNESMITH_LOG_ALL_RANKS", raising=False)
    with ray_launch.quiet_unless_main(1):
        print("rank 1 progress")
    with ray_launch.quiet_unless_main(0):
        print("rank 0 progress")
    monkeypatch.setenv("TUNESMITH_LOG_ALL_RANKS", "1")
    with ray_launch.quiet_unless_main(1):
        print("rank 1 when asked")
    assert capsys.readouterr().out == "rank 0 progress\nrank 1 when asked\n"


def test_a_worker_without_the_command_directory_says_shared_filesystem(tmp_path):
    with pytest.raises(DistributedError, match="does not exist on node .*shared filesystem"):
        ray_launch.enter_cwd(str(tmp_path / "elsewhere"))
