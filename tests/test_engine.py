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
    """A small LoRA run's config; with another method.name, LoRA's options are left out (refused there)."""
    lora = [] if any(e.startswith("method.name=") for e in extra) else ["method.r=4", "method.dropout=0.1"]
    return load_config(None, [f"model.name={model_dir}", f"data.train={data['train']}",
                              f"data.validation={data['validation']}", f"run.output_dir={out}", "run.name=r",
                              "train.batch_size=2", "train.lr=5e-3", *lora, *extra])


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
    m = json.loads((resumed / "manifest.json").read_text())
    assert m["resumed_from_step"] >= 6
    # tokens/s is this process's: the tokens of the steps after the checkpoint over this process's seconds
    before = [r["tokens"] for r in read_metrics(resumed / "metrics.jsonl") if r["step"] == m["resumed_from_step"]
              and "tokens" in r]
    assert m["tokens_this_process"] == m["tokens"] - before[0] > 0
    assert m["tokens_per_s"] == pytest.approx(m["tokens_this_process"] / m["train_seconds"], rel=0.02)
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


# --- speed and memory paths: each must give the gradient of the plain batched path -------------

@pytest.mark.parametrize("trainable_head", [False, True])
def test_chunked_linear_cross_entropy_equals_full_logits(trainable_head):
    from tunesmith.training.losses import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 32, generator=g, requires_grad=True)
    weight = torch.randn(500, 32, generator=g, requires_grad=trainable_head)
    bias = torch.randn(500, generator=g, requires_grad=trainable_head)
    targets = torch.randint(0, 500, (300,), generator=g)
    leaves = [t for t in (hidden, weight, bias) if t.requires_grad]
    full = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight, bias), targets,
                                             reduction="sum")
    want = torch.autograd.grad(full * 0.3, leaves)
    chunked = linear_cross_entropy(hidden, weight, bias, targets, chunk_rows=64)  # 5 chunks, the last partial
    got = torch.autograd.grad(chunked * 0.3, leaves)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-3)
    for w, c in zip(want, got):
        torch.testing.assert_close(c, w, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # evaluation: the same value, no gradient work
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, bias, targets), full.detach(), rtol=1e-6,
                                   atol=1e-3)


def grads_with(model, batches):
    model.zero_grad(set_to_none=True)
    loss, n = loop.accumulate(model, batches, sft_loss_sum, choose_placement("fp32"))
    return loss, n, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_example_micro_batches_give_the_padded_batch_gradient(method):
    """micro_batch=example: 8 examples as 4 micro-batches of 2 unpadded rows (run on 2 threads)
    or 8 of 1 row, accumulated, equal one padded batch of 8, gradients included."""
    from tunesmith.data.batching import collate_examples

    torch.set_num_threads(2)
    model = get_method(method).build(tiny_llama(256, seed=1), MethodSection(name=method, r=4))
    model.train()
    ex = varied_examples()
    loss, n, whole = grads_with(model, [collate(ex, 0)])
    for threads in (1, 2):
        loss_k, n_k, rows = grads_with(model, [collate_examples(ex[i:i + threads], 0, threads)
                                               for i in range(0, 8, threads)])
        assert n_k == n and loss_k == pytest.approx(loss, rel=1e-5)
        assert rows.keys() == whole.keys() and whole
        for name in whole:
            torch.testing.assert_close(rows[name], whole[name], rtol=1e-4, atol=1e-5)


def test_concurrent_examples_are_reproducible_bit_for_bit():
    """Two examples on two threads accumulate in example order, not in the order their threads
    finish: a run is reproducible bit for bit whatever the timing (resume relies on it)."""
    from tunesmith.data.batching import collate_examples
    from tunesmith.training.concurrent import rows_loss_sum_with

    torch.set_num_threads(2)
    model = get_method("full").build(tiny_llama(256, seed=1), MethodSection(name="full"))
    model.train()
    ex = varied_examples()
    batches = [collate_examples(ex[i:i + 2], 0, threads=2)["rows"] for i in range(0, 8, 2)]

    def run(slow_row):  # one row's backward waits, so the other thread finishes first
        def loss_fn(m, row):
            loss, n = sft_loss_sum(m, row)
            if row["input_ids"] is rows[slow_row]["input_ids"]:
                loss.register_hook(lambda g: (time.sleep(0.2), g)[1])
            return loss, n

        model.zero_grad(set_to_none=True)
        for rows in batches:  # .grad already holds earlier micro-batches: the order of sums matters
            loss, _ = rows_loss_sum_with(loss_fn, model, rows, threads=2)
            loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    first_slow, second_slow = run(0), run(1)
    assert all(torch.equal(first_slow[k], second_slow[k]) for k in first_slow)


def test_dropout_examples_run_one_after_the_other():
    """With dropout the threads would draw random numbers in a varying order: the rows run in
    order instead, so the same seed gives the sequential result exactly."""
    from tunesmith.data.batching import collate_examples
    from tunesmith.training.concurrent import draws_random_numbers

    model = get_method("lora").build(tiny_llama(256, seed=1), MethodSection(r=4, dropout=0.3))
    model.train()
    assert draws_random_numbers(model)
    ex = varied_examples()
    results = []
    for threads in (1, 2):
        torch.manual_seed(7)
        results.append(grads_with(model, [collate_examples(ex[i:i + 2], 0, threads) for i in range(0, 8, 2)])[2])
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_micro_batching_keeps_the_step_and_picks_whole_micro_batches():
    from tunesmith.config import TrainSection
    from tunesmith.recipes.sft import micro_batching

    cpu, model = choose_placement("fp32"), tiny_llama(256)
    collate_fn, k, _ = micro_batching(TrainSection(batch_size=8, grad_accum=1), cpu, model)
    assert k == 2 and collate_fn.keywords == {"threads": 2}
    assert micro_batching(TrainSection(batch_size=3, grad_accum=1), cpu, model)[1] == 1  # 2 would split a step unevenly
    assert micro_batching(TrainSection(batch_size=2, grad_accum=4, parallel_examples=4), cpu, model)[1] == 4
    tcfg = TrainSection(batch_size=8, grad_accum=2, micro_batch="batch")
    assert micro_batching(tcfg, cpu, model)[:2] == (collate, None)


def test_a_step_holds_the_same_examples_however_it_is_cut_into_forwards(tiny_model_dir, tmp_path):
    """The step's examples are drawn before they are cut into forwards: padded batches, one example
    at a time and two at a time train the same steps (the three steps' losses agree to float rounding).
    Drawing forwards of k examples directly made the step's make-up depend on k."""
    from conftest import train_tiny_run

    runs = {how: train_tiny_run(tiny_model_dir, tmp_path, how.replace("=", "-").replace(".", "_"), *how.split(),
                                "train.batch_size=3", "train.grad_accum=2", steps=3)
            for how in ("train.micro_batch=batch", "train.micro_batch=example train.parallel_examples=1",
                        "train.micro_batch=example train.parallel_examples=2")}
    losses = {how: [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
              for how, run in runs.items()}
    first = next(iter(losses.values()))
    assert all(len(v) == 3 and max(abs(a - b) for a, b in zip(v, first)) < 1e-4 for v in losses.values()), losses


def test_malloc_mmap_threshold_returns_freed_activations_to_the_os():
    """glibc keeps freed mid-size blocks in its heap; with the threshold they go back to the OS."""
    code = """
import torch, sys
from tunesmith.training.device import set_malloc_mmap_threshold
if sys.argv[1] == "1":
    assert set_malloc_mmap_threshold(131072)
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
kept = []
for _ in range(3):  # freeing grows glibc's own threshold past these sizes; the heap then keeps them
    xs = []
    for i in range(150):  # like activations (~1.2 MB) between small tensors that stay alive
        xs.append(torch.ones(300_000 + 1000 * i))
        kept.append(torch.ones(2000))
    del xs
print(rss())
"""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    kept = [float(subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True,
                                 check=True).stdout) for flag in ("0", "1")]
    assert kept[0] - kept[1] > 100, kept  # MB still resident after the tensors are gone


# --- activation budget: recompute only the layers a long forward needs -------------------------

def saved_activation_bytes(model, fn):
    """Bytes of the tensors autograd keeps for the backward during fn(), parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_layer_activation_estimate_matches_what_autograd_keeps():
    from tunesmith.training.memory import layer_bytes_per_token

    model = tiny_llama(256, layers=4)
    model.train()
    ids = torch.randint(3, 256, (1, 200))
    one, _ = saved_activation_bytes(model, lambda: sft_loss_sum(model, {"input_ids": ids[:, :100], "labels": ids[:, :100]}))
    two, _ = saved_activation_bytes(model, lambda: sft_loss_sum(model, {"input_ids": ids, "labels": ids}))
    per_layer_token = (two - one) / 100 / 4  # the head and loss cancel out in the difference
    assert per_layer_token == pytest.approx(layer_bytes_per_token(model.config), rel=0.25)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_activation_budget_gives_the_same_gradients_and_keeps_less(method):
    """train.activation_memory_mb: a long example recomputes just enough layers to fit, a short
    one none; the gradients are the ones of keeping everything."""
    from tunesmith.data.batching import collate_examples
    from tunesmith.training.memory import install_budget, layer_bytes_per_token, layers_to_recompute

    model = get_method(method).build(tiny_llama(256, seed=1, layers=4), MethodSection(name=method, r=4))
    model.train()
    ex = varied_examples()
    batches = [collate_examples([e], 0) for e in ex]
    _, n, plain = grads_with(model, batches)
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    per_token = layer_bytes_per_token(config)
    budget_mb = 90 * 4 * per_token / 2**20  # 80 tokens fit in 4 layers, 100 and 120 need some recomputed
    k = {len(e.input_ids): layers_to_recompute(len(e.input_ids), 4, per_token, 64, budget_mb * 2**20) for e in ex}
    assert k[5] == k[17] == k[33] == k[64] == k[80] == 0 and 0 < k[100] < k[120] < 4
    calls = []
    layers = model.get_base_model().model.layers if method == "lora" else model.model.layers
    for layer in layers:  # counts the layer's forwards, recomputations included (module hooks skip those)
        layer.forward = (lambda fwd: lambda *a, **kw: (calls.append(1), fwd(*a, **kw))[1])(layer.forward)
    budget = install_budget(model, budget_mb)
    _, n_b, budgeted = grads_with(model, batches)
    assert n_b == n and budgeted.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(budgeted[name], plain[name], rtol=1e-5, atol=1e-6)
    # every layer runs once per example, and once more in the backward for each recomputed one
    assert len(calls) == 4 * len(ex) + sum(k[len(e.input_ids)] for e in ex) and budget.recomputed_layers == sum(k.values())
    # and the longest example keeps less than the budget, where without one it keeps twice as much
    long = collate_examples([ex[1]], 0)["rows"][0]
    kept, _ = saved_activation_bytes(model, lambda: sft_loss_sum(model, long))
    assert kept <= budget_mb * 2**20 * 1.1
    with torch.no_grad():  # evaluation recomputes nothing
        before = len(calls)
        sft_loss_sum(model, long)
        assert len(calls) - before == 4
