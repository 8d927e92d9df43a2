"""manifest.json: what is needed to reproduce a run and to trust where its numbers came from."""
from __future__ import annotations

import platform
import time
from importlib.metadata import PackageNotFoundError, version



def _version(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def versions() -> dict:
    return {pkg: _version(pkg) for pkg in ("tunesmith", "torch", "transformers", "peft")} | {
        "python": platform.python_version()}


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
