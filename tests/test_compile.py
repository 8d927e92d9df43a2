"""train.compile: torch.compile of the decoder layers trains to the uncompiled losses and weights, keeps
the saved names, and is refused (not skipped) where inductor cannot build kernels."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_llama, train_tiny_run
from tunesmith.config import MethodSection, load_config
from tunesmith.errors import ConfigError
from tunesmith.methods import get_method
from tunesmith.recipes.sft import prepare_model
from tunesmith.training.device import choose_placement, compile_problem
from tunesmith.training.logging import read_metrics


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test traces its own graphs (dynamo keeps compiled code per process), counted from 0."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def losses(run):
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("options", [
    ("train.micro_batch=auto",),  # on CPU: unpadded examples of every length, two at once on threads
    ("train.micro_batch=batch", "train.gradient_checkpointing=true"),  # padded; checkpointing wraps the layer
    ("train.activation_memory_mb=0.05",),  # the budget recomputes some compiled layers in the backward
])
def test_compiled_training_gives_the_uncompiled_losses_and_weights(options, tiny_model_dir, tmp_path):
    from torch._dynamo.utils import counters

    plain = train_tiny_run(tiny_model_dir, tmp_path, "plain", *options)
    assert not counters["stats"]["unique_graphs"]
    compiled = train_tiny_run(tiny_model_dir, tmp_path, "compiled", *options, "train.compile=true")
    assert counters["stats"]["unique_graphs"] >= 1  # the layers did run compiled
    assert losses(compiled) == pytest.approx(losses(plain), rel=1e-4)
    a, b = (load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in (plain, compiled))
    assert a.keys() == b.keys()  # no compile wrapper in the saved names
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4)  # Adam's first steps amplify rounding
    assert losses(plain)[-1] < losses(plain)[0]  # the steps trained something to compare


def test_compiled_layers_keep_their_names():
    model = get_method("lora").build(tiny_llama(256), MethodSection(r=4))
    keys = list(model.state_dict())
    cfg = load_config(None, ["train.compile=true"])
    prepare_model(model, cfg, choose_placement("fp32"))
    assert list(model.state_dict()) == keys
    layers = model.get_base_model().model.layers
    assert all(hasattr(layer.forward, "_torchdynamo_orig_callable") for layer in layers)  # compiled, unrun


def test_compile_is_refused_where_inductor_cannot_build_kernels(monkeypatch):
    import importlib.util

    import torch._inductor.cpp_builder

    def no_compiler():
        raise RuntimeError("no g++")

    assert compile_problem(torch.device("cpu")) is None  # this machine has one: the tests above compiled
    monkeypatch.setattr(torch._inductor.cpp_builder, "get_cpp_compiler", no_compiler)
    model = get_method("lora").build(tiny_llama(256), MethodSection(r=4))
    with pytest.raises(ConfigError, match=r"train.compile=true cannot work here: .*C\+\+ compiler.*train.compile=false"):
        prepare_model(model, load_config(None, ["train.compile=true"]), choose_placement("fp32"))
    prepare_model(model, load_config(None, []), choose_placement("fp32"))  # nothing asked, nothing refused

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    assert "triton" in compile_problem(torch.device("cuda"))
