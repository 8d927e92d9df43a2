"""Exact resume of everything a run's course depends on (early-stopping count, fp16 loss scale),
this process's throughput after a resume, and precision on GPUs (loss scaling for fp16, the
frozen base in half precision), the GPU parts on CPU through a forced Placement."""
import json
import shutil

import pytest
import torch

from conftest import tiny_llama
from tunesmith.config import MethodSection, load_config
from tunesmith.data.dataset import load_examples
from tunesmith.data.tokenize import encode_dataset
from tunesmith.methods import get_method
from tunesmith.training import loop
from tunesmith.training.checkpoint import checkpoint_dirs, load_checkpoint, trainable_state
from tunesmith.training.device import Placement, trainable_in_fp32
from tunesmith.training.logging import MetricsLogger, read_metrics
from tunesmith.training.losses import sft_loss_sum

CPU = torch.device("cpu")


def loop_cfg(*extra):
    return load_config(None, ["data.train=unused.jsonl", "data.validation=unused.jsonl", "train.batch_size=2", "train.lr=5e-3", "train.log_every=1",
                              *extra]).train


def fresh_model(vocab):
    return get_method("lora").build(tiny_llama(vocab, seed=0), MethodSection(r=4, dropout=0.1))


def run_loop(tokenizer, examples, tcfg, out, loss_fn=sft_loss_sum, resume=None, placement=None, evaluator=None):
    model = fresh_model(len(tokenizer))
    out.mkdir(exist_ok=True)
    logger = MetricsLogger(out / "metrics.jsonl", loop.total_steps(len(examples), tcfg))
    try:
        result = loop.train(model, examples, tcfg, loss_fn, tokenizer.pad_token_id, logger, run_dir=out,
                            resume=resume, placement=placement or Placement(CPU, "fp32", "test"), evaluator=evaluator)
    finally:
        logger.close()
    return model, result


@pytest.fixture
def examples(tiny_tokenizer, order_data):
    return encode_dataset(tiny_tokenizer, load_examples(order_data["train"]).examples, 256)


def interrupted_at_call(n):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return sft_loss_sum(model, batch)
    return loss_fn


def test_resume_with_patience_stops_where_the_uninterrupted_run_stops(tiny_tokenizer, examples, tmp_path):
    # validation: best at step 2, then no improvement: patience 3 stops the run at step 5
    evaluator = lambda step: {"val_loss": {1: 3.0, 2: 2.0}.get(step, 2.5)}  # noqa: E731
    tcfg = loop_cfg("train.max_steps=20", "train.eval_every=1", "train.save_every=2", "train.patience=3")
    base_model, base = run_loop(tiny_tokenizer, examples, tcfg, tmp_path / "a", evaluator=evaluator)
    assert base.stopped_early and base.steps == 5 and base.best_step == 2

    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):  # during step 5: the last checkpoint is step 4, two bad evaluations in
        run_loop(tiny_tokenizer, examples, tcfg, out, loss_fn=interrupted_at_call(5), evaluator=evaluator)
    last = checkpoint_dirs(out / "checkpoints")[-1]
    assert last.name == "step-4" and json.loads((last / "state.json").read_text())["bad_evals"] == 2
    model, resumed = run_loop(tiny_tokenizer, examples, tcfg, out, resume=last, evaluator=evaluator)
    assert resumed.stopped_early and resumed.steps == 5 and resumed.best_step == 2  # not step 7
    a, b = trainable_state(base_model), trainable_state(model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # throughput counts this process's tokens only: the first 4 steps were trained by another process
    before = json.loads((last / "state.json").read_text())["tokens"]
    assert resumed.resumed_tokens == before and resumed.tokens == base.tokens > before > 0
    assert resumed.tokens_per_s == pytest.approx((resumed.tokens - before) / resumed.seconds)

    # a checkpoint written before the count was saved still loads (count 0)
    old = tmp_path / "old"
    shutil.copytree(last, old)
    state = json.loads((old / "state.json").read_text())
    del state["bad_evals"]
    (old / "state.json").write_text(json.dumps(state))
    m = fresh_model(len(tiny_tokenizer))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])
    assert load_checkpoint(old, m, opt, loop.make_scheduler(opt, tcfg, 20)).bad_evals == 0


class OverflowingGradient(torch.autograd.Function):
    """The loss as it is, with an infinite gradient: what an fp16 overflow looks like to the scaler."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def overflow_at_call(n):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss, count = sft_loss_sum(model, batch)
        return (OverflowingGradient.apply(loss) if calls["n"] == n else loss), count
    return loss_fn


def test_fp16_scales_the_loss_skips_overflowing_steps_and_checkpoints_the_scale(tiny_tokenizer, examples, tmp_path):
    fp16 = Placement(CPU, "fp16", "fp16 forced on CPU for the test (torch has CPU fp16 autocast)")
    tcfg = loop_cfg("train.max_steps=4", "train.save_every=1", "train.keep_last=10")
    model, _ = run_loop(tiny_tokenizer, examples, tcfg, tmp_path / "a", loss_fn=overflow_at_call(2), placement=fp16)
    rows = {r["step"]: r for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "loss" in r}
    assert [rows[s]["loss_scale"] for s in (1, 2, 3)] == [65536.0, 32768.0, 32768.0]  # halved at the overflow
    assert [s for s in rows if rows[s].get("skipped")] == [2]
    ckpt = {p.name: p for p in checkpoint_dirs(tmp_path / "a" / "checkpoints")}
    weights = {s: trainable_state_of(ckpt[f"step-{s}"]) for s in (1, 2, 3)}
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])  # step 2 was skipped
    assert not all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2])
    assert torch.load(ckpt["step-2"] / "optimizer.pt", weights_only=True)["scaler"]["scale"] == 32768.0

    # gradients are unscaled before clipping: the logged norm is the fp32 run's, not 65536 times it
    _, _ = run_loop(tiny_tokenizer, examples, loop_cfg("train.max_steps=1"), tmp_path / "fp32")
    fp32_norm = read_metrics(tmp_path / "fp32" / "metrics.jsonl")[0]["grad_norm"]
    assert rows[1]["grad_norm"] == pytest.approx(fp32_norm, rel=0.05)

    # resuming restores the scale: the run continues exactly as the uninterrupted one
    resumed, _ = run_loop(tiny_tokenizer, examples, tcfg, tmp_path / "a", resume=ckpt["step-2"], placement=fp16)
    a, b = trainable_state(model), trainable_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = [r for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "loss" in r][-2:]
    assert [r["loss_scale"] for r in again] == [32768.0, 32768.0]


def trainable_state_of(ckpt):
    from safetensors.torch import load_file

    return load_file(str(ckpt / "trainable.safetensors"))


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled")
@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_adapters_in_half_precision_keep_the_frozen_base_in_it_and_train_in_fp32(method):
    gpu = Placement(torch.device("cuda"), "bf16", "a bf16 GPU, described")
    assert gpu.frozen_dtype(get_method(method)) == torch.bfloat16
    assert Placement(torch.device("cuda"), "fp16", "").frozen_dtype(get_method(method)) == torch.float16
    assert gpu.frozen_dtype(get_method("full")) == torch.float32  # every weight trains: fp32 master weights
    # a CPU in bf16 too (weights are read from memory for every token: half the bytes); fp32 stays fp32
    assert Placement(CPU, "bf16", "").frozen_dtype(get_method(method)) == torch.bfloat16
    assert Placement(CPU, "fp32", "").frozen_dtype(get_method(method)) == torch.float32
    assert Placement(CPU, "bf16", "").frozen_dtype(get_method("full")) == torch.float32
    assert gpu.grad_scaler() is None and Placement(torch.device("cuda"), "fp16", "").grad_scaler() is not None

    base = tiny_llama(256).to(torch.bfloat16)
    model = trainable_in_fp32(get_method(method).build(base, MethodSection(name=method, r=4, num_virtual_tokens=4)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    # PEFT upcasts its adapters itself; a method that does not (selective layers) is upcast all the same
    selective = get_method("selective").build(tiny_llama(256).to(torch.bfloat16), MethodSection(name="selective"))
    assert {p.dtype for p in selective.parameters() if p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in trainable_in_fp32(selective).parameters() if p.requires_grad} == {torch.float32}


def test_the_recipe_loads_the_frozen_base_in_the_placement_precision(tiny_model_dir, order_data, tmp_path,
                                                                     monkeypatch):
    from tunesmith.recipes import sft

    class Loaded(Exception):
        pass

    seen = {}

    def load_model(path, **kwargs):
        seen.update(kwargs)
        raise Loaded

    monkeypatch.setattr(sft, "choose_placement", lambda precision: Placement(torch.device("cuda"), "bf16", "GPU"))
    monkeypatch.setattr(sft, "load_model", load_model)
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.train={order_data['train']}",
                             f"run.output_dir={tmp_path}"])
    with pytest.raises(Loaded):
        sft.run_sft(cfg)
    assert seen["dtype"] == torch.bfloat16
