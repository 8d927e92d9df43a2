"""Test-only (tests/test_launched.py puts this folder on PYTHONPATH of the runs it launches): in a
launched rank other than 0, record every file-system write Python makes outside $TMPDIR (an audit
hook, PEP 578) to the file named by TUNESMITH_TEST_WRITE_AUDIT, one line per write. Rank 0 owns
the run directory: the test asserts the record stays empty. Writes made by C or Rust code without going
through Python's os/io (none in tunesmith: atomic.py creates every artefact with os.open) would
not be seen; the test also compares the run directory with a one-process run's."""
import os
import sys

_LOG = os.environ.get("TUNESMITH_TEST_WRITE_AUDIT")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate", "os.symlink",
           "os.link", "shutil.copyfile", "shutil.move"}
_EXEMPT = ("/dev/", "/proc/", "/sys/", *([os.path.join(os.environ["TMPDIR"], "")] if os.environ.get("TMPDIR") else []))
_busy = False


def _exempt(path) -> bool:
    if isinstance(path, int):  # an already-open descriptor (the write was recorded when it was opened)
        return True
    path = os.path.abspath(os.fsdecode(path))
    # devices (stdout silenced to /dev/null), bytecode, and the launch's own TMPDIR, where libraries
    # keep caches on import (torch inductor's cache folder)
    return path.startswith(_EXEMPT) or "__pycache__" in path


def _record(event: str, path) -> None:
    global _busy
    _busy = True
    try:
        fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, f"rank {os.environ['RANK']} pid {os.getpid()} {event} {os.fsdecode(path)}\n".encode())
        finally:
            os.close(fd)
    finally:
        _busy = False


def _hook(event: str, args) -> None:
    if _busy:
        return
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None))[:3]
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
        if writes and path is not None and not _exempt(path):
            _record(event, path)
    elif event in _EVENTS and args and isinstance(args[0], (str, bytes, os.PathLike)) and not _exempt(args[0]):
        _record(event, args[0] if event not in ("os.rename", "shutil.move") else f"{args[0]} -> {args[1]}")


if _LOG and os.environ.get("RANK", "0") != "0":
    sys.addaudithook(_hook)
