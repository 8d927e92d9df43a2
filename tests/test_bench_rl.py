"""benchmarks/rl_vs_trl.py's like-for-like check: the TRL GRPOConfig it builds asks for the same run as
its tunesmith config (after GRPOConfig resolves its own defaults), and the check names each way they
could differ; and its TRL reward agrees with what a JSON-validity reward must say."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import rl_vs_trl as bench  # noqa: E402

SHAPE = {"steps": 3, "batch": 2, "k": 4, "max_new_tokens": 32}


@pytest.fixture(scope="module")
def grpo_config():
    from trl import GRPOConfig

    return lambda tmp, precision="bf16", **over: GRPOConfig(**bench.trl_settings(tmp, SHAPE, over, precision))


def settings(tmp, precision="bf16"):
    return bench.tunesmith_settings("m", tmp / "d.jsonl", tmp, SHAPE, precision)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_the_benchmark_asks_both_sides_for_the_same_run(grpo_config, tmp_path, precision):
    args = grpo_config(tmp_path, precision)
    assert bench.same_settings(settings(tmp_path, precision), args) == []
    # GRPOConfig's own resolution: one generation of batch x k completions per optimizer step
    assert (args.generation_batch_size, args.steps_per_generation) == (8, 1)
    assert not args.gradient_checkpointing and args.beta == 0.04
    # the same precision on both sides: TRL's autocast and the dtype its model is loaded in
    assert args.bf16 == (precision == "bf16")
    assert args.model_init_kwargs["dtype"] == {"bf16": "bfloat16", "fp32": "float32"}[precision]


def test_a_precision_mismatch_is_named(grpo_config, tmp_path):
    assert any("train.precision=fp32" in p for p in bench.same_settings(settings(tmp_path, "fp32"), grpo_config(tmp_path)))
    args = grpo_config(tmp_path, model_init_kwargs={"dtype": "float32"})  # autocast, but an fp32 base
    assert any("base dtype float32" in p for p in bench.same_settings(settings(tmp_path), args))


@pytest.mark.parametrize("trl, problem", [
    ({"beta": 0.1}, "kl_coef"),
    ({"temperature": 0.7}, "objective.temperature"),
    ({"loss_type": "dapo"}, "rl_loss"),
    ({"learning_rate": 2e-5}, "train.lr"),
    ({"max_completion_length": 64}, "max_new_tokens"),
    ({"generation_batch_size": 16}, "generates 16 completions every 2 micro-steps"),
    ({"per_device_train_batch_size": 4}, "trains 4 completions per step"),
    ({"num_iterations": 2}, "num_iterations 1"),
    ({"activation_checkpointing": True}, "gradient checkpointing off"),
    ({"lr_scheduler_type": "cosine"}, "train.schedule"),
])
def test_same_settings_names_each_difference(grpo_config, tmp_path, trl, problem):
    problems = bench.same_settings(settings(tmp_path), grpo_config(tmp_path, **trl))
    assert any(problem in p for p in problems), problems


def test_accumulation_is_the_same_run(grpo_config, tmp_path):
    """2 micro-batches of 4 completions, generated together once per optimizer step: the same run."""
    args = grpo_config(tmp_path, per_device_train_batch_size=4, generation_batch_size=None,
                       gradient_accumulation_steps=2)
    assert (args.generation_batch_size, args.steps_per_generation) == (8, 2)
    assert bench.same_settings(settings(tmp_path), args) == []


def test_same_settings_sees_the_tunesmith_side_too(grpo_config, tmp_path):
    ts = settings(tmp_path)
    ts["objective"]["num_generations"] = 2
    ts["objective"]["rewards"] = [{"function": "json_schema"}]
    problems = bench.same_settings(ts, grpo_config(tmp_path))
    assert any("objective.num_generations" in p for p in problems)
    assert any("json reward" in p for p in problems)


def test_json_valid_reward():
    """The same reading as tunesmith's json built-in (reward_builtins.json_valid without a column)."""
    from tunesmith.training.reward_builtins import json_valid

    replies = ['{"a": 1}', ' ```json\n{"a": [1, 2]}\n``` ', '{"a": 1} and more', "Sure! {\"a\": 1}", "[1, 2]",
               '{"a": 1', "", '```\n{"b": "}"}\n```']
    expected = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert bench.json_valid([None] * len(replies), replies) == expected
    assert json_valid([None] * len(replies), replies) == expected
    chat = [[{"role": "assistant", "content": '{"x": "y"}'}]]
    assert bench.json_valid([None], chat) == [1.0]


def test_arguments():
    assert bench.parse_args([]).shape == bench.DEFAULTS
    assert bench.parse_args(["--tiny", "--k", "3"]).shape == {**bench.TINY, "k": 3}
    with pytest.raises(SystemExit):
        bench.parse_args(["--k", "1"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--rows", "trl,peft"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--repeat", "0"])
    assert bench.parse_args(["--repeat", "3"]).repeat == 3


def test_both_configs_are_valid_rl_configs(tmp_path):
    """The benchmark's and the proof's tunesmith configs load (reward specs, schema, eval task), and the
    proof's held-out prompts are not training prompts."""
    import json

    import rl_orders_proof as proof

    from tunesmith.config import parse_config

    cfg = parse_config(bench.tunesmith_settings("m", tmp_path / "d.jsonl", tmp_path, SHAPE), "bench")
    assert [r.function for r in cfg.objective.rewards] == ["json"] and cfg.objective.kl_coef == 0.04
    paths = proof.write_data(tmp_path / "data", 8, 4)
    cfg = parse_config(proof.proof_config("m", paths, tmp_path, proof.TINY, 1e-4, 64), "proof")
    assert [(r.function, r.column) for r in cfg.objective.rewards] == [("json_schema", None), ("json", "reference")]
    assert cfg.eval.tasks[0].metrics == ["json"] and cfg.data.validation == str(paths["heldout"])
    notes = {split: [json.loads(line)["prompt"][1]["content"] for line in paths[split].read_text().splitlines()]
             for split in ("train", "heldout")}
    assert len(notes["train"]) == 8 and len(notes["heldout"]) == 4 and not set(notes["train"]) & set(notes["heldout"])


def test_the_proof_rewards_give_the_reference_full_marks(tmp_path):
    """The schema fits the demo's answers, and the field match counts fields: a reference reply scores 1
    on both, one wrong field 5/6 on the match and still 1 on the schema, prose 0."""
    import json

    import rl_orders_proof as proof

    from tunesmith.config import parse_config
    from tunesmith.training.rewards import build_rewards

    paths = proof.write_data(tmp_path / "data", 6, 2)
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    cfg = parse_config(proof.proof_config("m", paths, tmp_path, proof.TINY, 1e-4, 64), "proof")
    rewards = build_rewards(cfg.objective.rewards, None, {"reference"})
    wrong = {**json.loads(rows[1]["reference"]), "city": "Atlantis"}
    replies = [rows[0]["reference"], json.dumps(wrong), "Here is the order: " + rows[2]["reference"]]
    schema, match = rewards([r["prompt"] for r in rows[:3]], replies, {"reference": [r["reference"] for r in rows[:3]]})
    assert schema == [1.0, 1.0, 0.0]
    assert match == pytest.approx([1.0, 5 / 6, 0.0])


def test_the_benchmark_runs_end_to_end():
    """Both rows on a tiny random model, one step: the workers' token counts agree with what each side
    reports (tunesmith's manifest, TRL's _generate) and the last line is the ratio. The plumbing of a
    benchmark nobody runs in CI rots quietly otherwise (its tunesmith recorder once read a field the
    rollout no longer had)."""
    import subprocess

    script = Path(bench.__file__)
    out = subprocess.run([sys.executable, str(script), "--tiny", "--steps", "1", "--k", "2", "--max-new-tokens", "8",
                          "--rows", "trl,tunesmith"], capture_output=True, text=True, cwd=script.parent.parent)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("ratio tokens_per_s=") and " peak_rss=" in lines[-1], lines[-5:]
    assert any(line.startswith("TRL row: trl; ratio") for line in lines)
    assert any(line.startswith("tunesmith ") for line in lines) and any(line.startswith("trl ") for line in lines)


def test_repeat_reports_each_round_and_the_median_ratio(monkeypatch, capsys):
    """--repeat 3: every row runs in each round (interleaved), each round's ratio is against that
    round's faster TRL row, and the last line is the median of the rounds' ratios."""
    speeds = iter([("trl", 50), ("trl+alloc", 60), ("tunesmith", 90),   # round 1: 1.50 vs trl+alloc
                   ("trl", 70), ("trl+alloc", 40), ("tunesmith", 84),   # round 2: 1.20 vs trl
                   ("trl", 50), ("trl+alloc", 50), ("tunesmith", 100)])  # round 3: 2.00
    order, dirs = [], set()

    def fake_row(name, args, tmp, model, data, shape, env):
        row, tps = next(speeds)
        assert name.startswith(row.removesuffix("alloc"))
        order.append(row)
        dirs.add(tmp)  # each round's runs in their own directories (a run directory is never reused)
        mem = 2000 if row == "tunesmith" else 4000
        return {"steps": shape["steps"], "prompt_tokens": 20 * shape["k"], "completion_tokens": 40, "completions": 4,
                "tokens": 100, "tps": float(tps), "seconds": 100 / tps, "generation_seconds": 1.0,
                "train_seconds": 1.0, "peak_rss_mb": mem, "mean_reward": 0.0, "process_seconds": 1.0,
                "other_cores": 0.0, "fingerprint": "f", "settings": {}, "allocator": "x"}

    monkeypatch.setattr(bench, "run_row", fake_row)
    monkeypatch.setattr(bench, "prompt_tokens", lambda model, data: [10, 10])
    monkeypatch.setattr(bench, "resolved_allocator", lambda choice: "mimalloc")
    bench.main(["--tiny", "--steps", "1", "--k", "2", "--repeat", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert order == ["trl", "trl+alloc", "tunesmith"] * 3 and len(dirs) == 3
    rounds = [line for line in lines if line.startswith("TRL row:")]
    assert [r.split(";")[0] for r in rounds] == ["TRL row: trl+mimalloc", "TRL row: trl", "TRL row: trl"]
    assert lines[-2] == "per round: tokens_per_s=1.50 peak_rss=0.50; tokens_per_s=1.20 peak_rss=0.50; " \
                        "tokens_per_s=2.00 peak_rss=0.50"
    assert lines[-1] == "ratio tokens_per_s=1.50 peak_rss=0.50 (median of 3 rounds)"
