"""`tunesmith plan`'s time: the GPU table and --device parsing, this machine, the FLOPs formula
against torch's FlopCounterMode, the benchmarks' numbers kept, token counts against the tokenizer,
steps against the trainer's own function, and the MFU corrected by local runs."""
from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama, write_jsonl
from tunesmith.plan import devices, mfu, tokens
from tunesmith.plan.devices import GIB, Device, lookup_gpu, parse_device, this_machine
from tunesmith.plan.shapes import ModelShape
from tunesmith.plan.throughput import TimeEstimate, estimate_time, flops_per_token

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ModelShape("llama", hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, intermediate=1536,
                     vocab=49152, tied=True, max_positions=8192)


# --- devices ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,name,gb", [
    ("H100 80GB", "H100 SXM 80GB", 80), ("h100", "H100 SXM 80GB", 80), ("h100 pcie", "H100 PCIe 80GB", 80),
    ("a100-40gb", "A100 SXM 40GB", 40), ("A100", "A100 SXM 80GB", 80), ("4090", "RTX 4090 24GB", 24),
    ("NVIDIA GeForce RTX 3090", "RTX 3090 24GB", 24), ("NVIDIA A100-SXM4-40GB", "A100 SXM 40GB", 40),
    ("NVIDIA H100 80GB HBM3", "H100 SXM 80GB", 80), ("NVIDIA L40S", "L40S 48GB", 48), ("l4", "L4 24GB", 24),
    ("Tesla V100-SXM2-16GB", "V100 SXM2 16GB", 16), ("Tesla T4", "T4 16GB", 16), ("h200", "H200 141GB", 141),
    ("AMD Instinct MI300X", "MI300X 192GB", 192), ("NVIDIA A10G", "A10G 24GB", 24),
])
def test_named_gpus(text, name, gb):
    d = parse_device(text)
    assert (d.name, d.memory_bytes, d.kind, d.source) == (name, gb * GIB, "cuda", "table")


def test_table_rates_are_dense_and_bf16_where_the_hardware_has_it():
    assert parse_device("h100").tflops == {"bf16": 989.4, "fp16": 989.4, "fp32": 67.0}  # 1979 is the sparse figure
    assert parse_device("a100").tflops["bf16"] == 312.0
    for old in ("v100", "t4"):
        d = parse_device(old)
        assert not d.bf16 and "bf16" not in d.tflops and d.tflops["fp16"] > d.tflops["fp32"]
    assert all(g.datasheet for g in devices.GPUS)


@pytest.mark.parametrize("text,memory,rates", [
    ("80GB,989TFLOPS", 80, {"bf16": 989.0, "fp16": 989.0, "fp32": 989.0}),
    ("memory=80GB,tflops=989", 80, {"bf16": 989.0, "fp16": 989.0, "fp32": 989.0}),
    ("memory=24GB,bf16=165,fp32=82.6", 24, {"bf16": 165.0, "fp32": 82.6}),
])
def test_device_by_numbers(text, memory, rates):
    d = parse_device(text)
    assert (d.memory_bytes, d.tflops, d.source) == (memory * GIB, rates, "given")


@pytest.mark.parametrize("text,says", [
    ("b200", "not in the table"), ("a100-64gb", "40GB, 80GB, not 64GB"), ("80GB", "give both"),
    ("80GB,fast=3", "unknown field"),
])
def test_device_errors(text, says):
    with pytest.raises(ValueError, match=says) as err:
        parse_device(text)
    if says == "not in the table":
        assert "H100 SXM 80GB" in str(err.value) and "MI300X" in str(err.value)


def test_this_machine_cpu(monkeypatch):
    import psutil

    from tunesmith.training.device import cpu_has_native_bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    d = this_machine()
    assert d.kind == "cpu" and d.source == "probe" and set(d.tflops) == {"fp32"}
    assert 0 < d.tflops["fp32"] < 100  # TFLOP/s of a CPU
    assert d.memory_bytes == psutil.virtual_memory().total and d.bf16 == cpu_has_native_bf16()
    assert parse_device("cpu").kind == "cpu"


def test_this_machine_cuda_from_the_table(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA A100-SXM4-40GB")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i=0: types.SimpleNamespace(total_memory=42_505_273_344))
    d = this_machine()
    assert d.kind == "cuda" and d.memory_bytes == 42_505_273_344 and d.tflops["bf16"] == 312.0
    assert d.name.startswith("A100 SXM 40GB") and lookup_gpu("NVIDIA A100-SXM4-40GB").memory_gb == 40


# --- FLOPs --------------------------------------------------------------------------------------------

def test_benchmark_flops_unchanged_by_the_move():
    """benchmarks/sft_vs_trl.py's numbers before flops_per_token moved into plan/throughput.py."""
    before = {("lora", 0.3, 250.0): 484567142.4, ("full", 1.0, 512.0): 859963392.0,
              ("lora", 0.05, 100.0): 440703590.4}
    for args, value in before.items():
        assert flops_per_token(SMOLLM2, *args) == pytest.approx(value, rel=1e-12)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import sft_vs_trl
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    for args, value in before.items():
        assert sft_vs_trl.flops_per_token(*args) == pytest.approx(value, rel=1e-12)
    assert sft_vs_trl.model_flops("lora", {"computed_tokens": 24000, "head_rows": 7000, "examples": 96}) == \
        pytest.approx(11606962176000.0, rel=1e-12)


@pytest.mark.parametrize("method,checkpointing", [("full", False), ("lora", False), ("lora", True)])
def test_flops_formula_matches_flop_counter(method, checkpointing):
    """Forward + backward of a tiny Llama (eager attention, loss on every position) counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    from tunesmith.config import MethodSection
    from tunesmith.methods import get_method

    model = tiny_llama(256, layers=2)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.config._attn_implementation = "eager"
    base = sum(p.numel() for p in model.parameters())
    model = get_method(method).build(model, MethodSection(name=method, r=8, alpha=16, dropout=0.0))
    added = sum(p.numel() for p in model.parameters()) - base
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    shape = ModelShape.from_config(model.config)
    batch, length = 2, 48
    ids = torch.randint(0, 256, (batch, length))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    counted = counter.get_total_flops() / (batch * length)
    # eager attention computes the whole L x L square: the causal formula's length doubled
    expected = flops_per_token(shape, "full" if method == "full" else "lora", 1.0, 2 * length,
                               adapter_params=added, frozen_input=method != "full", checkpointing=checkpointing)
    assert expected == pytest.approx(counted, rel=0.03)


def test_checkpointing_dpo_and_kinds_cost_more():
    lora = flops_per_token(SMOLLM2, "lora", 0.3, 200)
    assert flops_per_token(SMOLLM2, "full", 0.3, 200) > lora
    assert flops_per_token(SMOLLM2, "lora", 0.3, 200, checkpointing=True) > lora * 1.3  # + one decoder forward


# --- data, steps and time -------------------------------------------------------------------------

def _cfg(model, data, **train):
    from tunesmith.config import parse_config

    return parse_config({"model": {"name": str(model)}, "data": {"train": str(data), "max_length": 128},
                         "method": {"name": "lora", "r": 8, "alpha": 16},
                         "train": {"epochs": 2, "batch_size": 3, "grad_accum": 2, **train},
                         "run": {"output_dir": str(Path(data).parent / "runs")}})


def _rows(n):
    return [{"messages": [{"role": "user", "content": f"question {i} " + "word " * (i % 7)},
                          {"role": "assistant", "content": f"answer {i} " + "more " * (3 * i % 11)}]} for i in range(n)]


def test_token_count_matches_the_embedded_tokenizer(tmp_path, embedded_model, monkeypatch):
    from tunesmith.models.load import load_tokenizer

    data = write_jsonl(tmp_path / "d.jsonl", _rows(12))
    cfg = _cfg("smollm2-135m-instruct", data)
    found = tokens.count_tokens(cfg, paired=False)
    tok = load_tokenizer(embedded_model.path)
    direct = [len(tok(tok.apply_chat_template(r["messages"], tokenize=False), add_special_tokens=False)["input_ids"])
              for r in _rows(12)]
    assert list(found.lengths) == direct and found.items == 12 and found.source.startswith("counted (12 examples")
    assert 0 < found.trained < sum(direct)
    monkeypatch.setattr(tokens, "SAMPLE", 5)  # larger data: a sample scaled to the row count
    sampled = tokens.count_tokens(cfg, paired=False)
    assert sampled.items == 12 and len(sampled.lengths) == 5 and "first 5 examples of 12 rows" in sampled.source


def _plan_parts(cfg, device):
    from tunesmith.plan.params import count_parameters
    from tunesmith.plan.shapes import model_config
    from tunesmith.plan.workload import resolve_workload

    config, _ = model_config(cfg.model.name)
    return ModelShape.from_config(config), count_parameters(config, cfg.method), resolve_workload(cfg, device)


GPU = parse_device("a100-40gb")


@pytest.mark.parametrize("train", [{}, {"max_steps": 7}, {"epochs": 1.5, "batch_size": 4, "grad_accum": 1}])
def test_steps_are_the_trainers(tmp_path, tiny_model_dir, train):
    from tunesmith.training.loop import total_steps

    cfg = _cfg(tiny_model_dir, write_jsonl(tmp_path / "d.jsonl", _rows(10)), **train)
    est = estimate_time(*_plan_parts(cfg, GPU), GPU, cfg)
    assert est.steps == total_steps(10, cfg.train)
    if not train:  # 2 epochs of every example: twice the data's tokens
        found = tokens.count_tokens(cfg, paired=False)
        assert est.tokens == pytest.approx(2 * found.sample_tokens, rel=0.01)
        assert est.padded_tokens > est.tokens  # micro_batch=batch on a GPU pads each batch to its longest


def test_seconds_ordering_and_missing_data(tmp_path, tiny_model_dir):
    cfg = _cfg(tiny_model_dir, write_jsonl(tmp_path / "d.jsonl", _rows(10)))
    est = estimate_time(*_plan_parts(cfg, GPU), GPU, cfg)
    lo, mid, hi = est.seconds
    assert 0 < lo < mid < hi and est.mfu[0] < est.mfu[1] < est.mfu[2]
    assert est.step_seconds == pytest.approx(mid / est.steps)
    assert est.tokens_per_s[1] == pytest.approx(312e12 * est.mfu[1] / est.flops_per_token)
    blind = estimate_time(*_plan_parts(cfg, GPU), GPU, cfg, data=False)
    assert blind.tokens_source.startswith("max_length") and blind.steps == 0 and blind.seconds[1] == math.inf
    assert blind.flops_per_token > est.flops_per_token  # max_length positions cost more attention than short rows
    assert TimeEstimate(1.0, 10, "x", 1, 1.0, (0.1, 0.2, 0.3), "x", (0.0, 0.0, 0.0)).seconds[1] == math.inf


def test_mfu_corrected_by_local_runs(tmp_path, tiny_model_dir):
    cfg = _cfg(tiny_model_dir, write_jsonl(tmp_path / "d.jsonl", _rows(10)))
    runs = Path(cfg.run.output_dir)
    for i, (planned, measured) in enumerate([(100, 50), (100, 80), (200, 120), (100, "bad")]):
        (runs / f"r{i}").mkdir(parents=True)
        (runs / f"r{i}" / "manifest.json").write_text(json.dumps(
            {"plan": {"tokens_per_s": planned, "device_kind": "cuda"}, "measured": {"tokens_per_s": measured}}))
    for name, plan in [("cpu-run", {"tokens_per_s": 1, "device_kind": "cpu"}),
                       ("cpu-by-name", {"tokens_per_s": 1, "device": "CPU (AMD EPYC, 2 cores)"})]:
        (runs / name).mkdir()
        (runs / name / "manifest.json").write_text(json.dumps({"plan": plan, "measured": {"tokens_per_s": 100}}))
    (runs / "broken").mkdir()
    (runs / "broken" / "manifest.json").write_text("{not json")
    shape, counts, work = _plan_parts(cfg, GPU)
    (lo, mid, hi), source = mfu.expected_mfu(shape, work, GPU, cfg)
    default = mfu.default_mfu(work, GPU)[0][1]
    assert mid == pytest.approx(default * 0.6) and source.startswith("median of 3 local runs")
    assert lo == pytest.approx(default * 0.5) and hi == pytest.approx(default * 0.8)


def test_cpu_mfu_pays_a_fixed_cost_per_forward(tmp_path, tiny_model_dir):
    """Short forwards lose more to the per-layer fixed cost; at the reference run's size the
    default stands; a wide model (Llama-3.2-1B's layers) barely notices it."""
    cfg = _cfg(tiny_model_dir, write_jsonl(tmp_path / "d.jsonl", _rows(4)))
    cpu = Device("CPU", "cpu", 8 * GIB, {"fp32": 0.18}, source="probe")
    _, _, work = _plan_parts(cfg, cpu)
    default = mfu.default_mfu(work, cpu)[0]
    assert mfu.expected_mfu(SMOLLM2, work, cpu, cfg, forward_tokens=240)[0] == pytest.approx(default)
    (lo, mid, hi), source = mfu.expected_mfu(SMOLLM2, work, cpu, cfg, forward_tokens=96)
    assert mid == pytest.approx(0.74 * default[1], rel=0.01) and "96 tokens" in source
    wide = ModelShape("llama", 2048, 16, 32, 8, 64, 8192, 128256, True, 131072)
    assert 0.97 < mfu.overhead_factor(wide, 96, 240) < 1.0


def test_cpu_default_is_the_readme_run(tmp_path, embedded_model):
    """The adapter default is sft_vs_trl.py's README row re-derived: its 96 GSM8K rows planned with
    this formula, x 188 tokens/s, over the 186.5 GFLOP/s probe of that run."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from _gsm8k import GSM8K, write_data
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    if not GSM8K.is_file():
        pytest.skip("../shared/data is not here")
    from tunesmith.config import parse_config

    data = tmp_path / "gsm8k.jsonl"
    write_data(data, 96)
    cfg = parse_config({"model": {"name": "smollm2-135m-instruct"}, "data": {"train": str(data), "max_length": 512},
                        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
                        "train": {"epochs": 1, "batch_size": 8, "precision": "fp32"}})
    cpu = Device("CPU", "cpu", 8 * GIB, {"fp32": 0.1865}, source="given")
    est = estimate_time(*_plan_parts(cfg, cpu), cpu, cfg)
    tps, gflops, measured = mfu.README_CPU["adapter"]
    assert tps * est.flops_per_token / (gflops * 1e9) == pytest.approx(measured, abs=0.002)
    assert mfu.DEFAULTS[("cpu", "fp32", "adapter")][0][1] == pytest.approx(measured, abs=0.005)
    assert est.mfu[1] == pytest.approx(0.55, rel=1e-3)  # 240 tokens per forward: the reference run's own size


def test_cpu_rate_is_the_best_probe_seen(tmp_path, monkeypatch):
    """A probe slowed by a busy moment does not lower the plan's rate: the best one seen is kept per
    CPU, threads included; an unreadable cache falls back to the probe."""
    from tunesmith.plan import devices

    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path))
    probes = iter([100.0, 50.0, 120.0])
    monkeypatch.setattr(devices, "matmul_gflops", lambda **kw: next(probes))
    assert [devices.cpu_device().tflops["fp32"] for _ in range(3)] == pytest.approx([0.1, 0.1, 0.12])
    (tmp_path / "plan" / "cpu-rates.json").write_text("[not a mapping")
    assert devices.best_cpu_rate(70.0) == 70.0
