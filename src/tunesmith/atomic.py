"""Write a final artefact so that it appears whole under its name, or not at all.

The one mechanism every artefact writer uses: write beside the destination under a hidden
temporary name, fsync, rename into place (atomic within one file system), fsync the directory so
the rename itself survives a power cut; on any exception, KeyboardInterrupt included, remove the
temporary and leave whatever was at the destination before untouched.

- `atomic_path(path)`: a temporary file name, for writers that take a name (safetensors,
  GGUFWriter, matplotlib); `atomic_write(path)`: the same, opened as a file object.
- `atomic_dir(path)`: a staging directory renamed into place, for artefacts made of many files.

Temporary files are created with mode 0666 and directories with 0777, less the umask, exactly as
open() and mkdir() would create the final ones: an artefact read by other users (an export served
by Ollama's account) must not come out private the way tempfile.mkstemp's 0600 would make it.

This module sits at the bottom of the import graph: the standard library only.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator, Literal


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where directories cannot be opened)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    # On Linux an fsync on any descriptor of the inode flushes its data, so a file written by a
    # library under its own descriptor is flushed by opening it again.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _new_temp_file(path: Path) -> Path:
    while True:
        tmp = _temp_name(path, "tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask applies
            return tmp
        except FileExistsError:
            continue


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield the name of an empty temporary file beside `path`; when the block ends without an
    error it is fsynced and renamed over `path`. The parent directory is created if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_file(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """`open(path, mode)` that never leaves a half-written `path`: see atomic_path."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_write writes a whole file: mode {mode!r} must start with 'w'")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": encoding})) as f:
            yield f


def write_text(path: str | Path, text: str) -> Path:
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | Path, data, indent: int | None = 2) -> Path:
    """JSON (UTF-8, not ASCII-escaped) with a final newline, atomically."""
    return write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if not p.is_symlink():
                _fsync_file(p)
        fsync_dir(dirpath)


@contextmanager
def atomic_dir(path: str | Path, if_exists: Literal["error", "replace", "keep"] = "error",
               staging: str | Path | None = None,
               keep_staging: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a staging directory beside `path`; when the block ends without an error, every file
    in it is fsynced and it is renamed to `path`.

    if_exists, for a `path` present when the block ends: "error" raises FileExistsError (check
    first for a friendlier message); "replace" swaps the new directory in and only then deletes
    the old one (a failure before that leaves the old one whole); "keep" keeps the old one and
    discards the new (another process made the same thing meanwhile).
    staging: the staging folder's name when others must find it (a run's, for --resume); used as
    it is if it exists (adopted), else created. Default: a fresh hidden name.
    keep_staging: on an error, called with the staging folder; True leaves it in place (work that
    can be resumed) instead of deleting it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if staging is None:
        tmp = _temp_name(path, "staging")
        tmp.mkdir(0o777)  # the umask applies
    else:
        tmp = Path(staging)
        tmp.mkdir(0o777, exist_ok=True)
    try:
        yield tmp
        _fsync_tree(tmp)
        _commit_dir(tmp, path, if_exists)
    except BaseException:
        if not (keep_staging is not None and tmp.exists() and keep_staging(tmp)):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def _commit_dir(tmp: Path, path: Path, if_exists: str) -> None:
    if not path.exists():
        os.rename(tmp, path)
    elif if_exists == "keep":
        shutil.rmtree(tmp, ignore_errors=True)
    elif if_exists == "replace":
        old = _temp_name(path, "old")
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        raise FileExistsError(f"{path} already exists")
