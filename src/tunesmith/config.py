"""Typed run configuration: YAML file + `a.b=c` overrides, validated strictly at load.

Every field carries a description; `tunesmith init` prints them as comments, so the schema is
the documentation. Unknown keys are errors that name the closest valid key (a typo must never be
silently ignored and leave a default in force).
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tunesmith.errors import ConfigError
from tunesmith.names import Registered, allowed_values, registered_names  # noqa: F401 (re-exported for the CLI)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="Alias (see `tunesmith models list`), local HF directory, .gguf file or hub id.",
    )
    trust_remote_code: bool = Field(False, description="Run model code shipped with the weights.")
    attn_implementation: Registered("attention") = Field(
        "auto", description="Attention kernel of the trained model. auto: flash_attention_2 on a CUDA GPU training "
                            "in bf16/fp16 when flash-attn is installed, else sdpa (eager where the model has no "
                            "sdpa); the choice and why are printed.")


FormatName = Registered("data format")


class SourceSection(_Section):
    path: str = Field(description="File, glob (data/*.jsonl.gz) or `datasets` save_to_disk directory.")
    weight: float = Field(1.0, gt=0, description="Relative share of this source in the training mix.")
    format: FormatName = Field("auto", description="Record format; auto detects it per record.")
    columns: dict[str, str] = Field(default_factory=dict,
                                    description="Canonical field -> column, e.g. {instruction: text, output: label}.")


class DataSection(_Section):
    train: str | None = Field("data/train.jsonl", description="Training file, glob or directory (one source).")
    sources: list[SourceSection] = Field(
        default_factory=list, description="Several training sources mixed by weight (replaces data.train).")
    validation: str | None = Field(None, description="Validation file; None skips validation loss.")
    format: FormatName = Field("auto", description="Record format of data.train/validation; auto detects it.")
    columns: dict[str, str] = Field(default_factory=dict,
                                    description="Canonical field -> column for data.train/validation.")
    template: Registered("chat template") | None = Field(
        None, description="Named chat template; None uses the tokenizer's own (chatml if it has none).")
    train_on: Literal["all_assistant", "last_assistant", "all"] = Field(
        "all_assistant", description="Trained tokens: every assistant turn, the last one, or all (prompts too).")
    system_prompt: str | None = Field(
        None, description="System message added to records that have none (None: template default)."
    )
    max_length: int = Field(512, gt=8, description="Longest tokenised example; longer ones are truncated.")
    packing: bool = Field(False, description="Pack short examples into max_length sequences (no cross-attention); "
                                             "train.batch_size then counts packed sequences.")
    skip_invalid: bool = Field(False, description="Quarantine invalid rows (file.quarantine.jsonl) instead of stopping.")


class MethodSection(_Section):
    name: Registered("method") = Field(
        "lora", description="Fine-tuning method (methods/).")
    r: int = Field(16, gt=0, description="LoRA/DoRA/QLoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules that get adapters: 'all-linear' or a list of names."
    )
    num_virtual_tokens: int = Field(16, gt=0, description="Virtual tokens for prefix and prompt tuning.")
    trainable: list[str] = Field(
        default_factory=lambda: ["norm", "bias"],
        description="selective: parameters to train, by name fragment ('norm', 'bias', 'layers.29.').")
    quant_compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="qlora: compute dtype of the 4-bit layers (auto: bf16 on GPU, fp32 on CPU).")
    double_quant: bool = Field(True, description="qlora: also quantize the quantization constants.")


class DeepSpeedSection(_Section):
    """train.distributed.strategy=deepspeed: DeepSpeed ZeRO (pip install 'tunesmith[deepspeed]'). Mapped to
    DeepSpeed's JSON by training/distributed/deepspeed.py; batch sizes, accumulation, clipping, precision and
    the optimizer always come from train.*."""

    zero_stage: Literal[2, 3] = Field(
        2, description="2: optimizer state and gradients split over ranks, every rank holds the weights. 3: the "
                       "weights too (models too big for one device), gathered layer by layer in each forward.")
    offload_optimizer: Literal["none", "cpu"] = Field(
        "none", description="cpu: optimizer state and its step in CPU memory (DeepSpeed's CPU Adam): the least "
                            "GPU memory, a slower step. NVMe offload: through a DeepSpeed JSON (config).")
    offload_params: Literal["none", "cpu"] = Field(
        "none", description="cpu: zero_stage 3 keeps the weights in CPU memory between uses (slower).")
    config: str | None = Field(
        None, description="A DeepSpeed JSON file, used as it is (its zero_optimization wins over the keys above, "
                          "which must then agree with it or stay unset). Keys tunesmith sets from train.* (batch "
                          "sizes, gradient_accumulation_steps, gradient_clipping, bf16/fp16, the optimizer's lr "
                          "and weight_decay) may be left out or \"auto\"; a different value is an error.")

    @model_validator(mode="after")
    def _offload_params_needs_stage_3(self):
        if self.offload_params != "none" and self.zero_stage != 3 and self.config is None:
            raise ValueError(f"train.distributed.deepspeed.offload_params={self.offload_params} needs "
                             f"train.distributed.deepspeed.zero_stage=3 (it is {self.zero_stage}): ZeRO-2 keeps "
                             "every weight on every rank; set zero_stage: 3 or remove offload_params")
        return self


class DistributedSection(_Section):
    """Several processes (GPUs, machines): see README "Scaling out". train.batch_size x
    train.grad_accum stays the step's batch whatever the number of processes: N ranks split it."""

    strategy: Registered("strategy") = Field(
        "auto", description="How ranks share the model. ddp: every rank holds it, gradients are exchanged (adapters, "
                            "or models that fit one device). fsdp: torch FSDP2, weights, gradients and optimizer "
                            "state sharded over ranks (full fine-tuning of models too big for one device). "
                            "deepspeed: DeepSpeed ZeRO (train.distributed.deepspeed). auto: ddp for adapters; for "
                            "full fine-tuning ddp when it fits one device, else fsdp (the choice is printed).")
    launcher: Registered("launcher") = Field(
        "torchrun", description="What starts the processes when train.distributed.workers > 0 (or --nproc): torchrun "
                                "on this machine, or ray (Ray Train workers, on a Ray cluster). Runs started by a "
                                "launcher (torchrun, srun, accelerate) ignore it.")
    workers: int = Field(0, ge=0, description="Processes tunesmith starts itself (--nproc N sets it); 0: this process "
                                              "alone, unless a launcher started it as one rank.")
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="Collective backend; auto: nccl on GPUs, "
                                                                         "gloo on CPUs.")
    timeout_s: float = Field(600, gt=0, description="Longest wait on another rank in a collective before the run "
                                                    "stops with an error (a dead or stuck rank).")
    bucket_mb: float = Field(25, gt=0, description="ddp: gradient bucket size; a full bucket is all-reduced while "
                                                   "the backward goes on.")
    fsdp_cpu_offload: bool = Field(False, description="fsdp: keep parameters, gradients and optimizer state in CPU "
                                                      "memory between uses (less GPU memory, slower steps).")
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection,
                                        description="strategy deepspeed: ZeRO stage, offload, or a DeepSpeed JSON.")


class TrainSection(_Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored if max_steps > 0).")
    max_steps: int = Field(0, ge=0, description="Optimizer steps to run; 0 derives them from epochs.")
    batch_size: int = Field(4, gt=0, description="Examples per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    micro_batch: Literal["auto", "batch", "example"] = Field(
        "auto", description="What one forward/backward holds. batch: train.batch_size examples padded together "
                            "(fastest on GPUs). example: one example, unpadded, with the gradients accumulated, so a "
                            "step still holds batch_size x grad_accum examples and the same gradient; attention needs "
                            "no padding mask and activations are one example's (fastest and smallest on CPUs). "
                            "auto: example on CPU, batch on GPU.")
    parallel_examples: int = Field(
        0, ge=0, description="micro_batch=example on CPU: run this many examples of a step at once, each on one "
                             "CPU thread (more throughput than splitting each matmul across threads, for as many "
                             "examples' activations in memory); 0: auto (2 when torch has 2+ threads, else 1).")
    activation_memory_mb: float = Field(
        0, ge=0, description="Most activation memory one forward may keep for its backward (per example running "
                             "at once with micro_batch=example, else per micro-batch): a longer forward recomputes "
                             "just enough decoder layers in the backward to fit (gradient checkpointing for those "
                             "layers only; same gradients), a shorter one recomputes nothing. 0: no limit.")
    malloc_mmap_threshold: int = Field(
        0, ge=0, description="glibc CPUs: allocations of at least this many bytes get their own mmap and go back "
                             "to the OS when freed, so resident memory follows the live tensors instead of a "
                             "fragmented heap's high-water mark (about -0.9 GB peak for SmolLM2 LoRA) at the cost "
                             "of page faults (slower); e.g. 131072. 0: glibc's default.")
    allocator: Registered("allocator") = Field(
        "auto", description="Memory allocator of the `tunesmith train` process (Linux): auto picks tcmalloc, "
                            "jemalloc or mimalloc (shipped as a dependency), whichever is found first; their "
                            "reuse of freed activations keeps resident memory near the live tensors, where "
                            "glibc's heap fragments. system: glibc's. Applied by re-executing the command once.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR schedule after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 disables it.")
    seed: int = Field(0, description="Seed for data order and adapter initialisation.")
    log_every: int = Field(1, gt=0, description="Log metrics every N optimizer steps.")
    eval_every: int = Field(0, ge=0, description="Validation loss every N steps; 0: only at the end.")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (for --resume); 0: no checkpoints.")
    keep_last: int = Field(2, gt=0, description="Checkpoints kept (plus the best one).")
    patience: int = Field(0, ge=0, description="Stop after N evaluations without improvement; 0: never.")
    restore_best: bool = Field(False, description="Save the best-validation weights instead of the last.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on GPUs that support it, fp32 on CPUs.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw", description="AdamW (fused where available); 8-bit and paged variants need CUDA.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    compile: bool = Field(False, description="torch.compile each decoder layer (inductor: a C++ compiler on CPU, "
                                             "triton on GPU); same loss, compiled on the first steps.")
    spike_factor: float = Field(3.0, gt=1, description="Warn when a step's loss exceeds this x the recent mean.")
    threads: int = Field(0, ge=0, description="CPU threads for torch; 0 keeps torch's default.")
    trackers: list[Registered("tracker")] = Field(
        default_factory=list, description="Also log to these (written inside the run directory, offline).")
    distributed: DistributedSection = Field(default_factory=DistributedSection,
                                            description="Several processes: strategy, launcher, workers.")

    @model_validator(mode="after")
    def _whole_micro_batches(self):
        k, per_step = self.parallel_examples, self.batch_size * self.grad_accum
        if k and self.micro_batch == "batch":
            raise ValueError(f"train.parallel_examples={k} needs train.micro_batch=example (or auto on CPU); "
                             "train.micro_batch=batch runs padded batches")
        if k and per_step % k:
            raise ValueError(f"train.parallel_examples={k} must divide train.batch_size x train.grad_accum = "
                             f"{self.batch_size} x {self.grad_accum} = {per_step}: a step runs whole groups of "
                             "examples at once")
        return self


class RunSection(_Section):
    name: str | None = Field(None, description="Run directory name; None generates one from time.")
    output_dir: str = Field("runs", description="Parent directory of run directories.")


class PrepareSection(_Section):
    """`tunesmith data prepare`: split data.train, clean each split, write train/validation/test."""

    output_dir: str = Field("data/prepared", description="Directory for train/validation/test.jsonl and the report.")
    validation_fraction: float = Field(0.05, ge=0, lt=1, description="Share of rows held out for validation.")
    test_fraction: float = Field(0.05, ge=0, lt=1, description="Share of rows held out for test.")
    seed: int = Field(0, description="Seed of the split (made before any cleaning, so cleaning cannot move rows).")
    dedup: Literal["near", "exact", "none"] = Field(
        "near", description="exact: drop copies (case/whitespace folded); near: also MinHash near-duplicates; "
                            "none. Across splits the train copy is the one dropped.")
    near_dup_threshold: float = Field(0.85, gt=0, le=1, description="Jaccard similarity of word shingles "
                                                                    "at which two rows are near-duplicates "
                                                                    "(rows of up to 100 words one word apart "
                                                                    "are too: see data/dedup.py).")
    shingle_words: int = Field(3, gt=0, description="Words per shingle for near-duplicate detection.")
    num_perm: int = Field(128, ge=16, description="MinHash permutations: more is more accurate and slower.")
    pii: Literal["keep", "redact", "drop"] = Field(
        "redact", description="Rows with emails, phones, card numbers or secrets: keep, redact the spans, or drop.")
    min_tokens: int | None = Field(None, gt=0, description="Drop rows shorter than this many tokens (None: no limit).")
    max_tokens: int | None = Field(None, gt=0, description="Drop rows longer than this many tokens instead of "
                                                           "truncating them (None: no limit).")
    contamination_eval: list[str] = Field(
        default_factory=list, description="Eval files: training rows sharing a word n-gram with them are removed.")
    contamination_ngram: int = Field(13, gt=0, description="Words per n-gram for the contamination check.")
    workers: int = Field(0, ge=0, description="Processes for tokenising and hashing; 0 uses every core.")


class RewardSpec(_Section):
    function: str = Field(description="A built-in reward (exact, numeric, json, json_schema, regex, length: "
                                      "training/rewards.py) or 'module:function', called as "
                                      "function(prompts, completions, **row) -> list[float].")
    weight: float = Field(1.0, description="Weight of this reward in the summed reward.")
    column: str | None = Field(None, description="Data column holding the reference answer (exact, numeric, "
                                                 "json field match).")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword options of the function (regex: "
                                                                      "pattern; json_schema: schema; length: target).")

    @model_validator(mode="after")
    def _known(self):
        from tunesmith.training.rewards import check_spec

        check_spec(self)  # ValueError naming the function, option or column problem
        return self


class ObjectiveSection(_Section):
    name: Registered("objective") = Field("sft", description="Training objective: the recipe that runs (recipes/).")
    loss: Registered("preference loss") = Field(
        "sigmoid", description="Preference loss of objective dpo (training/preference.py).")
    beta: float = Field(0.1, gt=0, description="Preference strength (DPO/IPO/SimPO/KTO beta; ORPO lambda).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed share of flipped labels (robust DPO).")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO target reward margin.")
    desirable_weight: float = Field(1.0, gt=0, description="KTO weight of desirable (chosen) examples.")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO weight of undesirable (rejected) examples.")
    reference: Literal["auto", "precomputed"] = Field(
        "auto", description="auto: the base with the adapter disabled (adapters) or log-probs precomputed "
                            "once (full fine-tuning); precomputed: always precompute them before training.")
    # reward model (objective.name=reward)
    margin_column: str | None = Field(None, description="Reward model: data column with the margin each pair's "
                                                        "chosen score must beat the rejected one by (TRL's margin).")
    center_rewards: float = Field(0.0, ge=0, description="Reward model: coefficient of mean((r_chosen + r_rejected)^2), "
                                                         "which keeps scores centred on 0 (TRL's "
                                                         "center_rewards_coefficient).")
    # online RL (objective.name=rl)
    advantage: Literal["group", "gae"] = Field(
        "group", description="RL advantages: group = each completion's reward against its prompt's k completions "
                             "(GRPO); gae = a value head and generalised advantage estimation (PPO).")
    rl_loss: Registered("rl loss") = Field("grpo", description="RL loss normalisation (training/rl.py).")
    num_generations: int = Field(8, ge=2, description="RL: completions sampled per prompt (k, the group size).")
    max_new_tokens: int = Field(128, gt=0, description="RL: longest completion, in tokens.")
    temperature: float = Field(1.0, gt=0, description="RL: sampling temperature of the completions.")
    top_p: float = Field(1.0, gt=0, le=1, description="RL: nucleus sampling of the completions.")
    kl_coef: float = Field(0.04, ge=0, description="RL: weight of the KL penalty to the reference (the base with "
                                                   "the adapter disabled); 0 skips the reference pass.")
    epsilon: float = Field(0.2, gt=0, description="RL: PPO clip range of the probability ratio (lower side).")
    epsilon_high: float | None = Field(None, gt=0, description="RL: upper clip range (DAPO's clip-higher); "
                                                               "default: objective.epsilon.")
    scale_rewards: Literal["group", "none"] = Field(
        "group", description="RL group advantages: divide by the group's reward std (group) or not (none, "
                             "as Dr. GRPO recommends).")
    gamma: float = Field(1.0, gt=0, le=1, description="RL gae: discount per token.")
    lam: float = Field(0.95, ge=0, le=1, description="RL gae: GAE lambda.")
    vf_coef: float = Field(0.1, gt=0, description="RL gae: weight of the value head's loss.")
    rewards: list[RewardSpec] = Field(default_factory=list, description="RL reward functions, summed with their "
                                                                      "weights (training/rewards.py).")
    reward_model: str | None = Field(None, description="RL: a reward model run directory (objective.name=reward) "
                                                       "scored as one more reward function.")


TaskKind = Registered("eval task kind")
GenerationMetric = Registered("generation metric")


class EvalTaskSection(_Section):
    """One evaluation task (`tunesmith eval`, `tunesmith compare`, and eval.during_training)."""

    name: str = Field(description="Task name: results go to eval/<name>.json.")
    role: Literal["task", "general"] = Field(
        "task", description="task: what the fine-tune is for; general: a general benchmark that compare checks "
                            "for forgetting (a drop above eval.forgetting_threshold points is flagged).")
    kind: TaskKind = Field(description="perplexity (text or a data split), generation (a data split's replies "
                                       "scored by `metrics`) or multiple_choice (log-likelihood of each choice).")
    path: str = Field(description="Data file (JSONL/JSON/CSV/TSV/Parquet, or a text file for perplexity).")
    format: str = Field("auto", description="Record format: a data format (generation/perplexity) or, for "
                                            "multiple_choice, arc | hellaswag | mmlu | choices (auto detects it).")
    columns: dict[str, str] = Field(default_factory=dict, description="Canonical field -> column, as data.columns.")
    limit: int | None = Field(None, gt=0, description="Evaluate only the first N records (None: all).")
    sample: int | None = Field(None, gt=0, description="Evaluate a seeded random sample of N records (None: all).")
    seed: int = Field(0, description="Seed of the sample and of sampled decoding.")
    metrics: list[GenerationMetric] = Field(
        default_factory=lambda: ["exact_match", "normalized_match"],
        description="generation: metrics to compute (the first is the task's primary metric).")
    labels: list[str] = Field(default_factory=list,
                              description="generation label tasks: the label set (default: the references seen).")
    json_fields: list[str] = Field(default_factory=list, description="generation with `json`: fields scored.")
    system_prompt: str | None = Field(None, description="System message added to prompts that have none.")
    max_new_tokens: int = Field(64, gt=0, description="generation: longest reply.")
    stop: list[str] = Field(default_factory=list, description="generation: strings that end a reply.")
    answer_end: Registered("answer end") = Field(
        "auto", description="generation: where a reply's answer ends; generation stops there and the reply is cut "
                            "there. line: at the first line break after text; json: past the first JSON object "
                            "(braces in strings ignored; a reply opening with prose ends at once: it scores "
                            "nothing); none: the whole reply. auto: json for the `json` metric, line for "
                            "accuracy/macro_f1, else none.")
    temperature: float = Field(0.0, ge=0, description="generation: 0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="generation: nucleus sampling mass.")
    batch_size: int = Field(16, gt=0, description="Sequences per forward pass.")
    shots: int = Field(0, ge=0, description="multiple_choice: solved examples put before each question.")
    shots_path: str | None = Field(None, description="multiple_choice: file the shots come from (default: path).")
    shared_prefix: bool = Field(True, description="multiple_choice: encode each context once: one row per question "
                                "(context, then every choice behind a block attention mask), or choices scored from "
                                "the cached keys/values where the model takes no such mask; False feeds each choice "
                                "whole, as lm-eval (the same log-likelihoods, slower).")
    max_length: int | None = Field(None, gt=8, description="perplexity: window length (None: the model's context).")
    stride: int | None = Field(None, gt=0, description="perplexity: tokens the window moves by (None: max_length/2).")

    @model_validator(mode="after")
    def _answer_end_needs_generation(self):
        if self.answer_end != "auto" and self.kind != "generation":
            raise ValueError(f"eval task '{self.name}': answer_end={self.answer_end} applies to generation tasks; "
                             f"a {self.kind} task generates nothing: remove answer_end")
        return self


class EvalSection(_Section):
    tasks: list[EvalTaskSection] = Field(default_factory=list, description="Tasks of `tunesmith eval` / compare.")
    during_training: bool = Field(False, description="Run eval.tasks on every checkpoint (train.save_every) and "
                                                     "on the final weights; results in eval/step-N/.")
    best_metric: str | None = Field(
        None, description="Pick the best checkpoint by TASK/METRIC (e.g. banking77/accuracy) instead of "
                          "validation loss; higher is better (perplexity: lower).")
    forgetting_threshold: float = Field(2.0, ge=0, description="compare: points a general benchmark may drop "
                                                               "before it is flagged as forgetting.")
    gates: dict[str, float] = Field(
        default_factory=dict, description="compare: TASK/METRIC -> least tuned-minus-base change (points; "
                                          "negative allows a drop); a failed gate exits non-zero.")


class Config(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    method: MethodSection = Field(default_factory=MethodSection)
    train: TrainSection = Field(default_factory=TrainSection)
    run: RunSection = Field(default_factory=RunSection)
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection)
    prepare: PrepareSection = Field(default_factory=PrepareSection)
    eval: EvalSection = Field(default_factory=EvalSection)

    @model_validator(mode="after")
    def _consistent(self):
        """Keys that do nothing under this objective, or without another key: refused before any work."""
        from tunesmith.config_rules import config_errors

        errors = config_errors(self)
        if errors:
            raise ValueError("\n  ".join(errors))
        return self


def _fields_at(path: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Config
    for part in path:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _type_name(err: dict) -> str:
    kind = err["type"]
    names = {"int_parsing": "an integer", "int_type": "an integer", "float_parsing": "a number",
             "float_type": "a number", "bool_parsing": "true or false", "bool_type": "true or false",
             "string_type": "a string", "literal_error": "one of the allowed values",
             "greater_than": "a larger value", "dict_type": "a mapping", "list_type": "a list"}
    return names.get(kind, kind)


def _explain(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            valid = _fields_at(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else (
                f"valid keys here: {', '.join(valid)}")
            lines.append(f"  unknown key '{dotted}': {hint}")
        elif err["type"] == "value_error":  # our validators' messages name their keys and the fix
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  field '{dotted}': {msg}" if dotted else f"  {msg}")
        else:
            lines.append(f"  field '{dotted}': expected {_type_name(err)}, got {err.get('input')!r} ({err['msg']})")
    return "\n".join(lines)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.sub=value (e.g. train.lr=1e-4)")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    # YAML reads 1e-4 as a string (YAML 1.1 wants a dot); numbers typed on a command line are numbers.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{k}' is not a section")
        node[keys[-1]] = value
    return data


def parse_config(data: dict | None, source: str = "<config>") -> Config:
    try:
        return Config.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError(_explain(exc, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read YAML (or nothing: all defaults), apply overrides, validate."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (create one with `tunesmith init {path}`)")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections (model, data, ...)")
    if overrides:
        source += " + overrides"
    return parse_config(apply_overrides(data, list(overrides or [])), source)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def commented_template(cfg: Config | None = None) -> str:
    """YAML of every field with its description as a comment: the starter config."""
    cfg = cfg or Config()
    out = ["# tunesmith run config. Every key is optional; shown values are the defaults.",
           "# Override any key on the command line: tunesmith train CONFIG train.lr=1e-4", ""]
    for section_name, section_field in Config.model_fields.items():
        out.append(f"{section_name}:")
        out += _commented_fields(getattr(cfg, section_name), "  ")
        out.append("")
    return "\n".join(out)


def _commented_fields(section: BaseModel, indent: str) -> list[str]:
    out = []
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        allowed = allowed_values(field.annotation, field.metadata)
        out.append(f"{indent}# {field.description}" + (f" One of: {', '.join(map(str, allowed))}." if allowed else ""))
        if isinstance(value, BaseModel):  # a nested section (train.distributed)
            out.append(f"{indent}{name}:")
            out += _commented_fields(value, indent + "  ")
            continue
        out.append(indent + yaml.safe_dump({name: value}, default_flow_style=True).strip()[1:-1])
    return out
