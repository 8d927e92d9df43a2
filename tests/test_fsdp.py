"""FSDP2 (train.distributed.strategy=fsdp) through the real CLI, on CPU over gloo: 2 processes
train the run of 1 process (same steps, losses and final weights, saved from every rank's shard),
and its sharded checkpoints resume on another number of processes, or whole in one process
without a process group.

Tolerances: 2 processes add the same numbers in another order (each rank sums its share, gloo
adds the ranks), so float32 results differ in the last bits and Adam's division by the root of
small second moments amplifies that a little over steps: losses to rtol 1e-4, weights to atol
2e-4 (differences seen: under 2e-5; a LoRA step at lr 1e-2 moves a weight up to 1e-2, and every
tensor checked for it moved from its initial value by well over the tolerance)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file

from conftest import write_jsonl
from tunesmith.config import MethodSection, load_config
from tunesmith.errors import ConfigError
from tunesmith.training.logging import read_metrics

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is unavailable")

ATOL = 2e-4
STEPS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tunesmith.demo.orders import make_splits

    root = tmp_path_factory.mktemp("fsdp-data")
    # 21 examples, batch 8: every epoch ends with a batch of 5, split 3 / 2 over two ranks, so one
    # rank runs a forward weighted zero to keep the ranks' collectives in step (loop._forwards)
    return {"train": write_jsonl(root / "train.jsonl", make_splits(7, {"train": 21})["train"]),
            "validation": write_jsonl(root / "val.jsonl", make_splits(8, {"train": 6})["train"])}


def write_config(path: Path, model_dir, data, method: dict, **train) -> Path:
    cfg = {"model": {"name": str(model_dir)}, "data": {k: str(v) for k, v in data.items()}, "method": method,
           "train": {"max_steps": STEPS, "batch_size": 8, "lr": 1e-2, "save_every": 2, "keep_last": 3,
                     "log_every": 1, "distributed": {"strategy": "fsdp"}, **train},
           "run": {"output_dir": str(path.parent / "runs")}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(cfg: Path, name: str, *args: str) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two cores shared by both ranks (and other tests)
    out = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(cfg), f"run.name={name}", *args],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return cfg.parent / "runs" / name


def losses(run: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def assert_same_course(run: Path, reference: Path) -> None:
    a, b = losses(run), losses(reference)
    assert [s for s, *_ in a] == [s for s, *_ in b] == list(range(1, STEPS + 1))
    for (_, loss, norm), (_, ref_loss, ref_norm) in zip(a, b):
        # the gradient norm would be half the reference's if FSDP averaged over the 2 ranks
        assert loss == pytest.approx(ref_loss, rel=1e-4) and norm == pytest.approx(ref_norm, rel=1e-4)
    val = [r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
    ref_val = [r["val_loss"] for r in read_metrics(reference / "metrics.jsonl") if "val_loss" in r]
    assert len(val) == len(ref_val) == 1 and val == pytest.approx(ref_val, rel=1e-4)  # sharded evaluation


def final_weights(run: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    """The trained weights of a run's checkpoint (the last: what it ended with), by parameter name."""
    last = run / "checkpoints" / f"step-{step}"
    if (last / "trainable.safetensors").is_file():
        return load_file(str(last / "trainable.safetensors"))
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    whole = last.parent / f"whole-{step}.pt"  # DCP's own reader joins the ranks' shards
    dcp_to_torch_save(last / "shards", whole)
    return torch.load(whole, weights_only=True)["model"]


def assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=0, msg=k)


def halves(t: torch.Tensor):
    """Each rank's slice of a tensor FSDP shards on its first dimension over 2 ranks."""
    n = (t.shape[0] + 1) // 2
    return t[:n], t[n:]


def interrupted(run: Path, step: int, name: str) -> None:
    """What a run interrupted after the checkpoint of `step` leaves behind: its staging folder
    (owned by a process that is gone) with config, metrics and checkpoints up to `step`. The
    uninterrupted run wrote the same files up to there (the course is deterministic)."""
    tmp = run.parent / f".{name}.incomplete-{_dead_pid()}"
    tmp.mkdir()
    shutil.copy(run / "metrics.jsonl", tmp / "metrics.jsonl")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["run"]["name"] = name
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    for s in range(2, step + 1, 2):
        shutil.copytree(run / "checkpoints" / f"step-{s}", tmp / "checkpoints" / f"step-{s}")


# --- LoRA: 2 processes against 1, every rank's slice saved, resume across world sizes ------------

@pytest.fixture(scope="module")
def lora(tmp_path_factory, tiny_model_dir, data):
    root = tmp_path_factory.mktemp("fsdp-lora")
    cfg = write_config(root / "lora.yaml", tiny_model_dir, data, {"name": "lora", "r": 4, "dropout": 0.0})
    one = train(cfg, "one", "train.distributed.strategy=auto")  # one process: the plain trainer, no group
    two = train(cfg, "two", "--nproc", "2")
    return cfg, one, two


def test_lora_on_two_processes_trains_the_one_process_run_and_saves_every_ranks_slice(lora, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, one, two = lora
    assert_same_course(two, one)
    reference = final_weights(one)
    # the adapter as PEFT loads it back (its own key names), equal to the 1-process final weights
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), two / "adapter")
    saved = {n: p.detach() for n, p in loaded.named_parameters() if "lora_" in n}
    assert_close(saved, reference)
    for name, t in saved.items():
        if "lora_B" in name:  # zero at initialisation: each rank's half moved
            assert all(h.abs().max() > 50 * ATOL for h in halves(t)), name
    assert (two / "adapter" / "adapter_config.json").is_file() and (two / "tokenizer").is_dir()


@pytest.mark.slow  # two resumed runs: over a minute on two shared cores
def test_fsdp_checkpoints_resume_on_one_process_then_on_two(lora):
    cfg, one, two = lora
    assert sorted(p.name for p in (two / "checkpoints" / "step-2").iterdir()) == \
        ["rng-0.pt", "rng-1.pt", "schedule.pt", "shards", "state.json"]
    interrupted(two, 2, "cut2")  # written by 2 ranks, resumed by 1
    resumed1 = train(cfg, "cut2", "--resume", "--nproc", "1")
    assert_same_course(resumed1, two)
    assert_close(final_weights(resumed1), final_weights(two))
    assert sorted(p.name for p in (resumed1 / "checkpoints" / "step-4").iterdir()) == \
        ["rng-0.pt", "schedule.pt", "shards", "state.json"]

    interrupted(resumed1, 4, "cut4")  # step 4 written by 1 rank, resumed by 2
    resumed2 = train(cfg, "cut4", "--resume", "--nproc", "2")
    assert_same_course(resumed2, two)
    assert_close(final_weights(resumed2), final_weights(two))


def test_a_one_process_checkpoint_resumes_under_fsdp(lora):
    """The whole-model format (one process, ddp) loads into FSDP's shards: a run whose automatic
    strategy changes with the number of processes still resumes."""
    cfg, one, two = lora
    interrupted(one, 4, "whole4")  # the 1-process run was started with strategy auto: fsdp with 2 processes
    staged = one.parent / f".whole4.incomplete-{_dead_pid()}" / "config.yaml"
    config = yaml.safe_load(staged.read_text())
    config["train"]["distributed"]["strategy"] = "fsdp"
    staged.write_text(yaml.safe_dump(config))
    resumed = train(cfg, "whole4", "--resume", "--nproc", "2")
    assert_same_course(resumed, one)
    assert_close(final_weights(resumed), final_weights(one))


def _dead_pid() -> int:
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


def test_a_sharded_checkpoint_loads_whole_without_a_process_group(lora, tiny_model_dir):
    """DCP reshards into one unsharded model: weights, optimizer moments and schedule equal the
    1-process run's own checkpoint of the same step."""
    from transformers import AutoModelForCausalLM

    from tunesmith.methods import get_method
    from tunesmith.training.checkpoint import load_checkpoint
    from tunesmith.training.device import make_optimizer
    from tunesmith.training.loop import make_scheduler

    cfg, one, two = lora
    tcfg = load_config(str(cfg), []).train
    model = get_method("lora").build(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                     MethodSection(r=4, dropout=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, "adamw", tcfg.lr, tcfg.weight_decay, torch.device("cpu"))
    scheduler = make_scheduler(optimizer, tcfg, STEPS)
    assert not dist.is_initialized()
    state = load_checkpoint(two / "checkpoints" / "step-4", model, optimizer, scheduler)
    assert state.step == 4 and scheduler.last_epoch == 4
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert_close({n: p.detach() for n, p in zip(names, params)},
                 load_file(str(one / "checkpoints" / "step-4" / "trainable.safetensors")))
    whole = torch.load(one / "checkpoints" / "step-4" / "optimizer.pt", weights_only=True)["optimizer"]
    for i, p in enumerate(params):
        assert float(optimizer.state[p]["step"]) == 4
        torch.testing.assert_close(optimizer.state[p]["exp_avg"], whole["state"][i]["exp_avg"], atol=1e-5, rtol=1e-3)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(whole["param_groups"][0]["lr"])


def test_restore_best_loads_either_format_into_fsdp_shards(lora, tiny_model_dir, tmp_path):
    """train.restore_best under fsdp (here in a process group of one, in this process)."""
    from transformers import AutoModelForCausalLM

    from tunesmith.config import DistributedSection
    from tunesmith.methods import get_method
    from tunesmith.training.device import Placement
    from tunesmith.training.distributed.fsdp import FSDPStrategy
    from tunesmith.training.losses import sft_loss_sum

    cfg, one, two = lora
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = get_method("lora").build(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                         MethodSection(r=4, dropout=0.0))
        strategy = FSDPStrategy(Placement(torch.device("cpu"), "fp32", "test"), DistributedSection(strategy="fsdp"))
        module = strategy.prepare(model, sft_loss_sum)
        strategy.restore_weights(module, two / "checkpoints", 2)  # sharded, written by 2 ranks
        assert_close(strategy.trainable_state(module), final_weights(two, 2))
        strategy.restore_weights(module, one / "checkpoints", 4)  # whole, written by one process
        assert_close(strategy.trainable_state(module), final_weights(one, 4))
    finally:
        dist.destroy_process_group()


# --- full fine-tuning, with activation checkpointing -------------------------------------------

@pytest.mark.slow  # two runs of the whole model: over a minute on two shared cores
def test_full_fine_tuning_on_two_processes_with_activation_checkpointing(tmp_path, tiny_model_dir, data):
    from transformers import AutoModelForCausalLM

    cfg = write_config(tmp_path / "full.yaml", tiny_model_dir, data, {"name": "full"}, lr=1e-3, max_steps=STEPS,
                       save_every=STEPS)
    one = train(cfg, "one", "train.distributed.strategy=auto")
    # activation checkpointing (applied before sharding) recomputes the same forward
    two = train(cfg, "two", "--nproc", "2", "train.gradient_checkpointing=true")
    assert_same_course(two, one)
    init = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    saved = AutoModelForCausalLM.from_pretrained(two / "model").state_dict()
    reference = final_weights(one)
    assert set(load_file(str(two / "model" / "model.safetensors"))) == set(reference)  # tied head saved once
    assert_close({k: saved[k] for k in reference}, reference)
    for name in reference:  # every rank's slice was trained and saved, not left at its initial value
        for mine, start in zip(halves(saved[name]), halves(init[name])):
            assert (mine - start).abs().max() > 5 * ATOL, name


# --- refusals and the loop's equal forwards ------------------------------------------------------

def test_settings_that_do_nothing_or_cannot_run_under_fsdp_are_refused():
    with pytest.raises(ConfigError, match="fsdp_cpu_offload=true needs train.distributed.strategy=fsdp"):
        load_config(None, ["data.train=x.jsonl", "train.distributed.fsdp_cpu_offload=true"])
    with pytest.raises(ConfigError, match="eval.during_training with train.distributed.strategy=fsdp"):
        load_config(None, ["data.train=x.jsonl", "train.distributed.strategy=fsdp", "eval.during_training=true",
                           "eval.tasks=[{name: ppl, kind: perplexity, path: notes.txt}]"])
    with pytest.raises(ConfigError, match="data.validation with objective.name=dpo and train.distributed.strategy"):
        load_config(None, ["data.train=x.jsonl", "data.validation=v.jsonl", "objective.name=dpo",
                           "train.distributed.strategy=fsdp"])
    dcfg = load_config(None, ["data.train=x.jsonl", "train.distributed.strategy=fsdp",
                              "train.distributed.fsdp_cpu_offload=true"]).train.distributed
    from tunesmith.training.device import Placement
    from tunesmith.training.distributed.fsdp import FSDPStrategy

    with pytest.raises(ConfigError, match="fsdp_cpu_offload=true .* trains on the CPU already"):
        FSDPStrategy(Placement(torch.device("cpu"), "fp32", "test"), dcfg).prepare(torch.nn.Linear(2, 2), None)


def test_every_rank_runs_as_many_forwards_as_the_rank_with_most():
    from tunesmith.training.loop import _forwards

    step = [["a", "b", "c", "d", "e"]]  # a short last batch of an epoch: 3 and 2 examples over 2 ranks
    assert _forwards(step, 0, 2, 1, True) == ([["a"], ["b"], ["c"]], 3)  # (forwards, how many are its own)
    assert _forwards(step, 1, 2, 1, True) == ([["d"], ["e"], ["a"]], 2)
    assert _forwards([["a"]], 1, 2, 1, True) == ([["a"]], 0)  # nothing of its own: one forward, weighted zero
    assert _forwards(step, 1, 2, 8, False) == ([["d", "e"]], 1)


def test_decoder_layers_are_found_from_the_model_not_its_type():
    from conftest import tiny_llama
    from tunesmith.methods import get_method
    from tunesmith.training.distributed.fsdp import decoder_layers

    model = tiny_llama(64, layers=3)
    assert [type(m).__name__ for m in decoder_layers(model)] == ["LlamaDecoderLayer"] * 3
    peft = get_method("lora").build(tiny_llama(64, layers=2), MethodSection(r=4))
    assert len(decoder_layers(peft)) == 2
