"""methods/peft_methods.lean_lora_inference: plain PEFT LoRA layers run a lean forward that gives
PEFT's outputs bit for bit (fp32 and bf16 bases), every other layer and state keeps PEFT's own
forward, the model is left as it was found, and the RL sampler samples the same completions."""
import contextlib

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear

from conftest import tiny_llama
from tunesmith.methods.peft_methods import lean_lora_inference
from tunesmith.testing import randomise_lora

IDS = torch.tensor([[5, 9, 3, 17, 2, 44, 8], [7, 7, 1, 60, 33, 12, 4]])


def lora_model(dtype=torch.float32, **config):
    model = get_peft_model(tiny_llama(100).to(dtype), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                   **config))
    randomise_lora(model, 0, 0.1)  # a real delta: PEFT starts B at zero
    return model.eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_layers_give_pefts_outputs_bit_for_bit(dtype):
    model = lora_model(dtype)
    layers = [m for m in model.modules() if type(m) is LoraLinear]
    peft_out = logits(model)
    with lean_lora_inference(model) as n:
        assert n == len(layers) == 14  # 2 layers x 7 linear modules
        assert all("forward" in vars(m) for m in layers)
        lean_out = logits(model)
        with model.disable_adapter():  # the reference pass inside: PEFT's own forward, the base alone
            base_out = logits(model)
    assert torch.equal(lean_out, peft_out)
    assert not any("forward" in vars(m) for m in model.modules())  # left as found
    with model.disable_adapter():
        assert torch.equal(base_out, logits(model))
    assert not torch.equal(base_out, peft_out)


def test_layers_that_are_not_plain_lora_keep_pefts_forward():
    dora = lora_model(use_dora=True)
    with lean_lora_inference(dora) as n:
        assert n == 0
    dropout = lora_model(lora_dropout=0.5).train()  # an active dropout draws masks: PEFT's path
    with lean_lora_inference(dropout) as n:
        assert n == 0
    dropout.eval()
    with lean_lora_inference(dropout) as n:
        assert n == 14
    with lean_lora_inference(torch.nn.Linear(3, 3)) as n:  # no adapters at all
        assert n == 0


def test_a_state_changed_inside_goes_back_to_pefts_forward():
    model = lora_model()
    with lean_lora_inference(model):
        model.base_model.disable_adapter_layers()
        off = logits(model)
        model.base_model.enable_adapter_layers()
        on = logits(model)
    with model.disable_adapter():
        assert torch.equal(off, logits(model))
    assert torch.equal(on, logits(model))


def test_the_sampler_samples_the_same_completions_lean(monkeypatch):
    from tunesmith.training import rollout

    model = lora_model(torch.bfloat16)
    prompts, seeds = [[5, 9, 3, 17], [7, 1]], [11, 12, 13, 14]
    lean = rollout.sample(model, prompts, seeds, 12, set(), 0, temperature=0.9, repeats=2)
    monkeypatch.setattr(rollout, "lean_lora_inference", lambda m: contextlib.nullcontext(0))
    assert rollout.sample(model, prompts, seeds, 12, set(), 0, temperature=0.9, repeats=2) == lean
