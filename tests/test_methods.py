"""The shared method contract (after PEFT's testing_common): every method, on a tiny random Llama.

- one optimizer step changes only trainable parameters (and does change some);
- save -> load gives identical logits;
- merged equals unmerged output where the method can merge;
- disabling the adapter gives the base model's output.
"""
import pytest
import torch

from conftest import tiny_llama
from tunesmith.config import MethodSection
from tunesmith.errors import ConfigError
from tunesmith.methods import METHODS, count_parameters, get_method, save_trained
from tunesmith.models.load import attach_adapter, load_model
from tunesmith.names import allowed_values

ALL = ["full", "lora", "dora", "qlora", "ia3", "prefix", "prompt", "selective"]
MERGEABLE = {"lora", "dora", "ia3"}
ADAPTERS = {"lora", "dora", "qlora", "ia3", "prefix", "prompt"}
VOCAB = 256


def has_bnb() -> bool:
    try:
        import bitsandbytes  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_llama(VOCAB, seed=11).save_pretrained(path)
    return path


def method_cfg(name):
    return MethodSection(name=name, r=4, num_virtual_tokens=3, trainable=["norm"])


def load_base(base_dir, name):
    return load_model(base_dir, **get_method(name).load_kwargs(method_cfg(name))).eval()


def build(base_dir, name):
    torch.manual_seed(0)
    return get_method(name).build(load_base(base_dir, name), method_cfg(name))


def batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (2, 10), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model):
    with torch.no_grad():
        return model(**batch()).logits


def train_steps(model, steps=2):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    b = batch()
    for _ in range(steps):
        model(**b, labels=b["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_every_configurable_method_is_registered():
    get_method("lora")
    field = MethodSection.model_fields["name"]
    assert set(METHODS) == set(ALL) == set(allowed_values(field.annotation, field.metadata))  # config reads METHODS
    with pytest.raises(ConfigError, match="matches no parameter"):
        get_method("selective").build(tiny_llama(VOCAB), MethodSection(name="selective", trainable=["nope"]))


@pytest.fixture(params=ALL)
def name(request):
    if request.param == "qlora" and not has_bnb():
        pytest.skip("bitsandbytes is not installed")
    return request.param


def test_step_changes_only_trainable_parameters(base_dir, name):
    model = build(base_dir, name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    n_train, n_total = count_parameters(model)
    assert 0 < n_train <= n_total and (name == "full") == (n_train == n_total)
    train_steps(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and changed <= trainable


def test_save_then_load_gives_identical_logits(base_dir, name, tmp_path):
    model = build(base_dir, name)
    train_steps(model)
    expected = logits(model)
    out = save_trained(model, method_cfg(name), tmp_path)
    if name in ADAPTERS:
        assert out.name == "adapter" and (out / "adapter_model.safetensors").is_file()
        reloaded = attach_adapter(load_base(base_dir, name), out)
    else:
        assert out.name == "model" and (out / "model.safetensors").is_file()
        reloaded = load_model(out)
    torch.testing.assert_close(logits(reloaded.eval()), expected, rtol=0, atol=1e-6)


def test_merged_equals_unmerged(base_dir, name):
    if name not in MERGEABLE:
        pytest.skip(f"{name} cannot be merged into the base weights")
    model = build(base_dir, name)
    train_steps(model)
    unmerged = logits(model)
    merged = model.merge_and_unload()
    assert not hasattr(merged, "peft_config")
    torch.testing.assert_close(logits(merged), unmerged, rtol=1e-4, atol=1e-4)


def test_disabled_adapter_gives_base_output(base_dir, name):
    if name not in ADAPTERS:
        pytest.skip(f"{name} trains the weights themselves; there is no adapter to disable")
    base_logits = logits(load_base(base_dir, name))
    model = build(base_dir, name)
    train_steps(model)
    seq = base_logits.shape[1]  # prompt tuning also returns logits for its virtual tokens, first
    assert (logits(model)[:, -seq:] - base_logits).abs().max() > 1e-4  # the adapter matters...
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base_logits, rtol=0, atol=1e-6)  # ...until disabled
