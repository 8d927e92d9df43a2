"""scripts/plan_table.py: README's table of planned runs. make_plan and parse_device are replaced by
fakes (the real ones are exercised by the plan tests): what is checked here is which configs the
script plans, the table it writes, and that it touches nothing of README outside the markers."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from tunesmith.plan import devices, report
from tunesmith.plan.devices import Device

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("plan_table", ROOT / "scripts" / "plan_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def script(monkeypatch):
    calls = []
    h100 = Device("H100 80GB", "cuda", 80 * 2**30, {"bf16": 989.0}, source="table")

    def fake_make_plan(cfg, device=None, gpus=1, data=True, advise=True):
        calls.append((cfg, device, gpus, data))
        total = (30 if cfg.method.name == "full" else 20) * 2**30 // gpus
        return SimpleNamespace(  # what the table reads of a Plan
            fits=total <= device.memory_bytes, gpus=gpus,
            memory=SimpleNamespace(total=total, margin=device.memory_bytes - total),
            counts=SimpleNamespace(trainable=41_943_040 if cfg.method.name != "full" else 8_030_261_248),
            workload=SimpleNamespace(method=cfg.method.name, strategy="ddp" if gpus > 1 else "single"),
            time=SimpleNamespace(tokens_per_s=(1000.0 * gpus, 1500.0 * gpus, 2000.0 * gpus)))

    monkeypatch.setattr(report, "make_plan", fake_make_plan)
    monkeypatch.setattr(devices, "parse_device", lambda text: h100 if text == "H100 80GB" else None)
    module = load_script()
    module.calls = calls
    return module


def test_every_model_method_and_gpu_count_is_planned_from_its_shipped_config(script):
    rows = script.plan_rows()
    assert len(rows) == len(script.calls) == 4 * 3 * 2
    seen = set()
    for cfg, device, gpus, data in script.calls:
        path = Path(cfg.model.name)
        assert path.is_file() and path.parent == ROOT / "tests" / "data" / "model_configs"
        assert device.name == "H100 80GB" and data is False
        assert cfg.data.max_length == 2048 and cfg.train.gradient_checkpointing
        seen.add((path.stem, cfg.method.name, gpus))
    assert seen == {(m, method, g) for m in ("Llama-3.2-1B", "Llama-3.2-3B", "Llama-3.1-8B", "Llama-3.1-70B")
                    for method in ("lora", "qlora", "full") for g in (1, 8)}


def test_table_replaces_only_what_lies_between_the_markers(script, tmp_path):
    readme = tmp_path / "README.md"
    before, after = "# Title\n\nText before.\n\n", "\n\n## Next\n\nText after, with `code`.\n"
    readme.write_text(f"{before}{script.START}\nan old table\n{script.END}{after}", encoding="utf-8")
    assert script.main(["--readme", str(readme)]) == 0
    text = readme.read_text(encoding="utf-8")
    assert text.startswith(before + script.START + "\n") and text.endswith(script.END + after)
    table = text[len(before) + len(script.START):-len(script.END + after)]
    assert "an old table" not in table and "`data.max_length=2048`" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 24
    assert rows[0] == "| 1B (Llama-3.2-1B) | lora | 1 | 41,943,040 | 20.0 GB | yes (60.0 GB spare) | single | " \
                      "1,500 (1,000-2,000) |"
    assert "| 70B (Llama-3.1-70B) | full | 8 | 8,030,261,248 | 3.8 GB | yes (76.2 GB spare) | ddp | " \
           "12,000 (8,000-16,000) |" in rows
    # regenerating is idempotent
    assert script.main(["--readme", str(readme)]) == 0 and readme.read_text(encoding="utf-8") == text


def test_missing_or_repeated_markers_are_refused(script):
    with pytest.raises(SystemExit, match="plan-table:start"):
        script.replace_table("no markers here", "table")
    with pytest.raises(SystemExit):
        script.replace_table(f"{script.END}\n{script.START}", "table")
    with pytest.raises(SystemExit):
        script.replace_table(f"{script.START}{script.END}{script.START}{script.END}", "table")


def test_the_readme_holds_the_markers_once():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.count("<!-- plan-table:start -->") == text.count("<!-- plan-table:end -->") == 1
    assert text.index("## Planning a run") < text.index("<!-- plan-table:start -->")
