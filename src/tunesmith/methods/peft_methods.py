"""Adapter methods through PEFT; adapters are saved in PEFT's own format (PEFT, vLLM, TGI load them)."""
from __future__ import annotations

import contextlib

import torch

from tunesmith.errors import ConfigError, ModelError
from tunesmith.methods import register_method
from tunesmith.models.families import family_of


# the task types a builder takes (`task_type`): what the model's head does. SEQ_CLS: a sequence
# classifier (transformers' *ForSequenceClassification, a reward model) whose new `score` head PEFT
# trains whole and saves next to the adapter (modules_to_save)
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS")
SCORE_HEAD = "score"  # transformers' GenericForSequenceClassification head


def _linear_names(model) -> list[str]:
    """Leaf names of the model's linear layers but the output head (the LM head, or a sequence
    classifier's score head, trained whole): what PEFT's all-linear takes (bitsandbytes' 4-bit
    layers are nn.Linear subclasses)."""
    heads = (model.get_output_embeddings(), getattr(model, SCORE_HEAD, None))
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and not any(m is h for h in heads)}
    return sorted(names)


def all_linear_targets(model, requested, method: str, family_modules: str = "linear_modules"):
    """`target_modules: all-linear` resolved from the family table (models/families.py; IA3 reads
    Family.ia3_modules) and said at training start; an unlisted architecture keeps PEFT's own
    resolution (None for IA3: PEFT's per-model defaults). An explicit list passes unchanged."""
    if requested != "all-linear":
        return requested
    family, present = family_of(model.config), _linear_names(model)
    kind = getattr(model.config, "model_type", "?")
    if family is None:
        print(f"{method} targets ({kind}, all-linear): PEFT's own choice for an architecture outside the family "
              f"table (linear layers: {', '.join(present)})", flush=True)
        return "all-linear" if family_modules == "linear_modules" else None
    targets = getattr(family, family_modules)
    missing = [t for t in targets if t not in present]
    if missing:
        raise ModelError(f"the {family.name} family's all-linear targets {missing} are not linear layers of this "
                         f"model (it has {', '.join(present)}); set method.target_modules to a list of them")
    # a variant with linear layers the table does not list says so rather than leaving them out unseen
    others = [n for n in present if n not in targets] if family_modules == "linear_modules" else []
    print(f"{method} targets ({family.name}, all-linear): {', '.join(targets)}"
          + (f"; not targeted: {', '.join(others)}" if others else ""), flush=True)
    return list(targets)


def _lora_config(model, cfg, use_dora: bool, method: str, task_type: str):
    from peft import LoraConfig

    # bias="none": the base model's biases (Qwen2's q/k/v) stay frozen, as every other base weight
    targets = all_linear_targets(model, cfg.target_modules, method)
    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_rslora=cfg.rslora,
                      use_dora=use_dora, target_modules=targets, task_type=_task(task_type), bias="none")


def _task(task_type: str) -> str:
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type {task_type!r} is not one of {TASK_TYPES}")
    return task_type


def _wrap(model, peft_cfg):
    from peft import get_peft_model

    return get_peft_model(model, peft_cfg)


LORA_OPTIONS = ("r", "alpha", "dropout", "rslora", "target_modules")


@register_method("lora", options=LORA_OPTIONS)
def build_lora(model, cfg, task_type: str = "CAUSAL_LM"):
    """LoRA: low-rank updates on the target linear layers."""
    return _wrap(model, _lora_config(model, cfg, use_dora=False, method="lora", task_type=task_type))


@register_method("dora", options=LORA_OPTIONS)
def build_dora(model, cfg, task_type: str = "CAUSAL_LM"):
    """DoRA: LoRA with a learned magnitude per output feature."""
    return _wrap(model, _lora_config(model, cfg, use_dora=True, method="dora", task_type=task_type))


def compute_dtype(cfg) -> torch.dtype:
    if cfg.quant_compute_dtype != "auto":
        return getattr(torch, cfg.quant_compute_dtype)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32  # CPUs without native bf16 run it 8-13x slower than fp32


def qlora_load_kwargs(cfg) -> dict:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("method qlora needs bitsandbytes: pip install 'tunesmith[qlora]' "
                          "(or pip install bitsandbytes)") from None
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(cfg))}


@register_method("qlora", load_kwargs=qlora_load_kwargs,
                 options=(*LORA_OPTIONS, "quant_compute_dtype", "double_quant"))
def build_qlora(model, cfg, task_type: str = "CAUSAL_LM"):
    """QLoRA: LoRA over a base model quantized to 4-bit NF4 (bitsandbytes; CPU and CUDA)."""
    from peft import prepare_model_for_kbit_training

    # Gradient checkpointing stays a training option, not a side effect of choosing QLoRA.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return _wrap(model, _lora_config(model, cfg, use_dora=False, method="qlora", task_type=task_type))


@register_method("ia3", options=("target_modules",))
def build_ia3(model, cfg, task_type: str = "CAUSAL_LM"):
    """IA3: learned rescaling of attention keys/values and feed-forward activations."""
    from peft import IA3Config

    targets = all_linear_targets(model, cfg.target_modules, "ia3", "ia3_modules")
    family = family_of(model.config)
    if targets is None:  # PEFT's per-model defaults
        ff = None
    elif cfg.target_modules == "all-linear":
        ff = [t for t in targets if t in family.feedforward_modules]
    else:  # an explicit list: its feed-forward layers, by the usual names
        ff = [t for t in targets if any(k in t for k in ("down", "fc2", "mlp", "ffn"))]
    return _wrap(model, IA3Config(task_type=_task(task_type), target_modules=targets, feedforward_modules=ff))


@register_method("prefix", options=("num_virtual_tokens",))
def build_prefix(model, cfg, task_type: str = "CAUSAL_LM"):
    """Prefix tuning: learned key/value prefixes in every attention layer."""
    from peft import PrefixTuningConfig

    return _wrap(model, PrefixTuningConfig(task_type=_task(task_type), num_virtual_tokens=cfg.num_virtual_tokens))


@register_method("prompt", options=("num_virtual_tokens",))
def build_prompt(model, cfg, task_type: str = "CAUSAL_LM"):
    """Prompt tuning: learned virtual token embeddings before the input."""
    from peft import PromptTuningConfig

    if _task(task_type) == "SEQ_CLS":
        # PEFT feeds a sequence classifier input embeddings then, from which transformers cannot find
        # each row's last non-pad token: every padded row would be scored at its padding
        raise ConfigError("method.name=prompt cannot train a sequence scorer (a reward model): its virtual tokens "
                          "hide where each padded row ends; use method.name=lora (or prefix, ia3, full)")
    return _wrap(model, PromptTuningConfig(task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens))


def _lean_lora_forward(module, lora_linear):
    """A forward for one PEFT lora.Linear doing PEFT's arithmetic (base + B(A(x)) x scaling, x cast
    to the adapter's dtype, the sum cast back) without its per-call bookkeeping, or None where the
    layer is not that plain case: another layer type, a variant (DoRA), several or no active adapters,
    merged or disabled adapters, an active dropout, fan_in_fan_out, hooks on its parts. Weights are
    read at each call (FSDP swaps them in and out); a call with extra arguments, or after the layer's
    state changed, goes to PEFT's own forward."""
    import torch.nn.functional as F

    if type(module) is not lora_linear or module.merged or module.disable_adapters or module.fan_in_fan_out:
        return None
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1 or active[0] in getattr(module, "lora_variant", {}):
        return None
    name = active[0]
    base, lora_a, lora_b, dropout = module.base_layer, module.lora_A[name], module.lora_B[name], module.lora_dropout[name]
    parts = (base, lora_a, lora_b, dropout)
    if type(base) is not torch.nn.Linear or type(lora_a) is not torch.nn.Linear or type(lora_b) is not torch.nn.Linear:
        return None
    if any(p._forward_hooks or p._forward_pre_hooks for p in parts):
        return None
    if not (isinstance(dropout, torch.nn.Identity) or (isinstance(dropout, torch.nn.Dropout) and not dropout.training)):
        return None
    scaling, peft_forward = module.scaling[name], lora_linear.forward
    cast = getattr(module, "cast_input_dtype_enabled", True)

    def forward(x, *args, **kwargs):
        if args or kwargs or module.merged or module.disable_adapters or module.active_adapters != [name] \
                or dropout.training:
            return peft_forward(module, x, *args, **kwargs)
        result = base.forward(x)  # F.linear, or the packed weight's (models/packed.py) while sampling
        a = x.to(lora_a.weight.dtype) if cast and x.dtype != lora_a.weight.dtype else x
        return (result + F.linear(F.linear(a, lora_a.weight, lora_a.bias), lora_b.weight, lora_b.bias)
                * scaling).to(result.dtype)
    return forward


@contextlib.contextmanager
def lean_lora_inference(model):
    """Within: every plain PEFT LoRA linear layer of `model` runs a lean forward with PEFT's
    arithmetic (the same outputs, bit for bit: tests/test_methods_lean.py) without PEFT's per-call
    work, which at a decode step's few rows costs as much as the adapter's matrix products (~95 us a
    layer of 576 x 576 at 8 rows on this project's 2-core CPU, against ~40 us lean): for sampling
    (training/rollout.py), where each token runs every layer once. Other layers keep PEFT's forward.
    Yields how many layers run lean; leaves every layer as it found it."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        yield 0
        return
    patched = []
    try:
        for module in model.modules():
            if "forward" in vars(module):
                continue  # a forward already set on the instance (ours, nested, or someone else's)
            forward = _lean_lora_forward(module, LoraLinear)
            if forward is not None:
                module.forward = forward
                patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward
