"""The child processes of the jobs runner: how they are started, signalled, recognised and read.

Every child runs `python -m tunesmith ...` in its own session (so a SIGTERM to its process group
reaches whatever it started) and, on Linux, with PR_SET_PDEATHSIG=SIGTERM: the kernel stops it
when the thread that forked it ends, so a kill -9 of the server stops its trainings too (they keep
their checkpoints). PDEATHSIG follows the forking *thread*: spawn() must be called from one
long-lived thread only (the runner's).
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

STOP_WAIT_S = 60          # a stopping training's cleanup (its checkpoints are already on disk)
PR_SET_PDEATHSIG = 1      # <linux/prctl.h>
HEADER = "=== tunesmith jobs:"
TAIL_LINES = 10           # of a log without an `error:` line, the failure's message


def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()
_SIGTERM = int(signal.SIGTERM)


def _die_with_parent() -> None:
    # preexec_fn, between fork and exec: one libc call, nothing that could wait on a lock that
    # another thread of the server held at the fork
    _PRCTL(PR_SET_PDEATHSIG, _SIGTERM)


def spawn(argv: list[str], log: Path, header: str, cwd: Path, gpu: str | None = None) -> subprocess.Popen:
    """`python -m tunesmith argv...`, stdout and stderr appended to `log` after a header line."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n{HEADER} {header} ===\n".encode())
        out.flush()
        return subprocess.Popen([sys.executable, "-m", "tunesmith", *argv], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent if _PRCTL is not None else None)


def signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig) if os.getpgid(pid) == pid else os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace").split("\0")
    except OSError:  # gone (or no /proc: then no process can be proven ours, none is touched)
        return []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has finished; only its exit status is left


def stop(pid: int, timeout: float = STOP_WAIT_S) -> None:
    """SIGTERM a process that is not our child (left by a dead server) and wait for its end;
    SIGKILL after `timeout`."""
    signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(pid):
        signal_group(pid, signal.SIGKILL)
        while alive(pid):
            time.sleep(0.1)


def last_error(log: Path, tail_bytes: int = 64 << 10) -> str:
    """The failure's message in the log's last attempt: from tunesmith's last `error:` line on
    (it carries the CLI's notes: what was kept), else the last lines (a traceback's end)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "the process failed and left no log"
    text = text.rsplit(HEADER, 1)[-1].split("\n", 1)[-1] if HEADER in text else text
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("error: "):
            return "\n".join([lines[i][len("error: "):], *lines[i + 1:]])[:4000]
    return "\n".join(lines[-TAIL_LINES:])[:4000] or "the process failed without output"
