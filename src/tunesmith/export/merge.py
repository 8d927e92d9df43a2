"""A run's adapter folded into its base model, as an ordinary Hugging Face model directory.

QLoRA trained its adapter against the 4-bit base as dequantised on the fly, so the merge uses
exactly those dequantised weights (the base is loaded as it was trained, then dequantised to a
float type) and never writes the sum back into 4 bits, where rounding would undo much of a
small adapter. The tokenizer saved is the run's own (the chat template it trained with), and the
generation config stops on the token that ends an assistant turn in that template (the one
training ended replies with, data/templates.stop_tokens), then on the EOS ids.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.data.templates import stop_ids
from tunesmith.errors import ModelError
from tunesmith.generation import load_run_base, run_base_path, run_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNMERGEABLE = {"prefix": "prefix tuning", "prompt": "prompt tuning"}  # they add virtual tokens, not weight deltas


def merged_model(run: Path, dtype: torch.dtype = torch.float32):
    """The run's model with its adapter merged in (or its own weights for full fine-tuning)."""
    from tunesmith.models.load import attach_adapter, dequantized, load_model, merge_adapter

    if (run / "model" / "config.json").is_file():
        return load_model(run / "model", dtype=dtype)
    if not (run / "adapter" / "adapter_config.json").is_file():
        raise ModelError(f"{run} holds neither adapter/ nor model/: is it a finished run directory?")
    method = run_config(run).method.name
    if method in UNMERGEABLE:
        raise ModelError(f"{run}: {UNMERGEABLE[method]} adds virtual tokens rather than weight changes, "
                         "so it cannot be merged into the base; export it with --format adapter")
    base, _ = load_run_base(run, dtype)
    if getattr(base, "is_loaded_in_4bit", False):
        base = dequantized(base, dtype)
    return merge_adapter(attach_adapter(base, run / "adapter"))


def merge_run(run: Path, out: Path, dtype: str = "float32") -> Path:
    """Save the merged model, the run's tokenizer and a generation config into `out` (which the
    caller stages; see export/__init__.py)."""
    from transformers import GenerationConfig

    from tunesmith.models.load import load_tokenizer

    if dtype not in DTYPES:
        raise ModelError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    model = merged_model(run, DTYPES[dtype])
    tokenizer = load_tokenizer(run / "tokenizer")
    try:
        base_gen = GenerationConfig.from_pretrained(run_base_path(run))
    except (OSError, ModelError):
        base_gen = None
    gen = base_gen or GenerationConfig()
    gen.eos_token_id = stop_ids(tokenizer, base_gen)  # end of turn first, then EOS, then the base's
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else gen.bos_token_id
    model.config.eos_token_id = gen.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = True
    model.generation_config = gen
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
