"""model.attn_implementation: auto picks the kernel that runs here and says why, an explicit choice that
cannot run is refused before any weights load, the recipes load the model with the choice, and the
implementations agree on the loss. GPUs and flash-attn are mocked: only the resolver sees them."""
import sys
import types

import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import write_jsonl
from tunesmith.config import load_config
from tunesmith.data.batching import collate
from tunesmith.data.tokenize import encode_dataset
from tunesmith.demo.orders import make_splits
from tunesmith.errors import ConfigError
from tunesmith.models.attention import choose_attention
from tunesmith.models.load import causal_lm_class, load_model
from tunesmith.training.device import choose_placement
from tunesmith.training.losses import sft_loss_sum

CPU = torch.device("cpu")


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch reports a bf16-capable CUDA GPU (nothing may actually run on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.fixture
def flash_attn_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))


@pytest.fixture
def flash_attn_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # `import flash_attn` raises ImportError


class NoFlash(LlamaForCausalLM):
    _supports_flash_attn = False


class NeitherKernel(LlamaForCausalLM):
    _supports_flash_attn = False
    _supports_sdpa = False


def test_auto_on_cpu_resolves_to_sdpa(flash_attn_installed):
    placement = choose_placement("auto")
    assert placement.device == CPU
    attention = choose_attention("auto", placement.device, placement.dtype, LlamaForCausalLM)
    assert attention.name == "sdpa" and attention.describe() == "sdpa (no CUDA GPU)"
    assert choose_attention("auto", CPU, torch.float32, NeitherKernel).name == "eager"
    assert choose_attention("eager", CPU, torch.float32, LlamaForCausalLM).describe() == "eager (as configured)"


def test_auto_on_a_bf16_gpu_with_flash_attn_resolves_to_flash_attention_2(fake_gpu, flash_attn_installed):
    placement = choose_placement("auto")
    assert (placement.device.type, placement.precision) == ("cuda", "bf16")
    attention = choose_attention("auto", placement.device, placement.dtype, LlamaForCausalLM)
    assert attention.name == "flash_attention_2" and "bf16" in attention.reason
    assert choose_attention("flash_attention_2", placement.device, placement.dtype, LlamaForCausalLM).name == \
        "flash_attention_2"
    # each thing flash-attn needs, missing on its own, falls back to sdpa and says which
    fp32 = choose_placement("fp32")
    assert choose_attention("auto", fp32.device, fp32.dtype, LlamaForCausalLM).describe() == \
        "sdpa (fp32 training; flash-attn needs bf16/fp16)"
    assert choose_attention("auto", placement.device, torch.float16, NoFlash).describe() == \
        "sdpa (NoFlash does not support flash-attn)"
    assert choose_attention("auto", placement.device, torch.bfloat16, NeitherKernel).name == "eager"


def test_auto_on_a_gpu_without_flash_attn_says_so(fake_gpu, flash_attn_missing):
    placement = choose_placement("auto")
    assert choose_attention("auto", placement.device, placement.dtype, LlamaForCausalLM).describe() == \
        "sdpa (flash-attn not installed)"
    with pytest.raises(ConfigError, match=r"model.attn_implementation=flash_attention_2 .*pip install flash-attn"):
        choose_attention("flash_attention_2", placement.device, placement.dtype, LlamaForCausalLM)


def test_explicit_choices_that_cannot_run_are_refused(flash_attn_installed):
    with pytest.raises(ConfigError, match=r"model.attn_implementation=flash_attention_2 .*CUDA GPU.*runs on cpu"):
        choose_attention("flash_attention_2", CPU, torch.float32, LlamaForCausalLM)
    with pytest.raises(ConfigError, match=r"model.attn_implementation=flash_attention_2 .*train.precision=bf16"):
        choose_attention("flash_attention_2", torch.device("cuda"), torch.float32, LlamaForCausalLM)
    with pytest.raises(ConfigError, match=r"model.attn_implementation=sdpa: NeitherKernel .*eager"):
        choose_attention("sdpa", CPU, torch.float32, NeitherKernel)
    with pytest.raises(ConfigError, match=r"unknown attention 'spda'.*did you mean 'sdpa'"):
        load_config(None, ["model.attn_implementation=spda"])


def test_the_model_class_is_known_before_loading(tiny_model_dir):
    assert causal_lm_class(tiny_model_dir) is LlamaForCausalLM


def test_eager_and_sdpa_give_the_same_loss_and_gradients(tiny_model_dir, tiny_tokenizer):
    from tunesmith.data.records import Example

    rows = make_splits(4, {"train": 4})["train"]
    examples = [Example("chat", f"t:{i}", "messages", messages=r["messages"]) for i, r in enumerate(rows)]
    items = encode_dataset(tiny_tokenizer, examples, 512, "test")
    batch = collate(items, tiny_tokenizer.pad_token_id)  # rows of different lengths, padded as in training
    assert (batch["attention_mask"] == 0).any()
    results = {}
    for name in ("eager", "sdpa"):
        model = load_model(tiny_model_dir, attention=name)
        assert model.config._attn_implementation == name  # load_model passed it on
        loss_sum, count = sft_loss_sum(model, batch)
        loss = loss_sum / count
        loss.backward()
        results[name] = (loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert results["eager"][0] == pytest.approx(results["sdpa"][0], rel=1e-5)
    torch.testing.assert_close(results["eager"][1], results["sdpa"][1], rtol=1e-4, atol=1e-5)


class Loaded(Exception):
    pass


def recipe_config(objective, model_dir, tmp_path, *extra):
    if objective == "dpo":
        rows = [{"prompt": r["messages"][:2], "chosen": [r["messages"][2]],
                 "rejected": [{"role": "assistant", "content": "no"}]} for r in make_splits(5, {"train": 4})["train"]]
    else:
        rows = make_splits(5, {"train": 4})["train"]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    return load_config(None, [f"model.name={model_dir}", f"data.train={train}", f"run.output_dir={tmp_path}",
                              f"objective.name={objective}", *extra])


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_recipes_load_the_model_with_the_resolved_attention_and_say_why(objective, tiny_model_dir, tmp_path,
                                                                        monkeypatch, capsys):
    import tunesmith.models.load
    import tunesmith.recipes.sft
    from tunesmith.recipes import get_recipe

    seen = {}

    def load_model(path, **kwargs):
        seen.update(kwargs)
        raise Loaded

    monkeypatch.setattr(tunesmith.recipes.sft, "load_model", load_model)  # sft imports it at module level
    monkeypatch.setattr(tunesmith.models.load, "load_model", load_model)  # dpo inside run_dpo
    with pytest.raises(Loaded):
        get_recipe(objective).run(recipe_config(objective, tiny_model_dir, tmp_path))
    assert seen["attention"] == "sdpa"
    assert "attention: sdpa (no CUDA GPU)" in capsys.readouterr().out

    eager = recipe_config(objective, tiny_model_dir, tmp_path, "model.attn_implementation=eager")
    with pytest.raises(Loaded):
        get_recipe(objective).run(eager)
    assert seen["attention"] == "eager"

    seen.clear()
    flash = recipe_config(objective, tiny_model_dir, tmp_path, "model.attn_implementation=flash_attention_2")
    with pytest.raises(ConfigError, match="model.attn_implementation=flash_attention_2 cannot run here"):
        get_recipe(objective).run(flash)
    assert not seen  # refused before loading anything


@pytest.mark.parametrize("objective", ["sft", "dpo"])
@pytest.mark.parametrize(("bf16", "precision"), [(True, "bf16"), (False, "fp16")])
def test_recipes_on_a_half_precision_gpu_load_the_frozen_base_in_it(objective, bf16, precision, tiny_model_dir,
                                                                     tmp_path, monkeypatch, flash_attn_installed):
    """Placement.frozen_dtype reaches from_pretrained in both recipes, and auto precision is bf16 where
    the GPU has it, else fp16 (which the loop then scales: Placement.grad_scaler)."""
    import tunesmith.models.load
    import tunesmith.recipes.sft
    from tunesmith.recipes import get_recipe

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    seen = {}

    def load_model(path, **kwargs):
        seen.update(kwargs)
        raise Loaded

    monkeypatch.setattr(tunesmith.recipes.sft, "load_model", load_model)
    monkeypatch.setattr(tunesmith.models.load, "load_model", load_model)
    placement = choose_placement("auto")
    assert placement.precision == precision and (placement.grad_scaler() is not None) == (precision == "fp16")
    with pytest.raises(Loaded):
        get_recipe(objective).run(recipe_config(objective, tiny_model_dir, tmp_path))
    assert seen["dtype"] == placement.dtype and seen["attention"] == "flash_attention_2"
    with pytest.raises(Loaded):
        get_recipe(objective).run(recipe_config(objective, tiny_model_dir, tmp_path, "method.name=full"))
    assert seen["dtype"] == torch.float32  # every weight trains: fp32 master weights, autocast computes
