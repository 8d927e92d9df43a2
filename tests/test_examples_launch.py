"""The launch scripts in examples/ run as written: valid bash, and the commands they end in parse
with the parsers that will read them (torchrun's, tunesmith's). Each script runs for real with
stand-ins for the cluster's commands (srun, scontrol, ray, tunesmith) that record their arguments."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from tunesmith.cli import parse_args
from tunesmith.config import load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SBATCH = EXAMPLES / "slurm" / "train.sbatch"
RAY_SH = EXAMPLES / "ray" / "train.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def stand_in(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)


def recorder(bin_dir: Path, name: str, out: Path) -> None:
    """A command that writes its arguments, NUL-separated, to `out` (what bash expanded)."""
    stand_in(bin_dir, name, f"printf '%s\\0' \"$@\" > {out}")


def run_script(script: Path, args: list[str], env: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "HOME": str(tmp_path), **env}
    return subprocess.run(["bash", str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)


def recorded(path: Path) -> list[str]:
    return path.read_text().split("\0")[:-1]


@pytest.mark.parametrize("script", [SBATCH, RAY_SH], ids=lambda p: p.name)
def test_valid_bash(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK), f"{script} should be executable"


SLURM_ENV = {"SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242",
             "SLURM_JOB_NAME": "tunesmith", "SLURM_CPUS_PER_TASK": "64", "SLURM_GPUS_ON_NODE": "8"}


def test_sbatch_runs_one_torchrun_per_node_with_c10d_rendezvous_on_the_first_node(tmp_path):
    (tmp_path / "bin").mkdir()
    stand_in(tmp_path / "bin", "scontrol", 'test "$*" = "show hostnames gpu-[07-08]" && printf "gpu-07\\ngpu-08\\n"')
    recorder(tmp_path / "bin", "srun", tmp_path / "srun.args")
    result = run_script(SBATCH, ["train.lr=1e-4", "--resume"], SLURM_ENV, tmp_path)
    assert result.returncode == 0, result.stderr

    argv = recorded(tmp_path / "srun.args")
    at = argv.index("torchrun")
    assert "--ntasks-per-node=1" in argv[:at] and "--nodes=2" in argv[:at]
    args = get_args_parser().parse_args(argv[at + 1:])
    assert (args.nnodes, args.nproc_per_node) == ("2", "8")
    assert (args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id) == ("c10d", "gpu-07:29742", "4242")
    assert not args.standalone and args.max_restarts == 0
    assert args.module and args.training_script == "tunesmith"
    # what every rank runs: `python -m tunesmith train ...`, the user's arguments passed on
    assert args.training_script_args == ["train", "cfg.yaml", "run.name=tunesmith-4242", "train.lr=1e-4", "--resume"]
    ranks = parse_args(args.training_script_args)
    assert ranks.command == "train" and ranks.resume and ranks.overrides == ["run.name=tunesmith-4242", "train.lr=1e-4"]
    assert "8 GPU(s), rendezvous on gpu-07:29742" in result.stdout


def test_sbatch_settings_can_be_set_from_the_environment(tmp_path):
    (tmp_path / "bin").mkdir()
    stand_in(tmp_path / "bin", "scontrol", 'printf "n1\\n"')
    stand_in(tmp_path / "bin", "srun", f'echo "OMP_NUM_THREADS=$OMP_NUM_THREADS" > {tmp_path / "env"}\n'
                                       f"printf '%s\\0' \"$@\" > {tmp_path / 'srun.args'}")
    env = {**SLURM_ENV, "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "n1", "SLURM_CPUS_PER_TASK": "12",
           "CONFIG": "my.yaml", "GPUS_PER_NODE": "4", "PORT": "31000", "RUN_NAME": "again"}
    result = run_script(SBATCH, [], env, tmp_path)
    assert result.returncode == 0, result.stderr
    argv = recorded(tmp_path / "srun.args")
    args = get_args_parser().parse_args(argv[argv.index("torchrun") + 1:])
    assert (args.nnodes, args.nproc_per_node, args.rdzv_endpoint) == ("1", "4", "n1:31000")
    assert args.training_script_args == ["train", "my.yaml", "run.name=again"]
    assert (tmp_path / "env").read_text().strip() == "OMP_NUM_THREADS=3"  # 12 cores over 4 ranks


def test_ray_script_runs_tunesmith_with_the_ray_launcher(tmp_path):
    (tmp_path / "bin").mkdir()
    stand_in(tmp_path / "bin", "ray", 'test "$1" = status')
    recorder(tmp_path / "bin", "tunesmith", tmp_path / "tunesmith.args")
    (tmp_path / "cfg.yaml").write_text("model: {name: m}\ndata: {train: t.jsonl}\n")
    result = run_script(RAY_SH, ["cfg.yaml", "train.lr=1e-4"], {"WORKERS": "8"}, tmp_path)
    assert result.returncode == 0, result.stderr

    args = parse_args(recorded(tmp_path / "tunesmith.args"))
    assert args.command == "train" and args.config == "cfg.yaml"
    cfg = load_config(str(tmp_path / "cfg.yaml"), args.overrides)
    assert (cfg.train.distributed.launcher, cfg.train.distributed.workers, cfg.train.lr) == ("ray", 8, 1e-4)


def test_ray_script_without_a_cluster_says_so(tmp_path):
    (tmp_path / "bin").mkdir()
    stand_in(tmp_path / "bin", "ray", "exit 1")
    recorder(tmp_path / "bin", "tunesmith", tmp_path / "tunesmith.args")
    result = run_script(RAY_SH, ["cfg.yaml"], {}, tmp_path)
    assert result.returncode == 1 and "no Ray cluster on this machine" in result.stderr
    assert not (tmp_path / "tunesmith.args").exists()
