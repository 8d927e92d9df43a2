"""The run directory, built in a hidden temporary folder and renamed into place only when the run
has finished, so a crash or Ctrl-C never leaves a run directory that looks complete."""
from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from tunesmith.errors import ConfigError


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


def remove_stale(parent: Path) -> list[Path]:
    """Remove staging folders of runs whose process is gone (killed with SIGKILL or a power cut)."""
    removed = []
    for tmp in parent.glob(".*.incomplete-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


@contextmanager
def staged_run_dir(output_dir: str | Path, name: str):
    """Yield a temporary directory; on success it becomes output_dir/name, on failure it is removed."""
    parent = Path(output_dir)
    final = parent / name
    if final.exists():
        raise ConfigError(f"run directory {final} already exists; pick another run.name or remove it")
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale(parent)
    tmp = parent / f".{name}.incomplete-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.rename(tmp, final)
