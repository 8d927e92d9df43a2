"""plan/memory.py: components against hand-computed figures, bitsandbytes' real NF4 storage, training's
activation budget, and the activation figure against what autograd actually saves (saved-tensor hooks)."""
from __future__ import annotations

import pytest
import torch

from tunesmith.config import parse_config
from tunesmith.plan.devices import Device
from tunesmith.plan.memory import (ACT_BYTES, COMPONENTS, estimate_memory, layer_bytes, layer_elements_per_token,
                                   layer_params, nf4_bytes, recomputed_layers)
from tunesmith.plan.params import ParamCounts
from tunesmith.plan.shapes import ModelShape
from tunesmith.plan.workload import resolve_workload

H100 = Device("H100 80GB", "cuda", 80 * 10**9, {"bf16": 989.0}, bf16=True, source="table")
CPU = Device("cpu", "cpu", 16 * 2**30, {"fp32": 1.0}, bf16=False, source="given")

# Llama-3.1-8B (its config.json): 8,030,261,248 parameters; LoRA r=16 on all seven projections: 41,943,040
LLAMA8B = ModelShape("llama", hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336,
                     vocab=128256, tied=False, max_positions=131072)
BASE_8B, LORA_8B, EMB_8B = 8_030_261_248, 41_943_040, 128256 * 4096
LORA_COUNTS = ParamCounts(base=BASE_8B, added=LORA_8B, trainable=LORA_8B, quantized=0, embedding=EMB_8B, head=EMB_8B)
LINEAR_8B = BASE_8B - 2 * EMB_8B - 4096 * (2 * 32 + 1)  # every linear but the head: what QLoRA quantizes
QLORA_COUNTS = ParamCounts(base=BASE_8B, added=LORA_8B, trainable=LORA_8B, quantized=LINEAR_8B,
                           embedding=EMB_8B, head=EMB_8B)
FULL_COUNTS = ParamCounts(base=BASE_8B, added=0, trainable=BASE_8B, quantized=0, embedding=EMB_8B, head=EMB_8B)


def cfg(*overrides: str, **sections):
    data = {"model": {"name": "x"}, "data": {"max_length": 512}, "train": {"batch_size": 4}}
    for key, value in (o.split("=", 1) for o in overrides):
        section, field = key.split(".", 1)
        node = data.setdefault(section, {})
        *parents, last = field.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = {"true": True, "false": False}.get(value, int(value) if value.isdigit() else value)
    return parse_config(data)


def plan(overrides=(), counts=LORA_COUNTS, device=H100, world=1, shape=LLAMA8B, **kw):
    w = resolve_workload(cfg(*overrides), device, world=world, **kw)
    return estimate_memory(shape, counts, w, device), w


def test_llama8b_lora_bf16_on_80gb_by_hand():
    est, w = plan()
    c = est.components
    assert list(c) == list(COMPONENTS)
    assert (w.precision, w.base_dtype_bytes, w.micro_batch, w.parallel) == ("bf16", 2.0, 4, 1)
    assert c["weights"] == 2 * (BASE_8B)                  # frozen base in bf16 (adapters on a GPU)
    assert c["trainable"] == c["gradients"] == 4 * LORA_8B == 167_772_160
    assert c["optimizer"] == 8 * LORA_8B                  # AdamW: two fp32 moments
    # activations: 6h + 2kv + 4I elements (training/memory.py) + r=16 x 7 LoRA intermediates, 2.8 bytes each
    per_layer = (6 * 4096 + 2 * 1024 + 4 * 14336 + 16 * 7) * ACT_BYTES["half_base"]
    assert layer_bytes(LLAMA8B, LORA_COUNTS, w) == pytest.approx(per_layer)
    tokens = 4 * 512
    # 32 layers kept + one layer's worth for the backward's working set + embeddings/final norm (3 x hidden, bf16)
    assert c["activations"] == pytest.approx(tokens * per_layer * 33 + tokens * 4096 * 2 * 3, abs=2)
    # chunked head: 256 rows x vocab (fp32 + two half copies) + d(hidden) and hidden of the 2048 rows in fp32
    assert c["logits"] == 256 * 128256 * 8 + tokens * 4096 * 8
    assert c["kv_cache"] == 0
    assert 0.5 * 2**30 < c["overhead"] - 0.08 * (est.total - c["overhead"]) < 1.01 * 2**30
    assert est.fits and est.capacity == 80 * 10**9
    assert any("sdpa" in n for n in est.notes)


def test_nf4_storage_matches_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    lin = torch.nn.Linear(1024, 512, bias=False)
    for dq in (False, True):
        w = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, compress_statistics=dq, quant_type="nf4")
        try:
            w = w.to("cpu")  # quantizes (bitsandbytes >= 0.45 has CPU kernels)
        except Exception as exc:  # noqa: BLE001
            pytest.skip(f"bitsandbytes cannot quantize on this CPU: {exc}")
        qs = w.quant_state
        stored = [w.data, qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code, qs.offset] if qs.nested else [])
        actual = sum(t.numel() * t.element_size() for t in stored)
        assert nf4_bytes(1024 * 512, dq) == actual


def test_qlora_weights_nf4_with_double_quant():
    est, w = plan(("method.name=qlora",), counts=QLORA_COUNTS)
    assert w.quantized and w.double_quant
    q = nf4_bytes(LINEAR_8B, True, 7 * 32)
    assert q == pytest.approx(LINEAR_8B * (0.5 + 1 / 64 + 4 / 64 / 256), rel=1e-4)
    rest = BASE_8B - LINEAR_8B  # embeddings, head, norms: upcast to fp32 by prepare_model_for_kbit_training
    largest = 4096 * 14336 * 2  # the largest linear dequantized to bf16 for its matmul
    assert est.components["weights"] == q + 4 * rest + largest
    assert est.components["weights"] < plan()[0].components["weights"] / 2


def test_fsdp_on_8_ranks_divides_model_states_by_8():
    one, _ = plan(("method.name=full",), counts=FULL_COUNTS, world=1)
    eight, w = plan(("method.name=full", "train.distributed.strategy=fsdp"), counts=FULL_COUNTS, world=8)
    assert w.strategy == "fsdp" and w.world == 8
    for k in ("trainable", "gradients", "optimizer"):
        assert eight.components[k] == -(-one.components[k] // 8)
    lp = layer_params(LLAMA8B)
    gathered = (2 * lp + 2 * EMB_8B + 4096) * 2 + lp * 4  # two layers + root in bf16, one layer's fp32 grad
    assert eight.components["weights"] == -(-one.components["weights"] // 8) + gathered
    assert eight.total < one.total / 3


def test_deepspeed_zero_stages_and_offload():
    z2, _ = plan(("method.name=full", "train.distributed.strategy=deepspeed"), counts=FULL_COUNTS, world=8)
    z3, _ = plan(("method.name=full", "train.distributed.strategy=deepspeed",
                  "train.distributed.deepspeed.zero_stage=3"), counts=FULL_COUNTS, world=8)
    off, _ = plan(("method.name=full", "train.distributed.strategy=deepspeed", "train.distributed.deepspeed.zero_stage=3",
                   "train.distributed.deepspeed.offload_optimizer=cpu", "train.distributed.deepspeed.offload_params=cpu"),
                  counts=FULL_COUNTS, world=8)
    # ZeRO-2: bf16 model copy on every rank, fp32 master + 2 moments / 8
    assert z2.components["trainable"] == 2 * BASE_8B
    assert z2.components["optimizer"] == -(-12 * BASE_8B // 8)
    assert z3.components["trainable"] == -(-2 * BASE_8B // 8)
    assert off.components["optimizer"] == 0 and off.host["optimizer"] == z3.components["optimizer"]
    assert off.components["trainable"] == 0 and off.total < z3.total < z2.total


def test_checkpointing_and_budget_reduce_activations():
    kept, w = plan(("data.max_length=4096",))
    ckpt, _ = plan(("data.max_length=4096", "train.gradient_checkpointing=true"))
    assert ckpt.components["activations"] < kept.components["activations"] / 8
    from tunesmith.training.memory import layers_to_recompute

    tokens = 4 * 4096
    fp32_per = layer_elements_per_token(LLAMA8B) * 4  # training decides with its fp32 figure
    for budget_mb in (20000, 60000, 150000):
        bud, wb = plan(("data.max_length=4096", f"train.activation_memory_mb={budget_mb}"))
        k = layers_to_recompute(tokens, 32, fp32_per, 4096, budget_mb * 2**20)
        assert 0 < k < 32
        assert recomputed_layers(LLAMA8B, wb) == k
        assert ckpt.components["activations"] < bud.components["activations"] < kept.components["activations"]


def test_dpo_pairs_double_activations_and_generation_adds_only_beyond_the_step():
    sft, _ = plan(("train.batch_size=2",))
    dpo, w = plan(("objective.name=dpo", "train.batch_size=2"))
    assert (w.sequences_per_example, w.micro_batch, w.parallel) == (2, 2, 1)
    _, w_cpu = plan(("objective.name=dpo", "train.batch_size=2"), device=CPU)
    assert (w_cpu.micro_batch, w_cpu.parallel) == (2, 1)  # recipes/dpo.py: padded pairs even where auto is example
    assert dpo.components["activations"] == pytest.approx(2 * sft.components["activations"], rel=0.01)
    assert dpo.components["logits"] > sft.components["logits"]  # unchunked preference log-probs
    task = {"name": "t", "kind": "generation", "path": "x.jsonl", "batch_size": 64, "max_new_tokens": 2048}
    c = cfg()
    data = c.model_dump()
    data["eval"] = {"during_training": True, "tasks": [task]}
    w2 = resolve_workload(parse_config(data), H100)
    gen = estimate_memory(LLAMA8B, LORA_COUNTS, w2, H100)
    need = 64 * (512 + 2048) * 2 * 32 * 1024 * 2 + 64 * 128256 * 4
    base = estimate_memory(LLAMA8B, LORA_COUNTS, resolve_workload(cfg(), H100), H100).components
    assert gen.components["kv_cache"] == max(0, need - (base["activations"] + base["logits"] + base["gradients"]))
    assert gen.components["kv_cache"] > 0


def test_8bit_optimizer_about_2_bytes_and_cpu_micro_batches():
    est, _ = plan(("train.optimizer=adamw_8bit",))
    assert est.components["optimizer"] == int((2 + 8 / 256) * LORA_8B)
    assert any("paged" in n for n in plan(("train.optimizer=paged_adamw_8bit",))[0].notes)
    # CPU, micro_batch auto = example: 2 examples at once when the step divides, 1 when it does not
    _, w = plan(device=CPU)
    assert (w.precision, w.base_dtype_bytes, w.micro_batch, w.parallel) == ("fp32", 4.0, 1, 2)
    _, w = plan(("train.batch_size=3",), device=CPU)
    assert w.parallel == 1


# --- the activation figure against what autograd saves ----------------------------------------------
def _tiny(layers: int, lora: bool, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024,
                         attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    if lora:
        model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "gate_proj", "up_proj", "down_proj"]))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # training/device.py trainable_in_fp32
    return model, config


def _saved_bytes(model, tokens: int, autocast: bool) -> int:
    """Bytes of the distinct tensors autograd saves in one decoder forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    ids = torch.randint(0, 512, (1, tokens))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        base.model(input_ids=ids, use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize("case", ["lora-fp32", "full-fp32", "lora-bf16-base"])
def test_activation_figure_matches_saved_tensor_hooks(case):
    lora, dtype = case.startswith("lora"), (torch.bfloat16 if "bf16" in case else torch.float32)
    tokens = 192
    small, config = _tiny(2, lora, dtype)
    big, _ = _tiny(6, lora, dtype)
    measured = (_saved_bytes(big, tokens, dtype != torch.float32)
                - _saved_bytes(small, tokens, dtype != torch.float32)) / 4 / tokens  # per layer per token
    shape = ModelShape.from_config(config)
    counts = ParamCounts(base=1, added=1 if lora else 0, trainable=1, quantized=0, embedding=0, head=0)
    device = H100 if dtype != torch.float32 else CPU
    over = ["method.name=lora", "method.r=8"] if lora else ["method.name=full"]
    w = resolve_workload(cfg(*over), device)
    assert w.base_dtype_bytes == (2 if dtype != torch.float32 else 4)
    assert layer_bytes(shape, counts, w) == pytest.approx(measured, rel=0.20)


def test_qlora_on_cpu_counts_the_mapped_checkpoint_and_workload_reads_the_model_config():
    from transformers import LlamaConfig

    lora, _ = plan(device=CPU)
    qlora, w = plan(("method.name=qlora",), counts=QLORA_COUNTS, device=CPU)
    assert w.checkpoint_dtype_bytes == 2.0  # no config: a hub checkpoint's bf16
    slack = lambda e: int(0.10 * (e.components["activations"] + e.components["logits"]))  # noqa: E731
    assert qlora.components["overhead"] - slack(qlora) == lora.components["overhead"] - slack(lora) + 2 * BASE_8B
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=256, dtype="float32")
    w = resolve_workload(cfg("method.target_modules=all-linear"), CPU, model_config=config)
    assert w.lora_targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert w.checkpoint_dtype_bytes == 4.0 and w.lora_r == 16
    assert resolve_workload(cfg("method.name=full"), CPU, model_config=config).lora_targets == ()
