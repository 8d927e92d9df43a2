"""The DPO recipe on a tiny model: every loss trains, the reference needs no second model, and
held-out preference accuracy rises on a learnable preference."""
import json
import math

import pytest
import torch

from conftest import write_jsonl
from tunesmith.config import load_config
from tunesmith.data.dataset import load_examples
from tunesmith.demo.orders import make_splits
from tunesmith.methods import get_method
from tunesmith.models.load import load_model
from tunesmith.recipes.dpo import (PairItem, PreferenceLoss, collate_pairs, encode_pairs, precompute_reference,
                                   run_dpo)
from tunesmith.training.logging import read_metrics


def pairs(seed, n):
    """Chosen: the right JSON; rejected: the same JSON with the wrong city (a learnable preference)."""
    rows = []
    for r in make_splits(seed, {"train": n})["train"]:
        answer = json.loads(r["messages"][2]["content"])
        wrong = dict(answer, city="Atlantis")
        rows.append({"prompt": r["messages"][:2], "chosen": [{"role": "assistant", "content": json.dumps(answer)}],
                     "rejected": [{"role": "assistant", "content": json.dumps(wrong)}]})
    return rows


@pytest.fixture
def pref_data(tmp_path):
    return {"train": write_jsonl(tmp_path / "p_train.jsonl", pairs(21, 24)),
            "validation": write_jsonl(tmp_path / "p_val.jsonl", pairs(22, 12))}


def cfg(model_dir, data, out, *extra):
    return load_config(None, [f"model.name={model_dir}", f"data.train={data['train']}",
                              f"data.validation={data['validation']}", f"run.output_dir={out}", "run.name=d",
                              "objective.name=dpo", "train.batch_size=4", "method.r=8", *extra])


def test_dpo_raises_held_out_preference_accuracy(tiny_model_dir, pref_data, tmp_path):
    run = run_dpo(cfg(tiny_model_dir, pref_data, tmp_path, "train.max_steps=24", "train.lr=1e-2",
                      "train.eval_every=8", "objective.beta=0.5"))
    m = json.loads((run / "manifest.json").read_text())
    start, end = m["preference_accuracy"]["start"], m["preference_accuracy"]["end"]
    assert end["val_preference_accuracy"] > start["val_preference_accuracy"] + 0.2
    # reward accuracy starts at 0 by construction; the policy's own preference starts where the base
    # model is and must rise too (it is a measure that could stay flat)
    assert start["val_preference_accuracy"] == 0 and 0 < start["val_policy_prefers_chosen"] < 1
    assert end["val_policy_prefers_chosen"] > start["val_policy_prefers_chosen"]
    assert end["val_loss"] < start["val_loss"]
    assert m["reference"] == "adapter-disabled base"
    rows = read_metrics(run / "metrics.jsonl")
    assert rows[0]["step"] == 0 and "val_preference_accuracy" in rows[0]
    logged = [r for r in rows if "loss" in r]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(logged[-1])
    assert logged[-1]["rewards/margins"] > logged[0]["rewards/margins"]
    # the plot gets a fourth panel (preference accuracy and margin): taller than an SFT run's 3 panels
    png = (run / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[20:24], "big") > 1000


@pytest.mark.parametrize("loss", ["sigmoid", "robust", "ipo", "simpo", "orpo", "kto"])
def test_every_loss_trains_a_few_steps(loss, tiny_model_dir, pref_data, tmp_path):
    extra = ["objective.label_smoothing=0.1"] if loss == "robust" else []
    run = run_dpo(cfg(tiny_model_dir, pref_data, tmp_path, f"objective.loss={loss}", "train.max_steps=3",
                      "train.lr=1e-3", *extra))
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 3 and all(r["loss"] == r["loss"] for r in rows)  # finite numbers, no NaN
    assert "rewards/chosen" in rows[-1]


def test_precomputed_reference_equals_adapter_disabled_base(tiny_model_dir, pref_data, tiny_tokenizer):
    from tunesmith.config import ObjectiveSection, MethodSection

    examples = load_examples(pref_data["train"]).examples
    items = encode_pairs(tiny_tokenizer, examples, 256, "t")[:4]
    base = load_model(tiny_model_dir)
    cache = precompute_reference(base, items, tiny_tokenizer.pad_token_id, 2)
    model = get_method("lora").build(base, MethodSection(r=4))
    with torch.no_grad():  # give the adapter weight so that "disabled" matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    batch = collate_pairs(items, tiny_tokenizer.pad_token_id)
    live = PreferenceLoss(ObjectiveSection(name="dpo"), None)._reference(model, batch)
    cached = PreferenceLoss(ObjectiveSection(name="dpo"), cache)._reference(model, batch)
    torch.testing.assert_close(live, cached.to(live.dtype), rtol=1e-5, atol=1e-5)


def test_sft_rows_are_refused_for_dpo(tiny_model_dir, order_data, tmp_path):
    from tunesmith.errors import DataError

    with pytest.raises(DataError, match="needs preference rows"):
        run_dpo(cfg(tiny_model_dir, order_data, tmp_path, "train.max_steps=1"))


def test_interrupted_dpo_resumes_to_the_uninterrupted_result(tiny_model_dir, pref_data, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from tunesmith.recipes import dpo

    args = ("train.max_steps=6", "train.lr=1e-2", "train.save_every=2", "train.eval_every=3")
    whole = run_dpo(cfg(tiny_model_dir, pref_data, tmp_path / "a", *args))
    calls, real = {"n": 0}, dpo.PreferenceLoss.__call__

    def interrupt_in_step_4(self, model, batch):
        calls["n"] += model.training              # one micro-batch per step; evaluations run in eval mode
        if calls["n"] == 4 and model.training:
            raise KeyboardInterrupt
        return real(self, model, batch)
    monkeypatch.setattr(dpo.PreferenceLoss, "__call__", interrupt_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        run_dpo(cfg(tiny_model_dir, pref_data, tmp_path / "b", *args))
    monkeypatch.setattr(dpo.PreferenceLoss, "__call__", real)
    staging = next((tmp_path / "b").glob(".d.incomplete-*"))
    staging.rename(staging.with_name(".d.incomplete-999999"))  # as if left by a process that has exited
    resumed = run_dpo(cfg(tiny_model_dir, pref_data, tmp_path / "b", *args), resume=True)
    a, b = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (whole, resumed))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    steps = [r["step"] for r in read_metrics(resumed / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps)) == list(range(1, 7))   # steps after the checkpoint are not logged twice


# (full fine-tuning reads no rank: method.r goes back to its default)
@pytest.mark.parametrize("setup", [("method.name=full", "method.r=16"), ("objective.reference=precomputed",), ()])
def test_first_step_loss_is_log2_whatever_the_reference(setup, tiny_model_dir, pref_data, tmp_path):
    """At the first step the policy is the reference, so every pair's sigmoid-DPO loss is log 2.
    With validation pairs numbered like training pairs, the precomputed reference of training
    pairs was overwritten by validation pairs' and the first loss was another number; the
    adapter-disabled base computed on the fly (the last case) is the cross-check."""
    run = run_dpo(cfg(tiny_model_dir, pref_data, tmp_path, "train.max_steps=1", "train.batch_size=24",
                      "train.lr=1e-3", *setup))
    rows = read_metrics(run / "metrics.jsonl")
    first = next(r for r in rows if "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[0]["step"] == 0 and rows[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-5)
    m = json.loads((run / "manifest.json").read_text())
    assert m["reference"] == ("adapter-disabled base" if not setup else "precomputed")


def test_training_and_validation_pairs_are_numbered_apart(tiny_tokenizer, pref_data):
    train = load_examples(pref_data["train"]).examples
    items = encode_pairs(tiny_tokenizer, train, 256, "t")
    val = encode_pairs(tiny_tokenizer, load_examples(pref_data["validation"]).examples, 256, "v",
                       first_index=len(train))
    assert not {it.index for it in items} & {it.index for it in val}
    with pytest.raises(ValueError, match="repeat"):
        precompute_reference(None, items[:2] + items[:1], tiny_tokenizer.pad_token_id, 2)


def _loss_grads(model, batch, objective):
    model.zero_grad()
    loss, _ = PreferenceLoss(objective, None)(model, batch)
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prompt_learning_methods_get_a_preference_gradient(method, tiny_model_dir, pref_data, tiny_tokenizer):
    """Prefix and prompt tuning act inside PEFT's forward: a loss computed on the bare decoder
    would leave their virtual tokens without a gradient (training nothing, silently)."""
    from tunesmith.config import MethodSection, ObjectiveSection

    items = encode_pairs(tiny_tokenizer, load_examples(pref_data["train"]).examples, 256, "t")[:4]
    model = get_method(method).build(load_model(tiny_model_dir), MethodSection(name=method, num_virtual_tokens=4))
    model.train()
    loss, grads = _loss_grads(model, collate_pairs(items, tiny_tokenizer.pad_token_id), ObjectiveSection(name="dpo"))
    # the reference is the adapter-disabled base: the loss is log 2 only if the virtual tokens do nothing
    assert abs(loss - math.log(2)) > 1e-3
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and set(grads) == trainable and all(float(g.abs().sum()) > 0 for g in grads.values())


def test_activation_budget_recomputes_layers_with_the_same_gradients(tiny_model_dir, pref_data, tiny_tokenizer):
    """train.activation_memory_mb applies to preference training too (it was installed and never used)."""
    from tunesmith.config import MethodSection, ObjectiveSection
    from tunesmith.training.memory import install_budget

    items = encode_pairs(tiny_tokenizer, load_examples(pref_data["train"]).examples, 256, "t")[:4]
    batch = collate_pairs(items, tiny_tokenizer.pad_token_id)
    model = get_method("lora").build(load_model(tiny_model_dir), MethodSection(r=4))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    model.train()
    obj = ObjectiveSection(name="dpo")
    loss, plain = _loss_grads(model, batch, obj)
    budget = install_budget(model, 0.01)
    loss_b, budgeted = _loss_grads(model, batch, obj)
    assert budget.recomputed_layers > 0 and loss_b == pytest.approx(loss, abs=1e-6)
    for name in plain:
        torch.testing.assert_close(budgeted[name], plain[name], rtol=1e-5, atol=1e-6)


def test_dpo_honours_threads_and_trackers(tiny_model_dir, pref_data, tmp_path):
    pytest.importorskip("tensorboard")
    before = torch.get_num_threads()
    try:
        run = run_dpo(cfg(tiny_model_dir, pref_data, tmp_path, "train.max_steps=1", "train.threads=1",
                          "train.trackers=[tensorboard]"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
