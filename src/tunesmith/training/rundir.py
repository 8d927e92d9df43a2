"""The run directory, built in a hidden staging folder and renamed into place only when the run
has finished, so a crash or Ctrl-C never leaves a run directory that looks complete.

A staging folder that holds complete checkpoints is work worth keeping: on a failure it stays
(hidden, marked incomplete) and `tunesmith train CONFIG --resume` adopts it and continues.
One without checkpoints is removed on failure, or by the next run if the process was killed.
"""
from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from tunesmith.atomic import atomic_dir
from tunesmith.errors import ConfigError
from tunesmith.training.checkpoint import checkpoint_dirs


def run_name(name: str | None, prefix: str = "sft") -> str:
    return name or f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _staging_pid(path: Path) -> int | None:
    pid = path.name.rsplit("-", 1)[-1]
    return int(pid) if pid.isdigit() else None


def _has_checkpoints(path: Path) -> bool:
    return bool(checkpoint_dirs(path / "checkpoints"))


def remove_stale(parent: Path) -> list[Path]:
    """Remove staging folders of dead runs (killed with SIGKILL, power cut) that hold nothing to resume."""
    removed = []
    for tmp in parent.glob(".*.incomplete-*"):
        pid = _staging_pid(tmp)
        if pid is not None and not _pid_alive(pid) and not _has_checkpoints(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def resumable(parent: Path, name: str | None) -> Path:
    """The staging folder of a dead run with checkpoints, by name (or the only one)."""
    pattern = f".{name}.incomplete-*" if name else ".*.incomplete-*"
    found = [p for p in parent.glob(pattern) if _has_checkpoints(p)]
    alive = [p for p in found if _pid_alive(_staging_pid(p) or 0)]
    if alive:
        raise ConfigError(f"{alive[0]} belongs to a run that is still going (pid {_staging_pid(alive[0])})")
    if not found:
        what = f"run '{name}'" if name else "any run"
        raise ConfigError(f"nothing to resume for {what} in {parent}: checkpoints are written only with "
                          "train.save_every > 0")
    if len(found) > 1:
        names = ", ".join(p.name.split(".incomplete-")[0].lstrip(".") for p in found)
        raise ConfigError(f"several runs can be resumed ({names}); choose one with run.name=NAME")
    return found[0]


def staged_name(path: Path) -> str:
    return path.name.split(".incomplete-")[0][1:]


@contextmanager
def staged_run_dir(output_dir: str | Path, name: str, adopt: Path | None = None):
    """Yield a staging directory; on success it becomes output_dir/name. `adopt` continues the
    staging folder of an interrupted run (resume) instead of starting a new one."""
    parent = Path(output_dir)
    final = parent / name
    if final.exists():
        raise ConfigError(f"run directory {final} already exists; pick another run.name or remove it")
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale(parent)
    tmp = parent / f".{name}.incomplete-{os.getpid()}"
    if adopt is not None:
        os.rename(adopt, tmp)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        with atomic_dir(final, staging=tmp, keep_staging=_has_checkpoints) as tmp:
            yield tmp
    except BaseException as exc:
        # what became of the folder travels with the exception (the CLI prints it after the error);
        # __notes__ by hand: BaseException.add_note is Python 3.11+
        exc.__notes__ = [*getattr(exc, "__notes__", []), _fate_of(tmp)]
        raise


def _fate_of(tmp: Path) -> str:
    if tmp.is_dir():  # atomic_dir kept it: it holds checkpoints
        last = checkpoint_dirs(tmp / "checkpoints")[-1].name
        return f"kept {tmp} with checkpoints up to {last}; continue with: tunesmith train CONFIG --resume"
    return f"removed the unfinished run folder {tmp} (it held no checkpoint)"
