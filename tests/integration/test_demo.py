"""The main job end to end on the embedded model: the demo's target is asserted, not just run."""
import json

import pytest

from tunesmith.cli import main

pytestmark = pytest.mark.slow


def test_demo_improves_exact_match_by_30_points(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path), "--name", "demo"]) == 0
    result = json.loads((tmp_path / "demo" / "eval" / "compare.json").read_text())
    assert set(result) == {"base", "tuned", "speed"}
    for name in ("base", "tuned"):
        side = result[name]
        assert set(side) == {"exact_match", "json_valid", "field_accuracy"}
        assert all(0.0 <= v <= 1.0 for v in side.values())
        speed = result["speed"][name]  # generation speed of each side's evaluation
        assert speed["examples_per_s"] > 0 and 0 < speed["generated_tokens"] <= speed["decode_row_steps"]
    assert result["tuned"]["exact_match"] >= result["base"]["exact_match"] + 0.30
    assert result["tuned"]["field_accuracy"] > result["base"]["field_accuracy"]
    out = capsys.readouterr().out
    assert "exact_match" in out and "tok/s" in out and "ETA" in out
    preds = (tmp_path / "demo" / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 60
