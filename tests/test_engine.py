"""The training engine: normalisation by construction, exact resume, guards, early stopping,
precision and optimizer choices, prompt-learning losses."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_llama
from tunesmith.config import MethodSection, load_config
from tunesmith.data.batching import collate
from tunesmith.data.tokenize import IGNORE, Encoded
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.methods import get_method
from tunesmith.recipes.sft import run_sft
from tunesmith.training import loop
from tunesmith.training.checkpoint import checkpoint_dirs
from tunesmith.training.device import choose_placement, make_optimizer
from tunesmith.training.logging import read_metrics
from tunesmith.training.losses import reference_sft_loss, sft_loss_sum


def varied_examples(n=8, vocab=256, seed=0):
    """Sequences of very different lengths (5 to 120 tokens) with different trained shares."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = [5, 120, 17, 64, 9, 100, 33, 80][i % 8]
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        cut = max(1, length // (2 + i % 3))
        out.append(Encoded(ids, [IGNORE] * cut + ids[cut:], length))
    return out


def grads_after(model, batches):
    model.zero_grad(set_to_none=True)
    loop.accumulate(model, batches, sft_loss_sum, choose_placement("fp32"))
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_batch_8_equals_batch_2_times_accumulation_4(method):
    model = get_method(method).build(tiny_llama(256, seed=1), MethodSection(name=method, r=4))
    model.train()
    ex = varied_examples()
    whole = grads_after(model, [collate(ex, 0)])
    accum = grads_after(model, [collate(ex[i:i + 2], 0) for i in range(0, 8, 2)])
    assert whole.keys() == accum.keys() and whole
    for name in whole:
        torch.testing.assert_close(accum[name], whole[name], rtol=1e-5, atol=1e-5)
    # the naive mean of per-micro-batch means would differ: the test can tell them apart
    naive = {}
    model.zero_grad(set_to_none=True)
    for i in range(0, 8, 2):
        loss, n = sft_loss_sum(model, collate(ex[i:i + 2], 0))
        (loss / n / 4).backward()
    naive = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert max((naive[k] - whole[k]).abs().max().item() for k in whole) > 1e-4


def cfg_for(model_dir, data, out, *extra):
    return load_config(None, [f"model.name={model_dir}", f"data.train={data['train']}",
                              f"data.validation={data['validation']}", f"run.output_dir={out}", "run.name=r",
                              "train.batch_size=2", "train.lr=5e-3", "method.r=4", "method.dropout=0.1", *extra])


def adapter(run):
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_model_dir, order_data, tmp_path):
    extra = ["train.max_steps=24", "train.save_every=3", "train.eval_every=6", "train.grad_accum=2"]
    baseline = run_sft(cfg_for(tiny_model_dir, order_data, tmp_path / "a", *extra))

    out = tmp_path / "b"
    cfg = cfg_for(tiny_model_dir, order_data, out, *extra)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    # a slow loss (sleep) so the kill lands mid-run, after a checkpoint and before the end
    code = ("import time, tunesmith.recipes.sft as s, tunesmith.cli as c; f = s.sft_loss_sum\n"
            "s.sft_loss_sum = lambda m, b: (time.sleep(0.15), f(m, b))[1]\nc.main(['train', %r])" % str(cfg_path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob(".r.incomplete-*/checkpoints/step-6/state.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (staging,) = out.glob(".r.incomplete-*")
    done = [p.name for p in checkpoint_dirs(staging / "checkpoints")]
    assert "step-6" in done and "step-24" not in done  # killed mid-way

    from tunesmith.cli import main

    assert main(["train", str(cfg_path), "--resume"]) == 0
    resumed = out / "r"
    a, b = adapter(baseline), adapter(resumed)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert json.loads((resumed / "manifest.json").read_text())["resumed_from_step"] >= 6
    steps = [r["step"] for r in read_metrics(resumed / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 25))  # no step logged twice, none missing
    assert not list(out.glob(".r.incomplete-*"))


def test_resume_refuses_a_changed_config_and_nothing_to_resume(tiny_model_dir, order_data, tmp_path):
    with pytest.raises(ConfigError, match="nothing to resume"):
        run_sft(cfg_for(tiny_model_dir, order_data, tmp_path, "train.max_steps=2"), resume=True)
    stage = tmp_path / ".r.incomplete-999999"
    (stage / "checkpoints" / "step-2").mkdir(parents=True)
    (stage / "checkpoints" / "step-2" / "state.json").write_text("{}")
    cfg = cfg_for(tiny_model_dir, order_data, tmp_path, "train.max_steps=2")
    (stage / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    with pytest.raises(ConfigError, match=r"config differs.*train.lr"):
        run_sft(cfg_for(tiny_model_dir, order_data, tmp_path, "train.max_steps=2", "train.lr=1"), resume=True)


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tiny_model_dir, order_data, tmp_path,
                                                                       monkeypatch):
    from tunesmith.recipes import sft

    calls = {"n": 0}

    def nan_at_step_5(model, batch):
        calls["n"] += 1
        loss, n = sft_loss_sum(model, batch)
        return (loss * float("nan"), n) if calls["n"] == 5 else (loss, n)

    monkeypatch.setattr(sft, "sft_loss_sum", nan_at_step_5)
    with pytest.raises(loop.TrainingDiverged, match=r"step 5: the loss is nan.*step-4"):
        run_sft(cfg_for(tiny_model_dir, order_data, tmp_path, "train.max_steps=10", "train.save_every=2"))
    (staging,) = tmp_path.glob(".r.incomplete-*")
    assert [p.name for p in checkpoint_dirs(staging / "checkpoints")] == ["step-2", "step-4"]
    assert not (tmp_path / "r").exists()


def test_loss_spike_is_warned_and_logged(tiny_model_dir, order_data, tmp_path, monkeypatch, capsys):
    from tunesmith.recipes import sft

    calls = {"n": 0}

    def spike_at_step_8(model, batch):
        calls["n"] += 1
        loss, n = sft_loss_sum(model, batch)
        return (loss * 10, n) if calls["n"] == 8 else (loss, n)

    monkeypatch.setattr(sft, "sft_loss_sum", spike_at_step_8)
    run = run_sft(cfg_for(tiny_model_dir, order_data, tmp_path, "train.max_steps=10", "train.lr=1e-4"))
    assert "warning: step 8: loss" in capsys.readouterr().out
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows if r.get("spike")] == [8]
    assert all(r["grad_norm"] > 0 for r in rows)


def test_disk_full_while_checkpointing_keeps_previous_checkpoint(tiny_model_dir, order_data, tmp_path, monkeypatch):
    import tunesmith.training.checkpoint as ck

    real, calls = ck.save_file, {"n": 0}

    def full_disk_on_second(tensors, path):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real(tensors, path)

    monkeypatch.setattr(ck, "save_file", full_disk_on_second)
    with pytest.raises(TunesmithError, match=r"No space left on device.*step-2 is intact"):
        run_sft(cfg_for(tiny_model_dir, order_data, tmp_path, "train.max_steps=6", "train.save_every=2"))
    (staging,) = tmp_path.glob(".r.incomplete-*")
    ckpts = checkpoint_dirs(staging / "checkpoints")
    assert [p.name for p in ckpts] == ["step-2"]
    assert [p.name for p in (staging / "checkpoints").iterdir()] == ["step-2"]  # no half-written temp left
    assert load_file(str(ckpts[0] / "trainable.safetensors"))


def test_early_stopping_and_restore_best(tiny_model_dir, order_data, tmp_path, monkeypatch, capsys):
    values = iter([3.0, 2.0, 2.5, 2.6, 9.0, 9.0])
    monkeypatch.setattr(loop, "evaluate_loss", lambda *a, **k: next(values))
    run = run_sft(cfg_for(tiny_model_dir, order_data, tmp_path, "train.max_steps=30", "train.eval_every=2",
                          "train.patience=2", "train.save_every=100", "train.restore_best=true"))
    m = json.loads((run / "manifest.json").read_text())
    assert m["stopped_early"] and m["steps"] == 8 and m["best_step"] == 4
    assert "early stop at step 8" in capsys.readouterr().out
    best = load_file(str(run / "checkpoints" / "step-4" / "trainable.safetensors"))
    saved = adapter(run)
    for name, value in best.items():
        key = name.replace("base_model.model.", "base_model.model.", 1).replace(".default", "")
        assert torch.equal(saved[key], value)


def test_precision_and_optimizer_choices():
    p = choose_placement("auto")
    if not torch.cuda.is_available():
        assert p.precision == "fp32" and "fp32" in p.reason
        with pytest.raises(ConfigError, match="fp16 needs a GPU"):
            choose_placement("fp16")
        with pytest.raises(ConfigError, match="needs CUDA"):
            make_optimizer([torch.nn.Parameter(torch.zeros(2))], "adamw_8bit", 1e-3, 0.0, p.device)


def test_gradient_checkpointing_gives_the_same_gradients():
    ex = varied_examples(4)
    grads = []
    for ckpt in (False, True):
        model = get_method("lora").build(tiny_llama(256, seed=2), MethodSection(r=4))
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        grads.append(grads_after(model, [collate(ex, 0)]))
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_prompt_learning_loss_matches_peft_and_trains(method, tiny_model_dir, order_data, tmp_path):
    model = get_method(method).build(tiny_llama(256, seed=3), MethodSection(name=method, num_virtual_tokens=4))
    batch = collate(varied_examples(4), 0)
    loss, n = sft_loss_sum(model, batch)
    torch.testing.assert_close(loss / n, reference_sft_loss(model, batch), rtol=1e-5, atol=1e-5)
    run = run_sft(cfg_for(tiny_model_dir, order_data, tmp_path, f"method.name={method}", "train.max_steps=12",
                          "train.lr=3e-2", "method.num_virtual_tokens=4"))
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert (run / "adapter" / "adapter_config.json").is_file()
