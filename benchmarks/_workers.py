"""Running each side of a tunesmith-vs-TRL benchmark in a fresh process of its own, so that its
peak RSS (ru_maxrss) is its own and an allocator can be preloaded (LD_PRELOAD works only at start).

A worker is the benchmark script itself with `--worker KIND ...`; it prints one JSON line last.
`run_worker` measures the process from outside: wall seconds, its own CPU seconds, and the CPU
that other processes used meanwhile (the machine may be shared), and `busy_flag` marks a row
measured while others used more than a tenth of a core.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from _machine import busy_cpu_seconds

BUSY_CORES = 0.1  # other processes' CPU, in cores, above which a row's timing is flagged


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse_overrides(items: list[str]) -> dict:
    """KEY=VALUE strings -> {KEY: YAML-parsed VALUE} (so `packing=true` is a bool, `8` an int)."""
    import yaml

    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"override {item!r}: expected KEY=VALUE")
        out[key] = yaml.safe_load(raw)
    return out


def allocator_env(choice: str) -> dict:
    """This environment with `choice` preloaded, as `tunesmith train` restarts itself
    (training/allocator.py; "system" keeps glibc's). TUNESMITH_ALLOCATOR names what was found."""
    from tunesmith.training.allocator import allocator_env as env_for

    return env_for(choice, dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false"))


def resolved_allocator(choice: str) -> str:
    """The allocator `choice` ("auto", "system" or a name) gives on this machine."""
    from tunesmith.training.allocator import resolve

    return resolve(choice)[0]


def run_worker(label: str, script: str, args: list[str], env: dict) -> dict:
    """Run `python script args` in env; its last stdout line (JSON) plus the outside view."""
    cmd = [sys.executable, script, *args]
    busy0, own0, wall0 = busy_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    own1, busy1 = resource.getrusage(resource.RUSAGE_CHILDREN), busy_cpu_seconds()
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"{label} worker failed (exit {proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    own = (own1.ru_utime + own1.ru_stime) - (own0.ru_utime + own0.ru_stime)
    result["allocator"] = env.get("TUNESMITH_ALLOCATOR", "system")
    result["process_seconds"] = time.perf_counter() - wall0
    result["cpu_seconds"] = own
    result["other_cores"] = max(0.0, (busy1 - busy0) - own) / result["process_seconds"]
    return result


def busy_flag(result: dict) -> str:
    return "  <- machine busy" if result["other_cores"] > BUSY_CORES else ""


def worker_main(workers: dict, kind: str, *args) -> None:
    """The worker side: run workers[kind](*args) and print its result with this process's peak RSS."""
    result = workers[kind](*args)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))
