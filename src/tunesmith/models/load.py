"""The one place that calls transformers/PEFT loading APIs, so upstream renames touch one file."""
from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.errors import ModelError


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.eos_token_id is None:
        raise ModelError(f"{path}: tokenizer has no EOS token; set one in tokenizer_config.json")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding positions are masked out of loss and attention
    return tok


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               attention: str | None = None, **kwargs):
    """`attention`: an attn_implementation (models/attention.py chooses it; None: transformers'
    default). kwargs go to from_pretrained (e.g. quantization_config from a method's load_kwargs)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
        attn_implementation=attention, **kwargs)
    model.config.use_cache = False
    return model


def load_score_model(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                     attention: str | None = None, **kwargs):
    """A sequence scorer: transformers' AutoModelForSequenceClassification with one label (a reward
    model), i.e. the decoder and a bias-free linear `score` head read at each row's last non-pad
    token. From a causal LM's directory the head is new and random (transformers' load report says
    so); from a saved scorer it is the saved one."""
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=1, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
            attn_implementation=attention, **kwargs)
    except ValueError as exc:
        if "Unrecognized configuration class" not in str(exc):
            raise
        raise ModelError(f"{path}: transformers has no sequence-classification model for this architecture, so it "
                         f"cannot be a reward model ({str(exc).splitlines()[0][:160]})") from None
    model.config.use_cache = False
    return model


def causal_lm_class(path: str | Path, trust_remote_code: bool = False):
    """The class load_model builds for `path`, without loading weights (its attention support decides
    model.attn_implementation=auto); None when its code ships with the weights and may not run."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    remote = (getattr(config, "auto_map", None) or {}).get("AutoModelForCausalLM")
    if remote and trust_remote_code:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(remote, str(path))
    return MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)


def attach_adapter(model, adapter_dir: str | Path, trainable: bool = False):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def merge_adapter(peft_model):
    """The base model with the adapter's weight changes added in (PEFT's merge_and_unload)."""
    return peft_model.merge_and_unload()


def dequantized(model, dtype: torch.dtype):
    """A bitsandbytes-quantised model turned back into ordinary float layers (transformers'
    dequantize), holding the very values the quantised layers computed with."""
    for name, module in model.named_modules():
        # bitsandbytes repacks 4-bit weights for its CPU inference kernel on the first eval forward,
        # lossily (bf16 scales) and, for non-square layers, not invertibly: dequantising then would
        # give scrambled weights without any error. Merges therefore start from a fresh load.
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            raise ModelError(f"{name}: this 4-bit model already ran an inference forward on CPU, which repacked "
                             "its weights; load it again and dequantise before using it")
    model = model.dequantize(dtype=dtype)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model.to(dtype)


class OutputHead:
    """The output head as the model's own forward applies it: the projection (lm_head), then what
    the architecture does to its output (models/families.logit_transform: Gemma 2's final logit
    soft-capping, cap * tanh(logits / cap); Cohere's and Granite's scales). Every path that
    projects hidden states itself goes through it, so none silently trains or scores raw logits
    that the model never produces."""

    def __init__(self, proj: torch.nn.Module, scale: float = 1.0, softcap: float | None = None):
        self.proj, self.scale, self.softcap = proj, scale, softcap

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.finish(self.proj(hidden))

    def finish(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def decoder_and_head(model) -> tuple[torch.nn.Module, OutputHead]:
    """(decoder returning hidden states, output head) of a causal LM, PEFT-wrapped or not.

    The training loss projects only the trained positions through the head, so the full
    [tokens x vocab] logits are never built for prompt tokens.
    """
    from tunesmith.models.families import logit_transform

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    scale, softcap = logit_transform(base.config)
    return base.get_decoder(), OutputHead(base.get_output_embeddings(), scale, softcap)


@torch.no_grad()
def check_packing_isolates(model) -> None:
    """Packed rows (data/pack.py) rely on transformers turning position_ids that restart at 0 into
    a per-example causal mask (masking_utils.find_packed_sequence_indices), which it does only with
    attention_mask=None and no KV cache, and only in models built on masking_utils. Check it on
    the model about to be trained: a path that skips it would let examples attend to each other
    without any error, so run two examples packed and the second alone and compare. With a small
    sliding window (tiny test models) the second example outgrows it, so the sliding-window
    layers' mask is checked too; a real model's window (512+ tokens) would make the check cost a
    long forward, and transformers builds both masks from the same packed-sequence indices."""
    from tunesmith.models.families import sliding_window

    decoder, _ = decoder_and_head(model)
    param = next(decoder.parameters())
    window = sliding_window(decoder.config) or 0
    second = window + 4 if 0 < window <= 60 else 5
    ids = torch.arange(3, 7 + second, device=param.device) % decoder.get_input_embeddings().num_embeddings
    positions = torch.cat([torch.arange(4), torch.arange(second)]).to(param.device)
    was_training = model.training
    model.eval()  # dropout would make the two passes differ for no reason
    try:
        packed = decoder(input_ids=ids[None], position_ids=positions[None], use_cache=False).last_hidden_state
        alone = decoder(input_ids=ids[None, 4:], use_cache=False).last_hidden_state
    finally:
        model.train(was_training)
    diff = float((packed[0, 4:] - alone[0]).abs().max())
    tolerance = (1e-3 if param.dtype == torch.float32 else 3e-2) * float(alone.abs().max())
    if not diff <= tolerance:
        impl = getattr(decoder.config, "_attn_implementation", "?")
        raise ModelError(f"data.packing: this model (attention implementation '{impl}') lets packed examples "
                         f"attend to each other (hidden states differ by {diff:.3g}); set data.packing=false")
