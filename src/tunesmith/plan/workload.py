"""What a run's config asks of each device: the decisions `tunesmith train` makes at its start
(precision, the dtype the frozen base is loaded in, micro-batch shape, strategy), made here for a
target device without touching it, so that memory.py and throughput.py read one resolved record.

The rules mirror training/device.py (Placement, frozen_dtype, trainable_in_fp32), the micro_batch /
parallel_examples defaults of config.TrainSection and training/distributed/strategy.py's choice; a
change to one of those must change this too (tests/test_plan_workload.py pins them side by side).
"""
from __future__ import annotations

from dataclasses import dataclass

from tunesmith.plan.devices import Device

PAIRED_OBJECTIVES = ("dpo", "reward")  # each example is a chosen and a rejected sequence (KTO's unpaired rows: one)


@dataclass(frozen=True)
class Workload:
    method: str                 # method.name
    objective: str              # objective.name
    loss: str                   # objective.loss (dpo family)
    device_kind: str            # "cuda" | "cpu"
    precision: str              # compute precision: fp32 | bf16 | fp16
    base_dtype_bytes: float     # bytes a frozen base weight takes (4 fp32, 2 bf16/fp16; quantized: see memory.py)
    quantized: bool             # the base's linear layers in 4-bit NF4 (QLoRA)
    double_quant: bool
    micro_batch: int            # sequences padded together in one forward (1 with micro_batch=example)
    parallel: int               # forwards running at once in one process (CPU parallel_examples), else 1
    seq_len: int                # longest sequence a forward holds (data.max_length, or the data's longest)
    sequences_per_example: int  # 2 for paired preference objectives (chosen + rejected), else 1
    grad_accum: int             # micro-batches per optimizer step (a step holds batch_size x grad_accum examples)
    batch_size: int
    gradient_checkpointing: bool
    activation_budget_mb: float
    optimizer: str              # adamw | adamw_8bit | paged_adamw_8bit
    strategy: str               # resolved: single | ddp | fsdp | deepspeed
    zero_stage: int             # deepspeed only (else 0)
    offload_optimizer: bool     # deepspeed offload_optimizer=cpu or fsdp_cpu_offload
    offload_params: bool        # deepspeed offload_params=cpu or fsdp_cpu_offload
    world: int                  # processes (GPUs) the run spans
    epochs: float
    max_steps: int
    packing: bool
    train_on: str               # data.train_on: which tokens are trained (the LM head runs on those only)
    strategy_reason: str = ""
    # added by the memory helper (defaults keep older constructors working)
    lora_r: int = 0                        # LoRA family rank (0: no low-rank adapters)
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ()     # module names that get an adapter (all-linear resolved by the family table)
    attention: str = "sdpa"                # sdpa | flash_attention_2 | eager (eager keeps L x L scores)
    trained_len: int = 0                   # trained tokens of the longest sequence (0: unknown, seq_len assumed)
    data_tokens: int = 0                   # tokens of the encoded training data held in memory (0: unknown)
    generation: tuple[tuple[int, int], ...] = ()  # eval.during_training generation tasks: (batch_size, max_new_tokens)
    checkpoint_dtype_bytes: float = 2.0    # bytes per weight in the model's files (config dtype; hub models: bf16)

    @property
    def trains_adapter(self) -> bool:
        from tunesmith.methods import get_method

        return get_method(self.method).saves == "adapter"

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.grad_accum


def precision_for(precision: str, device: Device) -> str:
    """training/device.py's choose_placement for a device not in hand."""
    if precision != "auto":
        return precision
    if device.kind == "cuda":
        return "bf16" if device.bf16 else "fp16"
    return "fp32"  # CPUs: fp32 (exact; bf16 is emulated on most)


def resolve_workload(cfg, device: Device, world: int = 1, full_training_bytes: int | None = None,
                     seq_len: int | None = None, model_config=None, trained_len: int = 0,
                     data_tokens: int = 0) -> Workload:
    """The Workload of Config `cfg` on `world` devices like `device`. full_training_bytes: what
    full fine-tuning holds on one rank (strategy auto picks fsdp above 70% of a device, as training
    does); seq_len: the longest sequence, when the data is known (else data.max_length);
    model_config: the transformers config (resolves LoRA's all-linear targets from the family table);
    trained_len / data_tokens: the longest sequence's trained tokens and the data's tokens, when known."""
    if cfg.objective.name == "rl":  # its time is mostly sampling, which the model here does not cover
        from tunesmith.errors import ConfigError

        raise ConfigError("tunesmith plan does not estimate objective.name=rl yet: its steps are mostly sampling "
                          "(objective.num_generations x objective.max_new_tokens decoded per prompt), which the "
                          "plan's throughput model does not cover; time a few steps instead (train.max_steps)")
    t, dist = cfg.train, cfg.train.distributed
    precision = precision_for(t.precision, device)
    quantized = cfg.method.name == "qlora"
    from tunesmith.methods import get_method

    adapter = get_method(cfg.method.name).saves == "adapter"
    frozen_bytes = 2.0 if (precision != "fp32" and adapter) else 4.0  # Placement.frozen_dtype
    strategy, reason = _strategy(dist, adapter, world, device, full_training_bytes)
    per_forward, parallel = _forward_shape(cfg, device, world, strategy)
    ds = dist.deepspeed
    return Workload(
        method=cfg.method.name, objective=cfg.objective.name, loss=cfg.objective.loss, device_kind=device.kind,
        precision=precision, base_dtype_bytes=frozen_bytes, quantized=quantized,
        double_quant=cfg.method.double_quant, micro_batch=per_forward, parallel=parallel,
        seq_len=min(seq_len or cfg.data.max_length, cfg.data.max_length),
        sequences_per_example=2 if cfg.objective.name in PAIRED_OBJECTIVES and cfg.objective.loss != "kto" else 1,
        grad_accum=t.grad_accum, batch_size=t.batch_size, gradient_checkpointing=t.gradient_checkpointing,
        activation_budget_mb=t.activation_memory_mb, optimizer=t.optimizer, strategy=strategy,
        zero_stage=ds.zero_stage if strategy == "deepspeed" else 0,
        offload_optimizer=(strategy == "deepspeed" and ds.offload_optimizer == "cpu")
        or (strategy == "fsdp" and dist.fsdp_cpu_offload),
        offload_params=(strategy == "deepspeed" and ds.offload_params == "cpu")
        or (strategy == "fsdp" and dist.fsdp_cpu_offload),
        world=world, epochs=t.epochs, max_steps=t.max_steps, packing=cfg.data.packing, train_on=cfg.data.train_on,
        strategy_reason=reason, lora_r=cfg.method.r if cfg.method.name in LOW_RANK else 0,
        lora_dropout=cfg.method.dropout if cfg.method.name in LOW_RANK else 0.0,
        lora_targets=_lora_targets(cfg.method, model_config) if cfg.method.name in LOW_RANK else (),
        attention="eager" if cfg.model.attn_implementation == "eager" else "sdpa",
        trained_len=trained_len, data_tokens=data_tokens, checkpoint_dtype_bytes=_file_dtype_bytes(model_config),
        generation=tuple((task.batch_size, task.max_new_tokens) for task in cfg.eval.tasks
                         if cfg.eval.during_training and task.kind == "generation"))


LOW_RANK = ("lora", "dora", "qlora")


def _file_dtype_bytes(model_config) -> float:
    """Bytes per weight of the checkpoint files, from the config's dtype (bf16 when it names none)."""
    import torch

    dtype = getattr(model_config, "dtype", None) if model_config is not None else None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return float(dtype.itemsize) if isinstance(dtype, torch.dtype) else 2.0
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _lora_targets(method_cfg, model_config) -> tuple[str, ...]:
    if method_cfg.target_modules != "all-linear":
        return tuple(method_cfg.target_modules)
    from tunesmith.models.families import family_of

    family = family_of(model_config) if model_config is not None else None
    return tuple(family.linear_modules) if family is not None else LLAMA_LINEAR


def _forward_shape(cfg, device: Device, world: int, strategy: str) -> tuple[int, int]:
    """(sequences padded into one forward, forwards whose activations are alive at once) as training
    decides them: recipes/sft.py micro_batching and training/loop.py _forwards. Preference objectives
    (recipes/dpo.py) always run padded micro-batches of batch_size pairs, whatever train.micro_batch."""
    t = cfg.train
    per_step = t.batch_size * t.grad_accum
    share = -(-per_step // world)  # a rank's share of the step: its forwards hold at most that
    if cfg.objective.name in PAIRED_OBJECTIVES:
        return min(t.batch_size, share), 1
    micro = t.micro_batch if t.micro_batch != "auto" else ("example" if device.kind == "cpu" else "batch")
    if micro == "batch":
        return min(t.batch_size, share), 1
    # micro_batch=example: k examples per forward call, run in threads on CPU or one after the other
    # elsewhere, but every one's graph is kept until the summed loss's backward (training/concurrent.py)
    alone = device.kind == "cpu" and world == 1 and strategy not in ("fsdp", "deepspeed")
    k = t.parallel_examples or max(d for d in (1, 2 if alone else 1) if per_step % d == 0)
    return 1, k


def _strategy(dist, adapter: bool, world: int, device: Device, full_bytes: int | None) -> tuple[str, str]:
    """training/distributed/strategy.py's choose_strategy, for a planned world size."""
    if world == 1:
        return "single", "one process"
    if dist.strategy != "auto":
        return dist.strategy, "as configured (train.distributed.strategy)"
    if adapter:
        return "ddp", "adapters: every rank holds the frozen model, DDP exchanges the adapter's gradients"
    from tunesmith.training.distributed.strategy import DDP_FIT_SHARE

    if full_bytes is not None and full_bytes > DDP_FIT_SHARE * device.memory_bytes:
        return "fsdp", "full fine-tuning needs more than 70% of a device for weights, gradients and AdamW state"
    return "ddp", "full fine-tuning fits one device: every rank holds it"
