"""models/packed.packed_linears: a frozen bf16 base's linear layers on weights reordered once for
oneDNN give F.linear's outputs bit for bit, fall back to F.linear whenever the packed weight could be
wrong (autograd, autocast off bf16, another dtype, a changed or replaced weight), pack nothing that
is trained, sharded, fp32 or hooked, leave the model as found, and the sampler samples the same
completions with and without them."""
import contextlib
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import tiny_llama
from tunesmith.models import packed
from tunesmith.models.packed import packed_linears
from tunesmith.testing import randomise_lora

pytestmark = pytest.mark.skipif(not packed.supported(), reason="no oneDNN bf16 linear on this CPU")

IDS = torch.tensor([[5, 9, 3, 17, 2, 44, 8], [7, 7, 1, 60, 33, 12, 4]])


def frozen_bf16(vocab=100):
    model = tiny_llama(vocab).to(torch.bfloat16).eval()
    model.requires_grad_(False)
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def linears(model):
    return [m for m in model.modules() if type(m) is torch.nn.Linear]


def test_packed_layers_give_the_same_logits_bit_for_bit(monkeypatch):
    model = frozen_bf16()
    plain = logits(model)

    def no_fallback(*args):
        raise AssertionError("a packed layer fell back to F.linear")

    monkeypatch.setattr(packed, "F", SimpleNamespace(linear=no_fallback))  # the packed path, every layer
    with packed_linears(model, rows=2) as n:
        assert n == len(linears(model)) == 2 * 7 + 1  # 7 per decoder layer and the (tied) LM head
        assert all("forward" in vars(m) for m in linears(model))
        for ids in (IDS, IDS[:1, :1], IDS.repeat(5, 1)):  # rows other than the hint
            assert torch.equal(logits(model, ids), logits_plain(model, ids))
        assert torch.equal(logits(model), plain)
    assert not any("forward" in vars(m) for m in model.modules())  # left as found


def logits_plain(model, ids):
    """The same forward with every linear layer on F.linear (the packed forwards bypassed)."""
    saved = {m: vars(m).pop("forward") for m in linears(model) if "forward" in vars(m)}
    try:
        return logits(model, ids)
    finally:
        for m, f in saved.items():
            m.forward = f


def test_a_bias_is_applied_as_f_linear_does():
    layer = torch.nn.Linear(48, 40, bias=True).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(3, 5, 48, dtype=torch.bfloat16)
    want = layer(x)
    with packed_linears(layer) as n, torch.no_grad():
        assert n == 1
        assert torch.equal(layer(x), want)
        layer.bias.add_(1)  # changed in place (a merge that folds a bias in): F.linear with the new one
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
        assert not torch.equal(layer(x), want)


def test_it_falls_back_wherever_the_packed_weight_could_be_wrong():
    layer = torch.nn.Linear(32, 32, bias=False).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    with packed_linears(layer) as n:
        assert n == 1
        with torch.no_grad():
            layer.weight.mul_(2)  # changed in place (merged adapter, a load): the packed copy is stale
            assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight))
            layer.weight = torch.nn.Parameter(torch.ones_like(layer.weight), requires_grad=False)  # replaced
            assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight))
            with pytest.raises(RuntimeError):  # another dtype: F.linear's own error, not a packed result
                layer(x.float())
        y = layer(x.requires_grad_())  # autograd: F.linear, so gradients reach x
        y.sum().backward()
        assert x.grad is not None


def test_trained_fp32_hooked_or_non_linear_layers_are_not_packed():
    with packed_linears(tiny_llama(100).requires_grad_(False)) as n:  # fp32
        assert n == 0
    trained = tiny_llama(100).to(torch.bfloat16)  # bf16 but requires_grad
    with packed_linears(trained) as n:
        assert n == 0
    hooked = frozen_bf16()
    hooked.lm_head.register_forward_hook(lambda *a: None)
    with packed_linears(hooked) as n:
        assert n == 2 * 7
    lora = get_peft_model(tiny_llama(100).to(torch.bfloat16), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with packed_linears(lora) as n:  # the frozen base layers and the head, not the fp32 adapters
        assert n == 2 * 7 + 1
        assert all("forward" not in vars(m) for name, m in lora.named_modules() if "lora_" in name)


def test_packed_and_lean_lora_together_give_pefts_logits():
    from tunesmith.methods.peft_methods import lean_lora_inference

    model = get_peft_model(tiny_llama(100).to(torch.bfloat16), LoraConfig(r=4, lora_alpha=8,
                                                                           target_modules="all-linear"))
    randomise_lora(model, 0, 0.1)
    model.eval()
    peft_out = logits(model)
    with packed_linears(model, 2), lean_lora_inference(model) as lean:
        assert lean == 14
        assert torch.equal(logits(model), peft_out)


def test_the_sampler_samples_the_same_completions_packed_or_not(monkeypatch):
    from tunesmith.training import rollout

    model = get_peft_model(tiny_llama(100).to(torch.bfloat16), LoraConfig(r=4, lora_alpha=8,
                                                                           target_modules="all-linear"))
    randomise_lora(model, 0, 0.1)
    prompts, seeds = [[5, 9, 3, 17], [7, 1]], [11, 12, 13, 14]
    calls = []
    real = rollout.packed_linears

    def counting(m, rows):
        calls.append(rows)
        return real(m, rows)

    monkeypatch.setattr(rollout, "packed_linears", counting)
    with_packing = rollout.sample(model, prompts, seeds, 12, set(), 0, temperature=0.9, repeats=2)
    assert calls == [4]
    monkeypatch.setattr(rollout, "packed_linears", lambda m, rows: contextlib.nullcontext(0))
    assert rollout.sample(model, prompts, seeds, 12, set(), 0, temperature=0.9, repeats=2) == with_packing
