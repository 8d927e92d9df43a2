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


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    model.config.use_cache = False
    return model


def attach_adapter(model, adapter_dir: str | Path, trainable: bool = False):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def decoder_and_head(model):
    """(decoder returning hidden states, output projection) of a causal LM, PEFT-wrapped or not.

    The training loss projects only the trained positions through the head, so the full
    [tokens x vocab] logits are never built for prompt tokens.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()
