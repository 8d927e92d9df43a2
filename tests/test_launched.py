"""Real multi-process runs, launched the ways users launch them (`tunesmith train CONFIG --nproc 2`,
`torchrun --nproc_per_node 2 -m tunesmith train CONFIG`, or ranks started by hand as srun would),
against the same config run in one process: train.batch_size x train.grad_accum is the step's
batch whatever the number of processes, so the losses, gradient norms and saved weights must be
the one-process run's. Also: only rank 0 writes, an interrupted or crashed run resumes on any
number of processes, and a dead or stalled rank stops the run with a message instead of a hang.

Every run is a subprocess on 2 CPU processes (gloo) with one thread each; runs are shared between
tests through module-scoped fixtures. Tolerances: losses, gradient norms and every other logged
number rel/abs 1e-5, as the accumulation test of test_engine.py: the ranks add the same terms in
another order (the all-reduce sums two partial sums), and the log rounds to 6 decimals. Saved
weights rel/abs 1e-4: AdamW divides each element's step by that element's own gradient history,
so an element whose gradient is near zero turns a 1e-7 relative difference of summation order
into a visibly different step (measured: 1.6e-5 on one of 256 LoRA elements after 12 steps of
lr 0.01, the others within 1e-6); 1e-4 is 1% of one step. A gradient scaled by the world size
(DDP's average instead of the sum) would not move AdamW's weights, which is why the gradient
norms are compared at 1e-5.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from conftest import ROOT, write_jsonl
from test_dpo import pairs
from tunesmith.demo.orders import make_splits
from tunesmith.training.logging import read_metrics

pytestmark = pytest.mark.skipif(not dist.is_available() or sys.platform != "linux",
                                reason="needs torch.distributed and Linux (/proc, process groups)")

HOOKS = Path(__file__).parent / "launch_hooks"  # sitecustomize.py: the write audit of ranks other than 0
STEPS = 12  # long enough that a signal sent after the step-2 checkpoint lands mid-run
TIMING = {"elapsed_s", "tokens_per_s",  # the only fields of metrics.jsonl that may differ
          "generation_tokens_per_s", "train_tokens_per_s", "generation_seconds", "reward_seconds", "train_seconds"}


@dataclass
class Launch:
    command: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    audit: list[str]  # writes by ranks other than 0 (tests/launch_hooks/sitecustomize.py)
    output_dir: Path

    @property
    def run(self) -> Path:
        return self.output_dir / "r"

    def check(self) -> "Launch":
        assert self.returncode == 0, f"{' '.join(self.command)} exited {self.returncode}:\n{self.stderr[-4000:]}"
        return self


@pytest.fixture(scope="module")
def space(tmp_path_factory, tiny_model_dir):
    """The tiny model, data and configs of every launch, and the folders they write to."""
    root = tmp_path_factory.mktemp("launched")
    data = {"train": write_jsonl(root / "train.jsonl", make_splits(7, {"train": 24})["train"]),
            "validation": write_jsonl(root / "val.jsonl", make_splits(8, {"train": 6})["train"]),
            "pref_train": write_jsonl(root / "p_train.jsonl", pairs(21, 16)),
            "pref_validation": write_jsonl(root / "p_val.jsonl", pairs(22, 6)),
            "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": f"Name a {w}."} for w in
                                                            ("colour", "city", "fruit", "tree", "bird", "metal")])}
    common = {"model": {"name": str(tiny_model_dir)}, "method": {"name": "lora", "r": 4, "dropout": 0.0}}
    sft_data = {"train": str(data["train"]), "validation": str(data["validation"])}
    configs = {
        "lora": {**common, "data": sft_data,
                 "train": {"max_steps": STEPS, "batch_size": 8, "lr": 0.01, "save_every": 2, "log_every": 1}},
        "full": {**common, "method": {"name": "full"}, "data": sft_data,
                 "train": {"max_steps": 4, "batch_size": 4, "grad_accum": 2, "lr": 1e-3, "log_every": 1}},
        "dpo": {**common, "objective": {"name": "dpo", "beta": 0.5},
                "data": {"train": str(data["pref_train"]), "validation": str(data["pref_validation"])},
                "train": {"max_steps": 4, "batch_size": 4, "lr": 0.01, "log_every": 1, "eval_every": 2}},
        "rl": {**common, "objective": {"name": "rl", "num_generations": 4, "max_new_tokens": 6,
                                       "rewards": [{"function": "length", "options": {"target": 12}}]},
               "data": {"train": str(data["prompts"])},
               "train": {"max_steps": 3, "batch_size": 4, "lr": 0.01, "log_every": 1}},
    }
    paths = {}
    for name, cfg in configs.items():
        paths[name] = root / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg), encoding="utf-8")
    tmpdir = root / "tmp"  # the launches' TMPDIR: library caches (torch inductor) may write there
    tmpdir.mkdir()
    return {"root": root, "configs": paths, "tmpdir": tmpdir}


def launch_env(space, audit: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(HOOKS)]),
            "TMPDIR": str(space["tmpdir"]), "TORCHINDUCTOR_CACHE_DIR": str(space["tmpdir"] / "inductor"),
            "TUNESMITH_TEST_WRITE_AUDIT": str(audit), **extra}


def command(space, config: str, how: str, output_dir: Path, *extra: str) -> list[str]:
    """how: "1" (one process), "nproc" (tunesmith's launcher) or "torchrun"."""
    args = ["train", str(space["configs"][config]), f"run.output_dir={output_dir}", "run.name=r", *extra]
    if how == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "tunesmith", *args]
    return [sys.executable, "-m", "tunesmith", *args, *(["--nproc", "2"] if how == "nproc" else [])]


def start(space, cmd: list[str], output_dir: Path, **env) -> tuple[subprocess.Popen, Path]:
    audit = output_dir.parent / f"{output_dir.name}.audit"
    proc = subprocess.Popen(cmd, env=launch_env(space, audit, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    return proc, audit


def finish(proc: subprocess.Popen, cmd, audit: Path, output_dir: Path, began: float, timeout: float = 600) -> Launch:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not end within {timeout}s:\n{err[-4000:]}")
    lines = audit.read_text().splitlines() if audit.is_file() else []
    return Launch(cmd, proc.returncode, out, err, time.perf_counter() - began, lines, output_dir)


def run(space, name: str, config: str, how: str, *extra: str, output_dir: Path | None = None) -> Launch:
    output_dir = output_dir or space["root"] / name
    cmd = command(space, config, how, output_dir, *extra)
    began = time.perf_counter()
    proc, audit = start(space, cmd, output_dir)
    return finish(proc, cmd, audit, output_dir, began)


@pytest.fixture(scope="module")
def runs(space):
    """Each launch once per module, by name, shared by the tests that read it."""
    done: dict[str, Launch] = {}
    recipes = {"lora-1": ("lora", "1"), "lora-torchrun": ("lora", "torchrun"),
               "full-1": ("full", "1"), "full-nproc": ("full", "nproc"),
               "dpo-1": ("dpo", "1"), "dpo-nproc": ("dpo", "nproc"), "rl-1": ("rl", "1"), "rl-nproc": ("rl", "nproc")}

    def get(name: str) -> Launch:
        if name not in done:
            done[name] = run(space, name, *recipes[name]).check()
        return done[name]
    return get


# --- comparisons -------------------------------------------------------------------------------

def assert_same_curve(got: Path, want: Path, rel: float = 1e-5) -> None:
    """Every record of metrics.jsonl (training steps and evaluations) with the same fields and values."""
    a, b = read_metrics(got / "metrics.jsonl"), read_metrics(want / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb), ra["step"]
        for key in set(ra) - TIMING:
            assert ra[key] == pytest.approx(rb[key], rel=rel, abs=rel), (key, ra["step"])


def saved_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = [p for p in run_dir.rglob("*.safetensors") if "checkpoints" not in p.relative_to(run_dir).parts]
    assert files, f"no saved weights in {run_dir}"
    return {f"{p.relative_to(run_dir)}:{k}": v for p in files for k, v in load_file(str(p)).items()}


def assert_same_weights(got: Path, want: Path) -> None:
    a, b = saved_weights(got), saved_weights(want)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4, msg=lambda m: f"{k}: {m}")


def files_of(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))


def assert_trained_alike(got: Launch, want: Launch, rel: float = 1e-5) -> None:
    assert_same_curve(got.run, want.run, rel)
    assert_same_weights(got.run, want.run)
    assert got.audit == [], "ranks other than 0 wrote files"


# --- a, b: the same config on 1 and 2 processes ----------------------------------------------------

def test_lora_under_torchrun_equals_one_process(runs):
    """batch_size 8: 2 ranks x 4 examples, each example its own forward (CPU), the step's gradients
    exchanged once by DDP."""
    two, one = runs("lora-torchrun"), runs("lora-1")
    assert "strategy ddp: 2 processes" in two.stdout and "strategy none" in one.stdout
    assert_trained_alike(two, one)


def test_full_fine_tuning_with_accumulation_under_nproc_equals_one_process(runs):
    """batch_size 4 x grad_accum 2 on 2 ranks: each rank trains 4 of the step's 8 examples."""
    two, one = runs("full-nproc"), runs("full-1")
    assert "starting 2 processes with torchrun" in two.stdout and "strategy ddp" in two.stdout
    assert_trained_alike(two, one)


def test_dpo_under_nproc_equals_one_process(runs):
    """The preference loss, its reward metrics (each rank measures its own pairs: they are combined)
    and the held-out preference accuracy, as one process. rel 1e-4: the loss is a difference of
    sequence log-prob sums (about -100) between policy and reference, so float32's 1e-7 relative
    rounding is 1e-5 on the margin, which beta and the sigmoid carry into the loss and gradients;
    and each rank pads its 2 pairs to their own width where one process pads 4 together (measured:
    2.4e-5 relative on one gradient norm)."""
    two, one = runs("dpo-nproc"), runs("dpo-1")
    assert "strategy ddp" in two.stdout
    assert any("rewards/margins" in r for r in read_metrics(two.run / "metrics.jsonl"))
    assert_trained_alike(two, one, rel=1e-4)


def test_online_rl_under_nproc_equals_one_process(runs):
    """Each rank samples and scores its 2 of the step's 4 prompts (their groups whole, so the group
    advantages are the one process's) and the same completions: each is drawn from its own seeded
    stream, whatever else shares its batch. rel 1e-4 as DPO: each rank pads its 8 completions to
    their own width where one process pads 16 together."""
    two, one = runs("rl-nproc"), runs("rl-1")
    assert "strategy ddp" in two.stdout
    logged = read_metrics(two.run / "metrics.jsonl")
    assert all("reward" in r and "kl" in r for r in logged) and logged[-1]["kl"] > 0
    assert_trained_alike(two, one, rel=1e-4)


# --- c: rank 0 alone writes -----------------------------------------------------------------------

def test_the_write_audit_sees_writes_of_ranks_other_than_0(space, tmp_path):
    """The audit that the other tests expect empty does record a rank's writes (and not rank 0's)."""
    seen = {}
    for rank in ("0", "1"):
        audit = tmp_path / f"audit-{rank}"
        file, folder = str(tmp_path / f"x{rank}.txt"), str(tmp_path / f"d{rank}")
        script = f"import os; open({file!r}, 'w').close(); os.mkdir({folder!r})"
        subprocess.run([sys.executable, "-c", script], env=launch_env(space, audit, RANK=rank), check=True)
        seen[rank] = audit.read_text().splitlines() if audit.is_file() else []
    assert seen["0"] == [] and len(seen["1"]) == 2, seen
    assert "open" in seen["1"][0] and "x1.txt" in seen["1"][0] and "os.mkdir" in seen["1"][1]


def test_rank_0_alone_writes_the_run_directory(runs):
    for two, one in (("lora-torchrun", "lora-1"), ("full-nproc", "full-1"), ("dpo-nproc", "dpo-1")):
        two, one = runs(two), runs(one)
        assert two.audit == [], f"{two.command}: ranks other than 0 wrote files:\n" + "\n".join(two.audit)
        assert files_of(two.run) == files_of(one.run)
        assert sorted(p.name for p in two.output_dir.iterdir()) == ["r"]  # no staging folder left over


# --- f: a failing run under torchrun ends promptly, with the error of the ranks ---------------------

def test_a_step_that_two_ranks_cannot_split_fails_promptly_under_torchrun(space):
    """Every rank refuses the split as soon as the group is up (before loading anything), and
    torchrun ends with their error: no rank is left waiting for another."""
    launch = run(space, "split", "lora", "torchrun", "train.batch_size=3")
    assert launch.returncode != 0
    assert "train.batch_size x train.grad_accum = 3 x 1 = 3" in launch.stderr and "train.grad_accum=2" in launch.stderr
    assert "model:" not in launch.stdout  # refused before the model was loaded
    assert not (launch.output_dir / "r").exists() and launch.audit == []


# --- d, e: interrupted, crashed, resumed on another number of processes ----------------------------

def staging(output_dir: Path) -> list[Path]:
    return sorted(output_dir.glob(".r.incomplete-*"))


def wait_for_checkpoint(proc: subprocess.Popen, output_dir: Path, step: int = 2, timeout: float = 600) -> None:
    """Until the staged run holds checkpoint `step` (written whole: atomic_dir)."""
    deadline = time.monotonic() + timeout
    while not any((s / "checkpoints" / f"step-{step}").is_dir() for s in staging(output_dir)):
        assert proc.poll() is None, f"the run ended before its step-{step} checkpoint:\n{proc.stderr.read()[-4000:]}"
        assert time.monotonic() < deadline, f"no step-{step} checkpoint within {timeout}s"
        time.sleep(0.02)


def rank_process(launcher_pid: int, rank: int):
    """The worker of `rank` among the launcher's descendants (torchrun's agent starts them)."""
    import psutil

    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no process of rank {rank} under {launcher_pid}")


def resumed(space, name: str, output_dir: Path, how: str) -> Launch:
    launch = run(space, name, "lora", how, "--resume", output_dir=output_dir).check()
    step = int(launch.stdout.split("resumed from ", 1)[1].split("(step ", 1)[1].split(")")[0])
    assert 2 <= step < STEPS, step  # it did continue an unfinished run
    return launch


def assert_kept_for_resume(output_dir: Path, stderr: str) -> None:
    kept = staging(output_dir)
    assert len(kept) == 1 and (kept[0] / "checkpoints" / "step-2").is_dir(), kept
    assert "continue with: tunesmith train CONFIG --resume" in stderr
    assert not (output_dir / "r").exists()


@pytest.mark.slow
def test_an_interrupted_one_process_run_resumes_on_two_equal_to_the_uninterrupted_run(space, runs):
    """Ctrl-C (SIGINT) after the step-2 checkpoint; `--resume --nproc 2` ends where one process
    uninterrupted ends (1 -> 2 processes)."""
    out = space["root"] / "interrupted-1"
    cmd = command(space, "lora", "1", out)
    began = time.perf_counter()
    proc, audit = start(space, cmd, out)
    wait_for_checkpoint(proc, out)
    proc.send_signal(signal.SIGINT)
    stopped = finish(proc, cmd, audit, out, began, timeout=120)
    assert stopped.returncode == 130 and "interrupted" in stopped.stderr
    assert_kept_for_resume(out, stopped.stderr)
    two = resumed(space, "resume-1-to-2", out, "nproc")
    assert_trained_alike(two, runs("lora-1"))
    assert sorted(p.name for p in out.iterdir()) == ["r"]


@pytest.mark.slow
def test_a_rank_killed_mid_run_stops_the_run_naming_it_and_the_run_resumes_on_one_or_two(space, runs):
    """SIGKILL of rank 1 (the OOM killer's way) under `--nproc 2`: the command exits non-zero soon
    after, naming rank 1; the staged run keeps its checkpoints; `--resume` on 1 process (2 -> 1)
    and, from the same kept folder, on 2 processes (2 -> 2) both end as the uninterrupted run."""
    out = space["root"] / "killed"
    cmd = command(space, "lora", "nproc", out)
    began = time.perf_counter()
    proc, audit = start(space, cmd, out)
    wait_for_checkpoint(proc, out)
    rank_process(proc.pid, 1).kill()
    killed = time.perf_counter()
    crashed = finish(proc, cmd, audit, out, began, timeout=300)
    assert crashed.returncode != 0 and time.perf_counter() - killed < 60  # torchrun's agent stops rank 0
    assert "rank 1 (pid" in crashed.stderr and "was killed by SIGKILL" in crashed.stderr, crashed.stderr[-3000:]
    assert_kept_for_resume(out, crashed.stderr)
    assert crashed.audit == []
    kept = space["root"] / "killed-kept"
    shutil.copytree(out, kept, symlinks=True)  # resumed twice from the same folder, at the same path

    one = resumed(space, "resume-2-to-1", out, "1")
    assert_trained_alike(one, runs("lora-1"))
    os.rename(out, space["root"] / "resumed-on-1")
    shutil.copytree(kept, out, symlinks=True)
    two = resumed(space, "resume-2-to-2", out, "torchrun")
    assert_trained_alike(two, runs("lora-1"))


# --- g: ranks started without an agent (srun, a hand-written launcher): a dead or stalled peer ------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(space, output_dir: Path, *extra: str) -> tuple[list[subprocess.Popen], list[str], Path]:
    """Two ranks started by hand, the way srun does: each its own process with RANK and the rest set."""
    cmd = command(space, "lora", "1", output_dir, *extra)
    port = str(free_port())
    procs = []
    audit = None
    for rank in range(2):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        proc, audit = start(space, cmd, output_dir, **env)
        procs.append(proc)
    return procs, cmd, audit


def stop_rank(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["dies", "stalls"])
def test_a_rank_that_dies_or_stalls_stops_the_others_with_a_message(space, fault):
    """Without torchrun's agent nobody stops the survivors: a dead peer's closed connection fails
    rank 0's next collective at once; a stalled one (SIGSTOP) after train.distributed.timeout_s.
    Either way rank 0 names the situation, keeps the checkpoints, and exits."""
    out = space["root"] / f"external-{fault}"
    timeout_s = 20
    procs, cmd, audit = start_ranks(space, out, f"train.distributed.timeout_s={timeout_s}")
    try:
        wait_for_checkpoint(procs[0], out)
        procs[1].send_signal(signal.SIGKILL if fault == "dies" else signal.SIGSTOP)
        began = time.perf_counter()
        rank0 = finish(procs[0], cmd, audit, out, began, timeout=timeout_s + 120)
    finally:
        stop_rank(procs[1])
    assert rank0.returncode == 2, rank0.stderr[-3000:]
    assert "rank 0 lost contact with the other ranks of 2 (a rank died or stalled)" in rank0.stderr
    assert f"train.distributed.timeout_s={timeout_s}s" in rank0.stderr
    bound = 60 if fault == "dies" else timeout_s + 60
    assert rank0.seconds < bound
    assert_kept_for_resume(out, rank0.stderr)
    assert rank0.audit == []
