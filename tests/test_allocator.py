"""train.allocator: `tunesmith train` restarts itself once with tcmalloc/jemalloc/mimalloc preloaded."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunesmith.errors import ConfigError
from tunesmith.training import allocator

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD allocators: Linux only")

ACTIVE = "from tunesmith.training.allocator import active; print(active())"


def test_mimalloc_ships_with_tunesmith_and_preloads():
    """The cmeel-mimalloc dependency gives every Linux install an allocator to preload; a process
    started with allocator_env really runs on it (its library is mapped), one without does not."""
    lib = allocator.find_library("mimalloc")
    assert lib is not None and lib.is_file()
    env = allocator.allocator_env("mimalloc", {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"})
    assert env["LD_PRELOAD"].split(":")[0] == str(lib) and env[allocator.MARK] == "mimalloc"
    run = lambda e: subprocess.run([sys.executable, "-c", ACTIVE], env=e, capture_output=True, text=True,
                                   check=True).stdout.strip()
    assert run(env) == "mimalloc"
    assert run({k: v for k, v in env.items() if k != "LD_PRELOAD"}) == "system"


def test_named_allocator_that_is_missing_is_an_error_and_auto_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(allocator, "_search_dirs", lambda: [tmp_path])
    with pytest.raises(ConfigError, match="train.allocator: jemalloc not found.*libjemalloc.so.2"):
        allocator.resolve("jemalloc")
    assert allocator.resolve("auto") == ("system", None)
    assert "LD_PRELOAD" not in allocator.allocator_env("auto", {})
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    assert allocator.resolve("auto") == ("jemalloc", tmp_path / "libjemalloc.so.2")  # auto order: tc, je, mi
    assert allocator.resolve("system") == ("system", None)


def test_tunesmith_train_reexecutes_once_with_the_allocator(tiny_model_dir, order_data, tmp_path):
    """The console command restarts itself with train.allocator preloaded and says which one runs;
    with train.allocator=system it keeps glibc's."""
    cfg = {"model": {"name": str(tiny_model_dir)}, "data": {"train": str(order_data["train"])},
           "method": {"name": "lora", "r": 4}, "train": {"max_steps": 1, "batch_size": 2},
           "run": {"output_dir": str(tmp_path / "runs")}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.MARK)}
    seen = {}
    for choice in ("mimalloc", "system"):
        out = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", str(path), f"train.allocator={choice}",
                              f"run.name={choice}"], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        seen[choice] = [line for line in out.stdout.splitlines() if "memory allocator:" in line]
    assert len(seen["mimalloc"]) == 1 and seen["mimalloc"][0].endswith("memory allocator: mimalloc")
    assert seen["system"][0].endswith("memory allocator: system")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["mimalloc", "system"]
