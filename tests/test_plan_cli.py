"""`tunesmith plan` (exit codes, JSON, text), the advice's re-plans, the train-time gate (--force, a
plan that cannot be made), and the manifest's plan / measured with `runs show`'s comparison.

The memory and time estimates are fixed fakes here (plan/memory.py and plan/throughput.py are tested
on their own): simple formulas with the right directions (checkpointing and shorter sequences cut
activations, QLoRA the weights, sharding divides by the world, offload moves the optimizer out), so
what is tested is the plumbing: which changes are tried, that each re-plans through validated
overrides, their order, the verdict's exit code and the gate."""
from __future__ import annotations

import json

import pytest

from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.plan import devices, memory, report, throughput
from tunesmith.plan.devices import Device
from tunesmith.plan.memory import COMPONENTS, MemoryEstimate
from tunesmith.plan.throughput import TimeEstimate

MB = 2**20
ACT_PER_TOKEN = 10_000  # fake activation bytes per token of a forward (checkpointing keeps a quarter)


def fake_memory(shape, counts, w, device) -> MemoryEstimate:
    sharded = w.strategy == "fsdp" or (w.strategy == "deepspeed" and w.zero_stage == 3)
    states = 16 * counts.trainable // (w.world if sharded or w.strategy == "deepspeed" else 1)
    comp = dict.fromkeys(COMPONENTS, 0)
    comp["weights"] = int(counts.base * (0.5 if w.quantized else w.base_dtype_bytes)) // (w.world if sharded else 1)
    comp["optimizer"] = 0 if w.offload_optimizer else states
    comp["activations"] = int(w.micro_batch * w.parallel * w.seq_len * ACT_PER_TOKEN
                              * (0.25 if w.gradient_checkpointing else 1))
    host = {"optimizer": states} if w.offload_optimizer else {}
    return MemoryEstimate(comp, device.memory_bytes, host, ("fake estimate",))


def fake_time(shape, counts, w, device, cfg, data=True) -> TimeEstimate:
    rate = 1000.0 * w.world * (0.75 if w.gradient_checkpointing else 1) * (0.3 if w.offload_optimizer else 1)
    rate *= (w.micro_batch / max(cfg.train.batch_size, 1)) ** 0.1  # smaller forwards: a little slower
    return TimeEstimate(6e6, 10_000 * w.seq_len // cfg.data.max_length, "fake", 10, 1.0, (0.2, 0.3, 0.4), "fake",
                        (0.8 * rate, rate, 1.2 * rate))


def fake_device(memory_mb: float, kind: str = "cpu") -> Device:
    return Device(f"fake {kind} {memory_mb:g}MB", kind, int(memory_mb * MB), {"fp32": 1.0, "bf16": 2.0}, True, "given")


@pytest.fixture
def fakes(monkeypatch):
    """Fake estimates; `fakes(memory_mb, kind)` sets what this machine (and --device) is."""
    monkeypatch.setattr(memory, "estimate_memory", fake_memory)
    monkeypatch.setattr(throughput, "estimate_time", fake_time)

    def set_device(memory_mb: float, kind: str = "cpu") -> Device:
        dev = fake_device(memory_mb, kind)
        monkeypatch.setattr(devices, "this_machine", lambda: dev)
        monkeypatch.setattr(devices, "parse_device", lambda text: dev)
        return dev

    set_device(10_000)
    return set_device


def overrides_of(model_dir, data, out, *extra):
    return [f"model.name={model_dir}", f"data.train={data['train']}", f"run.output_dir={out}", "run.name=r1",
            "train.batch_size=4", "train.micro_batch=batch", *extra]


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("{}\n")
    return path


def test_plan_exit_code_json_and_text(tiny_model_dir, order_data, tmp_path, cfg_file, fakes, capsys):
    args = overrides_of(tiny_model_dir, order_data, tmp_path / "runs")
    out = tmp_path / "plan.json"
    assert main(["plan", str(cfg_file), *args, "--no-data", "--json", str(out)]) == 0  # 10 GB: fits
    text = capsys.readouterr().out
    for part in ("parameters:", "memory per device:", "time:", "verdict: fits", "activations"):
        assert part in text
    saved = json.loads(out.read_text())
    act = 4 * 512 * ACT_PER_TOKEN  # micro-batch 4 x data.max_length 512
    assert saved["fits"] is True and saved["memory"]["components"]["activations"] == act
    assert saved["memory"]["total"] == sum(saved["memory"]["components"].values())
    assert saved["counts"]["total"] == saved["counts"]["base"] + saved["counts"]["added"] and saved["advice"] == []

    fakes(act / MB / 2)  # half the activations' size: does not fit
    assert main(["plan", str(cfg_file), *args, "--no-data", "--json", str(out)]) == 1
    text = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["fits"] is False and saved["memory"]["margin"] < 0 and "does NOT fit" in text
    assert saved["advice"] and saved["advice"][0]["fits"] is True
    first = saved["advice"][0]
    assert " ".join(first["overrides"]) in text  # the overrides are printed to paste
    # the advice's overrides, pasted, make it fit
    assert main(["plan", str(cfg_file), *args, *first["overrides"], "--no-data"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    assert "0 when it fits, 1 when it does not" in " ".join(capsys.readouterr().out.split())


def test_advice_replans_valid_overrides_cheapest_fitting_first(tiny_model_dir, order_data, tmp_path, fakes):
    base = overrides_of(tiny_model_dir, order_data, tmp_path / "runs")
    fakes(4 * 512 * ACT_PER_TOKEN / MB / 3)  # a third of the activations: checkpointing alone fits (a quarter)
    plan = report.make_plan(load_config(None, base), data=False)
    assert not plan.fits and plan.advice
    kinds = {ch.overrides[0].split("=")[0] for ch in plan.advice}
    assert {"train.gradient_checkpointing", "train.batch_size", "data.max_length"} <= kinds
    assert "method.name" not in kinds and "train.distributed.strategy" not in kinds  # GPU-only changes on a CPU
    assert all(ch.fits for ch in plan.advice)
    assert [ch.seconds for ch in plan.advice] == sorted(ch.seconds for ch in plan.advice)  # one device each
    for ch in plan.advice:  # each change is its overrides re-planned, validated like user input
        again = report.make_plan(load_config(None, [*base, *ch.overrides]), data=False, advise=False)
        assert (again.memory.total, again.fits, again.time.seconds[1]) == (ch.memory_bytes, ch.fits, ch.seconds)
    # the mildest cut that fits in each group: batch 2 x accumulation 2 (halves the activations; a
    # third is needed so 4 x 1 -> 1 x 4), max_length 128 (a quarter; 256 is half)
    by_kind = {ch.overrides[0].split("=")[0]: ch for ch in plan.advice}
    assert by_kind["train.batch_size"].overrides == ("train.batch_size=1", "train.grad_accum=4")
    assert by_kind["data.max_length"].overrides == ("data.max_length=128",)
    assert "truncates" in by_kind["data.max_length"].description
    # fake time: checkpointing costs 25% of the speed, a smaller micro-batch ~13%: the micro-batch is cheaper
    assert plan.advice[0].overrides == ("train.batch_size=1", "train.grad_accum=4")


def test_advice_on_gpus_smallest_sharded_world_and_combinations(tiny_model_dir, order_data, tmp_path, fakes):
    base = overrides_of(tiny_model_dir, order_data, tmp_path / "runs", "method.name=full", "data.max_length=64",
                        "train.batch_size=1")
    cfg = load_config(None, base)
    dev = fakes(1, "cuda")
    counts = report.make_plan(cfg, data=False, advise=False).counts
    need = 16 * counts.trainable + 4 * counts.base  # states + fp32 weights, sharded by the world
    act = 64 * ACT_PER_TOKEN
    dev = fakes((need / 3 + act + 1) / MB, "cuda")  # fits over 4 GPUs (need / 4), not 2
    plan = report.make_plan(cfg, data=False)
    assert not plan.fits
    by_kind = {ch.overrides[0]: ch for ch in plan.advice}
    fsdp = by_kind["train.distributed.strategy=fsdp"]
    assert fsdp.gpus == 4 and fsdp.fits and "train.distributed.workers=4" in fsdp.overrides
    assert dev.memory_bytes > fsdp.memory_bytes
    assert all(ch.fits for ch in plan.advice)
    cost = [ch.seconds * (ch.gpus or 1) for ch in plan.advice]  # device-time: seconds x devices
    assert cost == sorted(cost)

    # LoRA on a GPU too small for any change alone on one GPU: checkpointing + QLoRA together
    lora = load_config(None, overrides_of(tiny_model_dir, order_data, tmp_path / "runs", "data.max_length=64",
                                          "train.batch_size=1", "train.grad_accum=4"))
    p = report.make_plan(lora, data=False, advise=False)
    weights, act = p.memory.components["weights"], 64 * ACT_PER_TOKEN  # bf16 weights: 4-bit is a quarter
    fakes((weights / 4 + act / 4 + 16 * p.counts.trainable + 1) / MB, "cuda")  # needs 4-bit weights and 1/4 act
    plan = report.make_plan(lora, data=False)
    combos = [ch for ch in plan.advice if ch.overrides[0] == "train.gradient_checkpointing=true" and len(ch.overrides) > 1]
    assert any(ch.fits and "method.name=qlora" in ch.overrides for ch in combos)


def train_args(model_dir, data, out, *extra):
    return [*overrides_of(model_dir, data, out), f"data.validation={data['validation']}", "train.max_steps=2",
            "train.lr=1e-2", "method.r=8", *extra]


def test_train_refuses_a_plan_that_does_not_fit_unless_forced(tiny_model_dir, order_data, tmp_path, cfg_file,
                                                              fakes, capsys):
    from tunesmith.runs import show_run

    fakes(0.5)  # 0.5 MB: nothing fits
    args = train_args(tiny_model_dir, order_data, tmp_path / "runs")
    assert main(["train", str(cfg_file), *args]) == 2
    captured = capsys.readouterr()
    assert "plan: " in captured.out and "does NOT fit" in captured.out
    assert "will not fit" in captured.err and "--force" in captured.err and "=" in captured.err  # first advice's overrides
    assert not (tmp_path / "runs").exists()  # refused before the run directory

    assert main(["train", str(cfg_file), *args, "--force"]) == 0
    assert "starting it anyway (--force)" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "runs" / "r1" / "manifest.json").read_text())
    plan, measured = manifest["plan"], manifest["measured"]
    assert plan["fits"] is False and plan["memory_bytes"] == sum(plan["components"].values())
    assert plan["tokens_per_s"] > 0 and plan["seconds"] > 0
    # the plan's tokens: the 2 steps x 4 examples x the mean encoded example, from training's own counts
    assert "counted by training" in plan["tokens_source"]
    assert measured["peak_memory_bytes"] > 50 * MB and "RSS" in measured["peak_memory_source"]
    assert measured["tokens_per_s"] == manifest["tokens_per_s"] and measured["seconds"] == manifest["train_seconds"]
    shown = show_run(tmp_path / "runs" / "r1")
    assert "plan vs measured" in shown and "memory per device" in shown and "tokens/s" in shown
    error = (plan["memory_bytes"] - measured["peak_memory_bytes"]) / measured["peak_memory_bytes"]
    assert f"{100 * error:+.0f}%" in shown


def test_a_plan_that_cannot_be_made_does_not_block_training(tiny_model_dir, order_data, tmp_path, cfg_file,
                                                           fakes, monkeypatch, capsys):
    from tunesmith.plan import shapes

    def unsupported(*a, **k):
        raise NotImplementedError("meta-device construction of this model type")

    monkeypatch.setattr(shapes, "model_config", unsupported)
    assert main(["train", str(cfg_file), *train_args(tiny_model_dir, order_data, tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "plan: not made (NotImplementedError: meta-device construction" in out, out
    manifest = json.loads((tmp_path / "runs" / "r1" / "manifest.json").read_text())
    assert manifest["plan"] is None and manifest["measured"]["peak_memory_bytes"] > 0


def test_runs_show_plan_vs_measured_errors(tmp_path):
    from tunesmith.runs import plan_vs_measured

    m = {"plan": {"memory_bytes": 11 * 2**30, "tokens_per_s": 900.0, "device": "fake"},
         "measured": {"peak_memory_bytes": 10 * 2**30, "tokens_per_s": 1000.0, "peak_memory_source": "peak RSS"}}
    block = "\n".join(plan_vs_measured(m))
    assert "11.00 GB" in block and "10.00 GB" in block and "+10%" in block and "-10%" in block
    assert "no plan was made" in plan_vs_measured({"plan": None})[0]
    assert "not recorded" in plan_vs_measured({})[0]


def test_peak_memory_on_cpu_is_the_process_peak_rss():
    import resource

    import torch

    from tunesmith.training.device import peak_memory

    peak, source = peak_memory(torch.device("cpu"))
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert "VmHWM" in source and abs(peak - maxrss) <= 0.05 * maxrss


def test_dpo_is_gated_and_its_plan_counts_both_sides_of_each_pair(tiny_model_dir, tmp_path, fakes):
    from test_dpo import pairs

    from conftest import write_jsonl
    from tunesmith.errors import ConfigError
    from tunesmith.recipes.dpo import run_dpo

    rows = pairs(21, 8)
    train = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.train={train}", f"run.output_dir={tmp_path}",
                             "run.name=d", "objective.name=dpo", "train.batch_size=4", "train.max_steps=1"])
    fakes(0.5)
    with pytest.raises(ConfigError, match="will not fit"):
        run_dpo(cfg)
    run = run_dpo(cfg, force=True)
    manifest = json.loads((run / "manifest.json").read_text())
    plan = manifest["plan"]
    assert plan["fits"] is False and manifest["measured"]["peak_memory_bytes"] > 0
    # 1 step x 4 pairs x the mean pair's tokens (chosen + rejected, as the loop counts them)
    assert "counted by training: 8 examples" in plan["tokens_source"]
    from tunesmith.data.dataset import load_examples
    from tunesmith.models.load import load_tokenizer
    from tunesmith.recipes.dpo import encode_pairs

    items = encode_pairs(load_tokenizer(tiny_model_dir), load_examples(str(train)).examples, 512, "t")
    assert plan["tokens"] == int(4 * sum(it.n_tokens for it in items) / len(items))


def test_the_plan_leaves_trainings_random_state_as_it_was(tiny_model_dir, tmp_path):
    """The real plan (its matmul probe draws random matrices) before step 1 must not move the seed
    training runs from: with or without a plan, a run starts from the same random state."""
    import torch

    from tunesmith.recipes.preflight import check_plan

    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"run.output_dir={tmp_path}"])
    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert check_plan(cfg, force=True, lengths=[40, 60], trained=[20, 30]) is not None
    assert torch.equal(torch.get_rng_state(), before)
