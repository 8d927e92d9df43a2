"""The errors of a multi-process run that need no second process: a half-set launch environment,
a step that the ranks cannot split, settings that need a process group, and the process group's
life (destroyed on every way out; a peer's failure reported as one). Real launches are in
test_launched.py."""
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import yaml

from conftest import ROOT
from tunesmith import cli
from tunesmith.config import DistributedSection, TrainSection
from tunesmith.errors import ConfigError
from tunesmith.methods import get_method
from tunesmith.training.distributed import group
from tunesmith.training.distributed.group import DistributedError, check_split, launched_env, process_group
from tunesmith.training.distributed.launch import describe_failures
from tunesmith.training.distributed.strategy import choose_strategy

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def config_file(tmp_path, tiny_model_dir, order_data):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": str(tiny_model_dir)}, "data": {"train": str(order_data["train"])},
                                    "run": {"output_dir": str(tmp_path / "runs")}, "train": {"max_steps": 1}}))
    return path


def test_a_half_set_launch_environment_names_the_missing_variables(config_file, monkeypatch, capsys, tmp_path):
    for k in LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["train", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert "sets RANK, WORLD_SIZE but not LOCAL_RANK, MASTER_ADDR, MASTER_PORT" in err
    assert "torchrun" in err and "--nproc" in err
    assert not (tmp_path / "runs").exists()  # refused before any run folder


def test_launch_environment_values_are_checked():
    env = {"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    with pytest.raises(DistributedError, match="RANK=2 is not below WORLD_SIZE=2"):
        launched_env(env)
    with pytest.raises(DistributedError, match="MASTER_PORT='x' is not a number"):
        launched_env({**env, "RANK": "0", "MASTER_PORT": "x"})
    assert launched_env({**env, "RANK": "1"}) and not launched_env({})


def test_a_step_batch_the_ranks_cannot_split_names_the_fields_and_a_fix():
    with pytest.raises(DistributedError) as err:
        check_split(TrainSection(batch_size=3, grad_accum=1), 2)
    message = str(err.value)
    assert "train.batch_size x train.grad_accum = 3 x 1 = 3" in message and "2 processes" in message
    assert "train.grad_accum=2" in message  # 3 x 2 splits over 2
    check_split(TrainSection(batch_size=3, grad_accum=2), 2)
    check_split(TrainSection(batch_size=3, grad_accum=1), 3)
    check_split(TrainSection(batch_size=3, grad_accum=1), 1)


def test_parallel_examples_with_several_processes_is_refused():
    tcfg = TrainSection(batch_size=4, micro_batch="example", parallel_examples=2)
    with pytest.raises(DistributedError, match="train.parallel_examples=2 with 2 processes.*remove it"):
        check_split(tcfg, 2)
    check_split(tcfg, 1)


def test_the_split_is_checked_before_the_recipe_runs(monkeypatch):
    from tunesmith import recipes
    from tunesmith.config import load_config

    @contextmanager
    def two_ranks(dcfg):
        yield 0, 2
    monkeypatch.setattr(group, "process_group", two_ranks)
    monkeypatch.setattr(recipes, "recipe_for", lambda cfg: pytest.fail("the recipe ran"))
    with pytest.raises(DistributedError, match="cannot be split evenly over 2 processes"):
        recipes.run_recipe(load_config(None, ["data.train=x.jsonl", "train.batch_size=3"]))


@pytest.mark.parametrize("name", ["fsdp", "deepspeed"])
def test_a_sharding_strategy_in_one_process_suggests_nproc(name):
    with pytest.raises(ConfigError, match=f"strategy={name} needs a process group.*--nproc N"):
        choose_strategy(DistributedSection(strategy=name), get_method("full"), None, None)


def test_python_m_tunesmith_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "tunesmith", "train", "--help"], capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--nproc" in out.stdout and "--resume" in out.stdout


# --- the process group's life, with a fake torch.distributed ------------------------------------

class FakeDist:
    """torch.distributed as process_group uses it: one rank of two, collectives absent."""

    def __init__(self, rank=1):
        self.rank, self.up, self.destroyed = rank, False, 0

    def is_available(self):
        return True

    def is_initialized(self):
        return self.up

    def init_process_group(self, backend, timeout, device_id=None):
        self.up, self.backend, self.timeout = True, backend, timeout

    def destroy_process_group(self):
        self.up, self.destroyed = False, self.destroyed + 1

    def get_rank(self):
        return self.rank

    def get_world_size(self):
        return 2

    DistNetworkError = type("DistNetworkError", (RuntimeError,), {})
    DistStoreError = type("DistStoreError", (RuntimeError,), {})


@pytest.fixture
def fake_dist(monkeypatch):
    fake = FakeDist()
    monkeypatch.setattr(group, "dist", fake)
    for k, v in zip(LAUNCH_ENV, ("1", "2", "1", "127.0.0.1", "29500")):
        monkeypatch.setenv(k, v)
    return fake


GLOO_DEAD_PEER = ("Got the following error when running the callback: RuntimeError: [/__w/pytorch/pytorch/third_party/"
                  "gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:52436. This is "
                  "typically caused by a remote worker crashing.")
GLOO_TIMEOUT = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                "15000ms for recv operation to complete")


@pytest.mark.parametrize("raised", [None, ValueError("bug"), KeyboardInterrupt(), RuntimeError("shape mismatch")])
def test_the_group_is_destroyed_on_every_way_out(fake_dist, raised):
    stdout = sys.stdout
    with pytest.raises(type(raised)) if raised is not None else contextmanager(lambda: (yield))():
        with process_group(DistributedSection(timeout_s=30)) as (rank, size):
            assert (rank, size) == (1, 2) and fake_dist.timeout.total_seconds() == 30
            assert sys.stdout is not stdout  # rank 1 prints nothing (rank 0 reports)
            if raised is not None:
                raise raised
    assert fake_dist.destroyed == 1 and sys.stdout is stdout


@pytest.mark.parametrize("message, cause", [(GLOO_DEAD_PEER, "Connection closed by peer [127.0.0.1]:52436"),
                                            (GLOO_TIMEOUT, "Timed out waiting 15000ms for recv operation")])
def test_a_collective_failed_by_a_dead_or_stalled_peer_is_reported_as_lost_contact(fake_dist, message, cause):
    with pytest.raises(DistributedError) as err:
        with process_group(DistributedSection(timeout_s=30)):
            exc = RuntimeError(message)
            exc.__notes__ = ["kept /runs/.r.incomplete-1 with checkpoints up to step-2; continue with: ..."]
            raise exc
    text = str(err.value)
    assert text.startswith("rank 1 lost contact with the other ranks of 2 (a rank died or stalled): " + cause)
    assert "GLHF" not in text and "train.distributed.timeout_s=30s" in text
    assert err.value.__notes__ == exc.__notes__  # what became of the run folder still reaches the CLI
    assert fake_dist.destroyed == 1


def test_a_store_or_network_error_is_lost_contact_too(fake_dist):
    with pytest.raises(DistributedError, match="rank 1 lost contact"):
        with process_group(DistributedSection()):
            raise FakeDist.DistNetworkError("failed to recv, got 0 bytes")


def test_an_unrelated_runtime_error_passes_through_and_one_process_is_never_lost(monkeypatch):
    for k in LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="Connection closed by peer"):  # no group: nothing to lose contact with
        with process_group(DistributedSection()) as (rank, size):
            assert (rank, size) == (0, 1)
            raise RuntimeError(GLOO_DEAD_PEER)


# --- which rank failed first, from torchrun's agent -----------------------------------------------

def failure(rank, exitcode, timestamp):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    f = ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file="<N/A>")
    f.timestamp = timestamp
    return f


def test_the_first_failure_is_named_and_a_killed_rank_comes_before_the_ranks_stopped_after_it():
    now = int(time.time())
    # same second (the agent's timestamps are whole seconds): rank 1 killed, rank 0 stopped by the agent
    text = describe_failures({0: failure(0, 130, now), 1: failure(1, -9, now)})
    assert text.startswith("rank 1 (pid 1001) was killed by SIGKILL; rank(s) 0 (exited with code 130) after it")
    assert "--resume" in text
    # an error exit before a stopped rank; an earlier failure before a later one whatever its kind
    assert describe_failures({0: failure(0, -15, now), 1: failure(1, 1, now)}).startswith("rank 1 (pid 1001) exited "
                                                                                          "with code 1")
    assert describe_failures({0: failure(0, 2, now), 1: failure(1, -9, now + 1)}).startswith("rank 0 (pid 1000) "
                                                                                             "exited with code 2")
    assert describe_failures({3: failure(1, -11, now)}) == ("rank 3 (pid 1001) was killed by SIGSEGV; the other ranks "
                                                            "were stopped. Its own error, if it printed one, is above; "
                                                            "a run with checkpoints continues with --resume (on any "
                                                            "number of processes)")
