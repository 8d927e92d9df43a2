"""DeepSpeed ZeRO as a strategy: the config mapping (no DeepSpeed needed), the strategy's calls
into a recording fake `deepspeed` module, and, where DeepSpeed is installed, real 2-process CPU
runs (gloo) compared with the 1-process run: same weights, and under ZeRO-3 + LoRA a saved
adapter equal to the trained weights (not the empty shards the model itself holds)."""
import json
import math
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import transformers.integrations.deepspeed  # noqa: F401  (imported before a test fakes `deepspeed`: it looks for it)
from transformers import LlamaForCausalLM  # noqa: F401  (the same: its lazy imports reach the module above)

from conftest import tiny_llama
from test_engine import varied_examples
from tunesmith.config import MethodSection, TrainSection, parse_config
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.methods import get_method, save_trained
from tunesmith.training import loop
from tunesmith.training.device import Placement
from tunesmith.training.distributed import deepspeed as dsmod
from tunesmith.training.distributed.deepspeed import batch_numbers, deepspeed_config
from tunesmith.training.logging import MetricsLogger
from tunesmith.training.losses import sft_loss_sum

CPU32 = Placement(torch.device("cpu"), "fp32", "test")
GPU_BF16 = Placement(torch.device("cuda", 0), "bf16", "test")


def tcfg(**ds):
    extra = {k: ds.pop(k) for k in list(ds) if k in TrainSection.model_fields}
    train = {"batch_size": 4, "grad_accum": 2, "lr": 0.01, "max_grad_norm": 1.0, **extra}
    return TrainSection(**train, distributed={"strategy": "deepspeed", "deepspeed": ds})


# --- mapping -----------------------------------------------------------------------------------
@pytest.mark.parametrize("b,a,w,expected", [(4, 2, 1, (8, 4, 2)), (4, 2, 2, (8, 4, 1)), (4, 1, 2, (4, 2, 1)),
                                            (4, 3, 2, (12, 3, 2)), (2, 3, 2, (6, 1, 3)), (8, 4, 8, (32, 4, 1))])
def test_batch_numbers_describe_the_global_step_split_over_ranks(b, a, w, expected):
    assert batch_numbers(b, a, w) == expected


def test_batch_numbers_always_multiply_out_to_the_step_with_forwards_no_larger_than_the_batch():
    for b in range(1, 9):
        for a in range(1, 6):
            for w in (1, 2, 3, 4, 8):
                if b * a % w:
                    with pytest.raises(ConfigError):
                        batch_numbers(b, a, w)
                    continue
                step, micro, gas = batch_numbers(b, a, w)
                assert step == b * a and micro * gas * w == step and micro <= b


def test_default_config_is_zero_2_without_offload_in_the_placement_precision():
    cfg = deepspeed_config(tcfg(), GPU_BF16, 2)
    assert cfg["train_batch_size"] == 8 and cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 1 and cfg["gradient_clipping"] == 1.0
    assert cfg["zero_optimization"] == {"stage": 2}
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert "optimizer" not in cfg and "scheduler" not in cfg  # tunesmith's AdamW and schedule
    cpu = deepspeed_config(tcfg(max_grad_norm=0), CPU32, 1)
    assert cpu["bf16"] == {"enabled": False} and cpu["gradient_clipping"] == 0.0
    assert cpu["train_micro_batch_size_per_gpu"] == 4 and cpu["gradient_accumulation_steps"] == 2


def test_zero_3_with_both_offloads():
    zero = deepspeed_config(tcfg(zero_stage=3, offload_optimizer="cpu", offload_params="cpu"), GPU_BF16, 2)[
        "zero_optimization"]
    assert zero == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                    "offload_param": {"device": "cpu", "pin_memory": True}}
    on_cpu = deepspeed_config(tcfg(zero_stage=2, offload_optimizer="cpu"), CPU32, 2)["zero_optimization"]
    assert on_cpu == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}}


def test_fp16_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="train.precision=bf16"):
        deepspeed_config(tcfg(), Placement(torch.device("cuda", 0), "fp16", "test"), 2)


def config_error(**train) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config({"train": train})
    return str(info.value)


def test_config_refuses_deepspeed_keys_without_the_strategy_and_params_offload_below_stage_3():
    msg = config_error(distributed={"strategy": "ddp", "deepspeed": {"zero_stage": 3}})
    assert "train.distributed.deepspeed.zero_stage=3" in msg and "strategy=ddp" in msg
    msg = config_error(distributed={"strategy": "deepspeed", "deepspeed": {"offload_params": "cpu"}})
    assert "offload_params" in msg and "zero_stage=3" in msg
    assert "train.precision=bf16" in config_error(precision="fp16", distributed={"strategy": "deepspeed"})
    assert "train.optimizer=adamw" in config_error(optimizer="adamw_8bit", distributed={"strategy": "deepspeed"})
    ok = parse_config({"train": {"distributed": {"strategy": "deepspeed", "deepspeed": {"zero_stage": 3,
                                                                                         "offload_params": "cpu"}}}})
    assert ok.train.distributed.deepspeed.offload_params == "cpu"
    parse_config({"train": {"distributed": {"strategy": "ddp", "deepspeed": {}}}})  # defaults: nothing to refuse


HF_STYLE = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "betas": [0.9, 0.999]}},
            "zero_optimization": {"stage": 3, "overlap_comm": True, "reduce_bucket_size": 5e7,
                                  "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"}}}


def test_a_users_json_wins_and_its_auto_keys_are_filled_from_train():
    cfg = deepspeed_config(tcfg(), GPU_BF16, 2, HF_STYLE, "ds.json")
    assert cfg["zero_optimization"] == HF_STYLE["zero_optimization"]  # theirs, untouched
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == \
        (8, 4, 1)
    assert cfg["gradient_clipping"] == 1.0 and cfg["bf16"] == {"enabled": True}
    assert "optimizer" not in cfg  # the same AdamW tunesmith builds: it is the one DeepSpeed steps
    same = dict(HF_STYLE, train_batch_size=8, gradient_clipping=1.0)
    assert deepspeed_config(tcfg(), GPU_BF16, 2, same, "ds.json")["train_batch_size"] == 8


@pytest.mark.parametrize("change,names", [
    ({"train_batch_size": 16}, ["train_batch_size=16", "train.batch_size x train.grad_accum"]),
    ({"gradient_accumulation_steps": 4}, ["gradient_accumulation_steps=4", "train.grad_accum"]),
    ({"gradient_clipping": 0.5}, ["gradient_clipping=0.5", "train.max_grad_norm"]),
    ({"bf16": {"enabled": False}}, ["bf16.enabled=False", "train.precision"]),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}}, ["optimizer.params.lr=1e-05", "train.lr"]),
    ({"optimizer": {"type": "Lamb"}}, ["Lamb", "AdamW"]),
    ({"optimizer": {"type": "AdamW", "params": {"amsgrad": True}}}, ["optimizer.params.amsgrad"]),
    ({"scheduler": {"type": "WarmupLR"}}, ["scheduler", "train.schedule"]),
    ({"zero_optimization": {"stage": 1}}, ["stage=1", "strategy=ddp"]),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, ["offload_param", "stage 3"]),
    ({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}, ["zero_optimization.reduce_bucket_size",
                                                                         "auto"]),
])
def test_a_users_json_that_contradicts_train_is_an_error_naming_both(change, names):
    with pytest.raises(ConfigError) as info:
        deepspeed_config(tcfg(), GPU_BF16, 2, dict(HF_STYLE, **change), "ds.json")
    assert "ds.json" in str(info.value)
    for name in names:
        assert name in str(info.value)


def test_tunesmith_zero_keys_must_agree_with_the_json():
    with pytest.raises(ConfigError, match="zero_stage=3.*ds.json says 2"):
        deepspeed_config(tcfg(zero_stage=3, config="x"), GPU_BF16, 2, dict(HF_STYLE, zero_optimization={"stage": 2}),
                         "ds.json")
    with pytest.raises(ConfigError, match="offload_optimizer='cpu'.*says 'nvme'"):
        deepspeed_config(tcfg(offload_optimizer="cpu", config="x"), GPU_BF16, 2, HF_STYLE, "ds.json")
    agreeing = deepspeed_config(tcfg(zero_stage=3, config="x"), GPU_BF16, 2, HF_STYLE, "ds.json")
    assert agreeing["zero_optimization"]["stage"] == 3


def test_read_user_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a file"):
        dsmod.read_user_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{stage: 3")
    with pytest.raises(ConfigError, match="not valid JSON"):
        dsmod.read_user_config(tmp_path / "bad.json")
    (tmp_path / "ok.json").write_text(json.dumps(HF_STYLE))
    assert dsmod.read_user_config(tmp_path / "ok.json") == HF_STYLE


# --- the strategy against a recording fake `deepspeed` -----------------------------------------
class FakeEngine(torch.nn.Module):
    """What the strategy may rely on, done the plain way: step = clip + optimizer step + zero."""

    def __init__(self, module, optimizer, config, calls):
        super().__init__()
        self.module, self.optimizer, self.config, self.calls = module, optimizer, config, calls
        self.boundary, self.norm = None, None

    def forward(self, batch):
        self.calls.append(("forward", self.boundary))
        return self.module(batch)

    def set_gradient_accumulation_boundary(self, value):
        self.boundary = value

    def backward(self, loss, scale_wrt_gas=True):
        self.calls.append(("backward", self.boundary, scale_wrt_gas))
        loss.backward()

    def step(self):
        self.calls.append(("step", self.boundary))
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip = self.config["gradient_clipping"]
        self.norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self):
        return self.norm

    def save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters):
        self.calls.append(("save_checkpoint", exclude_frozen_parameters))
        Path(save_dir, tag).mkdir()
        torch.save({"weights": {n: p.detach().clone() for n, p in self.module.named_parameters() if p.requires_grad},
                    "optimizer": self.optimizer.state_dict()}, Path(save_dir, tag, "fake.pt"))

    def load_checkpoint(self, load_dir, tag, **kwargs):
        self.calls.append(("load_checkpoint", kwargs["load_optimizer_states"]))
        saved = torch.load(Path(load_dir, tag, "fake.pt"), weights_only=True)
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for n, v in saved["weights"].items():
                params[n].copy_(v)
        self.optimizer.load_state_dict(saved["optimizer"])
        return str(Path(load_dir, tag)), {}


def fake_partition(model):
    """ZeRO-3's picture of a model: every weight an empty placeholder, its values held elsewhere."""
    for p in model.parameters():
        p.full, p.data = p.data, torch.empty(0)


@contextmanager
def fake_gathered(params, modifier_rank=None):
    for p in params:
        p.data = p.full
    yield
    for p in params:
        p.data = torch.empty(0)


@pytest.fixture
def fake_deepspeed(monkeypatch):
    calls = []
    ds = types.ModuleType("deepspeed")
    ds.calls = calls
    ds.utils = types.SimpleNamespace(logger=types.SimpleNamespace(setLevel=lambda level: None),
                                     safe_get_full_fp32_param=lambda p: p.full if hasattr(p, "full") else p.data)
    ds.zero = types.SimpleNamespace(GatheredParameters=fake_gathered)
    ds.init_distributed = lambda **kw: calls.append(("init_distributed", kw["dist_backend"]))

    def initialize(model, optimizer, config, dist_init_required):
        calls.append(("initialize", model, optimizer, config))
        ds.engine = FakeEngine(model, optimizer, config, calls)
        return ds.engine, optimizer, None, None
    ds.initialize = initialize
    ops, adam = types.ModuleType("deepspeed.ops"), types.ModuleType("deepspeed.ops.adam")

    class DeepSpeedCPUAdam(torch.optim.AdamW):
        def __init__(self, params, lr, weight_decay, adamw_mode):
            assert adamw_mode
            super().__init__(params, lr=lr, weight_decay=weight_decay)
    adam.DeepSpeedCPUAdam = DeepSpeedCPUAdam
    for name, module in (("deepspeed", ds), ("deepspeed.ops", ops), ("deepspeed.ops.adam", adam)):
        monkeypatch.setitem(sys.modules, name, module)
    return ds


@pytest.fixture
def one_rank_group(tmp_path):
    """A process group of one, as the launcher would make (the strategy asks it for its backend)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def lora_model():
    return get_method("lora").build(tiny_llama(256, seed=1), MethodSection(r=4))


def train_run(strategy, tcfg_, out: Path, resume=None, model=None):
    model = model or lora_model()
    examples = varied_examples(16)
    out.mkdir(parents=True, exist_ok=True)
    logger = MetricsLogger(out / "metrics.jsonl", loop.total_steps(len(examples), tcfg_))
    result = loop.train(model, examples, tcfg_, sft_loss_sum, 0, logger, run_dir=out, resume=resume,
                        placement=CPU32, strategy=strategy)
    logger.close()
    return model, result


def trained(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def strategy_for(cfg):
    return dsmod.DeepSpeedStrategy(CPU32, cfg.distributed, "test")


def test_the_strategy_drives_the_engine_like_the_plain_loop(fake_deepspeed, one_rank_group, tmp_path):
    cfg = tcfg(max_steps=3, warmup_steps=1)
    plain, plain_result = train_run(None, cfg, tmp_path / "plain")
    strategy = strategy_for(cfg)
    model, result = train_run(strategy, cfg, tmp_path / "ds")
    for name, value in trained(plain).items():
        torch.testing.assert_close(trained(model)[name], value, rtol=1e-6, atol=1e-7)
    assert result.final_loss == pytest.approx(plain_result.final_loss, rel=1e-6)
    norms = [json.loads(line)["grad_norm"] for line in (tmp_path / "ds" / "metrics.jsonl").read_text().splitlines()]
    assert norms == [json.loads(line)["grad_norm"] for line in
                     (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()] and norms[0] > 0
    calls = fake_deepspeed.calls
    assert calls[0] == ("init_distributed", "gloo")
    _, module, optimizer, config = calls[1]
    assert isinstance(module, dsmod.LossModule) and module.model is model
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["lr"] == 0.01
    assert config == deepspeed_config(cfg, CPU32, 1)
    # per step: the first micro-batch is not a boundary, the second is, then one engine step;
    # DeepSpeed never divides by its accumulation steps (the loop's loss is already the step mean)
    step = [("forward", False), ("backward", False, False), ("forward", True), ("backward", True, False),
            ("step", True)]
    assert calls[2:] == step * 3


def test_offloading_the_optimizer_hands_deepspeed_its_cpu_adam(fake_deepspeed, one_rank_group, tmp_path):
    cfg = tcfg(max_steps=1, offload_optimizer="cpu", weight_decay=0.1)
    train_run(strategy_for(cfg), cfg, tmp_path)
    optimizer = fake_deepspeed.calls[1][2]
    assert type(optimizer).__name__ == "DeepSpeedCPUAdam" and optimizer.defaults["weight_decay"] == 0.1


def test_zero_3_lora_saves_the_gathered_weights_not_the_empty_shards(fake_deepspeed, one_rank_group, tmp_path):
    """The known failure of other tools: under ZeRO-3 the model holds empty placeholders, and
    saving them writes an empty adapter. trainable_state gathers the trained weights first."""
    cfg = tcfg(max_steps=2, zero_stage=3)
    strategy = strategy_for(cfg)
    model, _ = train_run(strategy, cfg, tmp_path / "run")
    expected = trained(model)
    fake_partition(model)
    state = strategy.trainable_state(model)
    assert state.keys() == expected.keys()
    save_trained(model, MethodSection(r=4), tmp_path / "gathered", state)
    save_trained(model, MethodSection(r=4), tmp_path / "own")  # what saving without the gather writes
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "gathered" / "adapter" / "adapter_model.safetensors"))
    empty = load_file(str(tmp_path / "own" / "adapter" / "adapter_model.safetensors"))
    assert all(v.numel() == 0 for v in empty.values())
    assert len(saved) == len(expected) > 0
    for name, value in expected.items():
        key = name.replace(".default", "")  # PEFT's file names drop the adapter name
        torch.testing.assert_close(saved[key], value, rtol=0, atol=0)


def test_a_whole_model_save_gathers_the_frozen_weights_too(fake_deepspeed, one_rank_group, tmp_path):
    cfg = tcfg(max_steps=1, zero_stage=3)
    strategy = strategy_for(cfg)
    model = get_method("selective").build(tiny_llama(256, seed=1), MethodSection(name="selective"))
    model, _ = train_run(strategy, cfg, tmp_path, model=model)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    fake_partition(model)
    state = strategy.trainable_state(model)
    assert state.keys() == expected.keys() and any(not p.requires_grad for p in model.parameters())
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0)


def test_checkpoints_resume_exactly_and_refuse_another_world_size(fake_deepspeed, one_rank_group, tmp_path):
    cfg = tcfg(max_steps=3, save_every=1, keep_last=3)
    whole, _ = train_run(strategy_for(cfg), cfg, tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoints" / "step-2"
    assert sorted(p.name for p in ckpt.iterdir()) == ["state.json", "tunesmith.pt", "zero"]
    assert not list((tmp_path / "a" / "checkpoints").glob(".*"))  # no staging folder left
    assert ("save_checkpoint", True) in fake_deepspeed.calls  # frozen weights stay in the base model's file
    resumed, result = train_run(strategy_for(cfg), cfg, tmp_path / "b", resume=ckpt)
    assert result.resumed_from == 2 and ("load_checkpoint", True) in fake_deepspeed.calls
    for name, value in trained(whole).items():
        torch.testing.assert_close(trained(resumed)[name], value, rtol=1e-6, atol=1e-7)
    marker = torch.load(ckpt / "tunesmith.pt", weights_only=True)
    torch.save(dict(marker, world_size=2), ckpt / "tunesmith.pt")
    with pytest.raises(TunesmithError, match="2 processes.*same --nproc"):
        train_run(strategy_for(cfg), cfg, tmp_path / "c", resume=ckpt)


def test_a_failed_checkpoint_leaves_nothing_that_looks_like_one(fake_deepspeed, one_rank_group, tmp_path):
    cfg = tcfg(max_steps=2, save_every=1, keep_last=3)
    strategy = strategy_for(cfg)
    real = FakeEngine.save_checkpoint

    def fail_second(self, save_dir, *args, **kwargs):
        if "step-2" in save_dir:
            raise OSError(28, "No space left on device")
        return real(self, save_dir, *args, **kwargs)
    FakeEngine.save_checkpoint = fail_second
    try:
        with pytest.raises(TunesmithError, match="could not write checkpoint step-2.*No space"):
            train_run(strategy, cfg, tmp_path)
    finally:
        FakeEngine.save_checkpoint = real
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1"]


def test_prompt_learning_under_zero_3_is_refused(fake_deepspeed, one_rank_group, tmp_path):
    cfg = tcfg(max_steps=1, zero_stage=3)
    model = get_method("prompt").build(tiny_llama(256, seed=1), MethodSection(name="prompt", num_virtual_tokens=2))
    with pytest.raises(ConfigError, match="zero_stage=2"):
        train_run(strategy_for(cfg), cfg, tmp_path, model=model)


def test_one_launched_gpu_rank_may_run_deepspeed_for_offload(fake_deepspeed, one_rank_group):
    from tunesmith.training.distributed.strategy import choose_strategy

    dcfg = tcfg(zero_stage=3, offload_params="cpu").distributed
    chosen = choose_strategy(dcfg, get_method("lora"), None, GPU_BF16)
    assert isinstance(chosen, dsmod.DeepSpeedStrategy) and "ZeRO-3, weights offloaded to cpu" in chosen.describe()
    with pytest.raises(ConfigError, match="needs a process group"):  # on CPU one process runs examples on threads
        choose_strategy(dcfg, get_method("lora"), None, CPU32)


def test_without_deepspeed_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import fails
    with pytest.raises(ConfigError, match=r"tunesmith\[deepspeed\]"):
        strategy_for(tcfg())


# --- real DeepSpeed, 2 CPU processes (gloo) ----------------------------------------------------
def has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None  # without importing it at collection


real = pytest.mark.skipif(not has_deepspeed(), reason="DeepSpeed is not installed (pip install 'tunesmith[deepspeed]')")


def make_model(method: str):
    if method == "lora":
        return lora_model()
    return get_method(method).build(tiny_llama(256, seed=1), MethodSection(name=method))


def ds_rank(rank: int, world: int, init: str, out: str, method: str, stage: int):
    import os

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        out = Path(out)
        cfg = tcfg(max_steps=3, save_every=1, keep_last=3, config=str(out / "ds.json"))
        strategy = strategy_for(cfg)
        model, _ = train_run(strategy, cfg, out / "run", model=make_model(method))
        own = [p.numel() for p in model.parameters() if p.requires_grad]  # this rank's view of the weights
        state = strategy.trainable_state(model)
        if rank == 0:
            torch.save({"state": state, "own": own}, out / "trained.pt")
            save_trained(model, MethodSection(name=method, r=4), out / "saved", state)
        dist.barrier()
        # a fresh process group of ranks resuming from the step-2 checkpoint ends where this run ended
        strategy = strategy_for(cfg)
        model, result = train_run(strategy, cfg, out / "resumed", resume=out / "run" / "checkpoints" / "step-2",
                                  model=make_model(method))
        state = strategy.trainable_state(model)
        if rank == 0:
            torch.save({"state": state, "resumed_from": result.resumed_from}, out / "resumed.pt")
    finally:
        dist.destroy_process_group()


def run_two_ranks(tmp_path, method, stage):
    import torch.multiprocessing as mp

    # no weight too small to shard (ZeRO-3 keeps weights under 100k elements whole by default: a
    # tiny model's LoRA would never be split, and the test could not catch an empty save)
    zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": zero}))
    mp.spawn(ds_rank, args=(2, f"file://{tmp_path / 'pg'}", str(tmp_path), method, stage), nprocs=2, join=True)
    plain, _ = train_run(None, tcfg(max_steps=3), tmp_path / "plain", model=make_model(method))
    return plain, torch.load(tmp_path / "trained.pt"), torch.load(tmp_path / "resumed.pt")


@real
def test_zero_3_lora_on_two_ranks_trains_saves_and_resumes_like_one_process(tmp_path):
    plain, ranked, resumed = run_two_ranks(tmp_path, "lora", 3)
    expected = trained(plain)
    assert sum(ranked["own"]) == 0  # ZeRO-3: the model's own trained weights are empty placeholders
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "saved" / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == len(expected) > 0
    for name, value in expected.items():
        torch.testing.assert_close(ranked["state"][name], value, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(saved[name.replace(".default", "")], ranked["state"][name], rtol=0, atol=0)
        torch.testing.assert_close(resumed["state"][name], ranked["state"][name], rtol=1e-5, atol=1e-7)
    assert resumed["resumed_from"] == 2


@real
@pytest.mark.parametrize("stage", [2, 3])
def test_a_whole_model_on_two_ranks_equals_one_process(tmp_path, stage):
    """selective fine-tuning saves the whole model: its frozen weights are gathered too."""
    plain, ranked, resumed = run_two_ranks(tmp_path, "selective", stage)
    expected = {n: p.detach() for n, p in plain.named_parameters()}
    assert ranked["state"].keys() >= expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(ranked["state"][name], value, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(resumed["state"][name], ranked["state"][name], rtol=1e-5, atol=1e-7)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved" / "model")
    for name, value in reloaded.named_parameters():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-6)
