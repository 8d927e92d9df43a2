"""The process's memory allocator for CPU training: tcmalloc, jemalloc or mimalloc instead of glibc's.

Training on a CPU allocates and frees thousands of activation tensors of ever-changing sizes (every
example has its own length). glibc's malloc serves them from heaps that fragment: resident memory
climbs ~0.5 GB above the live tensors for SmolLM2-135M, and capping it (malloc_mmap_threshold)
costs page faults. A size-class allocator reuses the freed blocks instead; PyTorch's own CPU launcher
(`python -m torch.backends.xeon.run_cpu`) preloads tcmalloc or jemalloc for the same reason. Measured
by `python benchmarks/sft_vs_trl.py` (its trl and trl+mimalloc rows, same steps, 2-core AVX-512 machine):
TRL's LoRA run at 16% less peak memory with mimalloc (2.41 vs 2.87 GB) but 13% fewer tokens/s; the
README's figures say what it does for tunesmith's own rows.

An allocator can only be chosen before the process starts (LD_PRELOAD), so `tunesmith train`
re-executes itself once with it (see `reexec_with`); library callers (run_sft in a process of
their own) get the environment from `allocator_env`. Where none is found, glibc's stays.
"""
from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

# name -> library file names, most specific first
LIBRARIES = {
    "tcmalloc": ["libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so"],
    "jemalloc": ["libjemalloc.so.2", "libjemalloc.so"],
    "mimalloc": ["libmimalloc.so.3", "libmimalloc.so.2", "libmimalloc.so"],
}
AUTO_ORDER = ("tcmalloc", "jemalloc", "mimalloc")  # fastest first on this project's CPU benchmark
MARK = "TUNESMITH_ALLOCATOR"  # set in the re-executed process: never re-execute twice


def _search_dirs() -> list[Path]:
    dirs = [Path(sysconfig.get_paths()["purelib"]) / "cmeel.prefix" / "lib",  # the cmeel-mimalloc wheel
            Path(sys.prefix) / "lib"]
    dirs += [Path(p) for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    dirs += [Path(p) for p in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                               "/usr/local/lib", "/opt/homebrew/lib")]
    return dirs


def find_library(name: str) -> Path | None:
    for d in _search_dirs():
        for lib in LIBRARIES[name]:
            if (d / lib).is_file():
                return d / lib
    return None


def resolve(choice: str) -> tuple[str, Path | None]:
    """(allocator name, its library) for train.allocator; ("system", None) where none is found
    (auto) — a named one that is missing is an error, since the user asked for it."""
    from tunesmith.errors import ConfigError

    if choice == "system" or not sys.platform.startswith("linux"):
        return "system", None
    for name in (AUTO_ORDER if choice == "auto" else (choice,)):
        lib = find_library(name)
        if lib:
            return name, lib
    if choice != "auto":
        raise ConfigError(f"train.allocator: {choice} not found (looked for {', '.join(LIBRARIES[choice])} in "
                          f"{', '.join(map(str, _search_dirs()[:3]))}, ...); install it or set train.allocator: auto")
    return "system", None


def active() -> str:
    """Which of the known allocators this process has loaded ("system" if none)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for name in LIBRARIES:
        if f"lib{name}" in maps:
            return name
    return "system"


def allocator_env(choice: str, env: dict | None = None) -> dict:
    """A copy of `env` (default: os.environ) that starts a process with the chosen allocator."""
    env = dict(os.environ if env is None else env)
    name, lib = resolve(choice)
    env[MARK] = name
    if lib is not None:
        env["LD_PRELOAD"] = ":".join([str(lib), *[p for p in env.get("LD_PRELOAD", "").split(":") if p]])
    return env


def reexec_with(choice: str, argv: list[str]) -> None:
    """Replace this process by `python -m tunesmith.cli argv` with the allocator preloaded, unless
    it is already in place (or none is available, or this process is the re-executed one)."""
    if MARK in os.environ or choice == "system" or active() != "system":
        return
    env = allocator_env(choice)
    if "LD_PRELOAD" not in env or env[MARK] == "system":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "tunesmith.cli", *argv], env)
