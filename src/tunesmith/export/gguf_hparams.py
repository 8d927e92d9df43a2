"""The hyperparameter half of a GGUF: what llama.cpp reads to build each family's graph (sizes,
RoPE, sliding windows, soft-capping), written as convert_hf_to_gguf.py (MIT) writes it. What
differs between architectures comes from the family table (models/families.py); the values come
from config.json. A setting llama.cpp would read differently from transformers is refused with a
ModelError; one llama.cpp ignores on purpose (a window it does not slide) becomes a note.

Deliberate differences from the reference converter, all values llama.cpp would otherwise
default to or get wrong:
- rope.freq_base, rope.dimension_count and vocab_size are written for every family (the
  converter leaves some out where llama.cpp's default is the same value);
- {arch}.attention.sliding_window_pattern lists which layers slide, from config.layer_types, for
  families whose llama.cpp architecture reads it (Gemma 2 / 3). Without it llama.cpp assumes
  Gemma 3's 5-local-1-global pattern, which is wrong for a config that says otherwise.
"""
from __future__ import annotations

import math

import numpy as np

from tunesmith.errors import ModelError

ROPE_TYPES = ("default", "linear", "llama3", "longrope")
SOFTCAP_KEYS = ("attn_logit_softcapping", "final_logit_softcapping")


def _gguf():
    import gguf

    return gguf


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def rope(cfg: dict) -> tuple[dict, dict | None]:
    """(global RoPE parameters, local ones for sliding layers or None). transformers >= 5 writes
    rope_parameters, per layer type where the two differ (Gemma 3); older configs rope_theta +
    rope_scaling (+ rope_local_base_freq)."""
    params = cfg.get("rope_parameters") or {"rope_theta": cfg.get("rope_theta", 10000.0),
                                            **(cfg.get("rope_scaling") or {})}
    local = None
    if "full_attention" in params:
        params, local = params["full_attention"], params.get("sliding_attention")
    elif cfg.get("rope_local_base_freq") is not None:
        local = {"rope_theta": cfg["rope_local_base_freq"]}
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "su":
        kind = "longrope"
    if kind not in ROPE_TYPES:
        raise ModelError(f"config.json: RoPE scaling '{kind}' is not supported by this GGUF exporter "
                         f"(supported: {', '.join(ROPE_TYPES)})")
    if local and (local.get("rope_type") or "default") != "default":
        raise ModelError(f"config.json: RoPE scaling '{local['rope_type']}' on sliding layers is not supported by this "
                         "GGUF exporter (llama.cpp reads only a local base frequency for them)")
    return params | {"rope_type": kind}, local


def llama3_rope_factors(cfg: dict) -> np.ndarray | None:
    """Llama-3.1-style RoPE: per-frequency divisors llama.cpp reads from a rope_freqs tensor, in
    float32 as transformers' _compute_llama3_parameters and convert_hf_to_gguf.py compute them."""
    import torch

    params, _ = rope(cfg)
    if params["rope_type"] != "llama3":
        return None
    dim = head_dim(cfg)
    freqs = 1.0 / (float(params["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low = params.get("factor", 8.0), params.get("low_freq_factor", 1.0)
    high = params.get("high_freq_factor", 4.0)
    old_ctx = params.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen < old_ctx / high, 1.0, torch.where(wavelen > old_ctx / low, factor, mid))
    return out.to(torch.float32).numpy()


def _original_context(cfg: dict, params: dict) -> int | None:
    return params.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")


def longrope_factors(cfg: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """Phi-3's LongRoPE: the long and short per-frequency factors llama.cpp reads as tensors."""
    params, _ = rope(cfg)
    if params["rope_type"] != "longrope":
        return None
    long, short = params.get("long_factor"), params.get("short_factor")
    half = int(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) * head_dim(cfg)) // 2
    if not long or not short or len(long) != half or len(short) != half:
        raise ModelError(f"config.json: LongRoPE needs long_factor and short_factor of {half} values each")
    return np.asarray(long, dtype=np.float32), np.asarray(short, dtype=np.float32)


def _add_rope(w, cfg: dict, notes: list[str]) -> None:
    gguf = _gguf()
    params, local = rope(cfg)
    w.add_rope_freq_base(float(params["rope_theta"]))
    if local is not None:
        w.add_rope_freq_base_swa(float(local["rope_theta"]))
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    w.add_rope_dimension_count(int(partial * head_dim(cfg)))
    if params["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(params["factor"]))
    orig = _original_context(cfg, params)
    if orig is not None and (params["rope_type"] == "longrope" or "original_max_position_embeddings" in cfg):
        # Phi-3 keeps it beside max_position_embeddings; llama.cpp picks long or short factors by it
        w.add_rope_scaling_orig_ctx_len(int(orig))
    if params["rope_type"] == "longrope":
        if not orig:
            raise ModelError("config.json: LongRoPE needs original_max_position_embeddings (the context its short "
                             "factors are for); none was found")
        scale = cfg["max_position_embeddings"] / orig
        attn = params.get("attention_factor") or (math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0)
        w.add_rope_scaling_attn_factors(float(attn))
        notes.append(f"LongRoPE: llama.cpp uses the long factors whenever its context size exceeds {orig} tokens "
                     "(the original context), transformers only once the sequence does; for prompts shorter than "
                     f"that, run llama.cpp with a context of at most {orig} to get transformers' outputs")


def _add_softcaps(w, cfg: dict, family) -> None:
    exported = {family.attn_softcap_key: w.add_attn_logit_softcapping,
                family.final_softcap_key: w.add_final_logit_softcapping}
    for key in SOFTCAP_KEYS:
        value = cfg.get(key)
        if not value:
            continue
        if key not in exported:
            raise ModelError(f"config.json: {key}={value}, which llama.cpp's '{family.gguf_arch}' architecture does "
                             "not apply; the GGUF would compute different logits, so none was written")
        exported[key](float(value))


def sliding_layers(cfg: dict) -> list[bool] | None:
    types = cfg.get("layer_types")
    return None if types is None else [t == "sliding_attention" for t in types]


def _add_sliding_window(w, cfg: dict, family, notes: list[str]) -> None:
    window = cfg.get("sliding_window")
    if cfg.get("use_sliding_window") is False:  # Qwen 2 keeps a window it does not use
        window = None
    mode = family.gguf_sliding_window
    if mode == "per_layer":
        if not window:  # no layer slides in transformers; llama.cpp's Gemma 2 would slide half at 4096
            w.add_sliding_window_pattern([False] * cfg["num_hidden_layers"])
            return
        w.add_sliding_window(int(window))
        layers = sliding_layers(cfg)
        pattern = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern")
        if layers is not None:
            w.add_sliding_window_pattern(layers)
        elif pattern:  # older configs: every pattern-th layer attends globally, as llama.cpp counts
            w.add_sliding_window_pattern(int(pattern))
        return
    if mode == "ignored":  # the converter writes it (0: none) although llama.cpp does not slide it
        w.add_sliding_window(int(window or 0))
    elif mode != "none":
        raise ModelError(f"models/families.py: {family.name}.gguf_sliding_window={mode!r} is not one of none, ignored, "
                         "per_layer")
    if window and window < cfg["max_position_embeddings"]:
        notes.append(f"config.json: sliding_window={window}, but llama.cpp's '{family.gguf_arch}' architecture "
                     f"attends to the whole context: outputs past {window} tokens can differ from transformers'")


def _check_query_scale(cfg: dict, family) -> None:
    """llama.cpp scales Gemma's attention by 1/sqrt(head_dim), or by 1/sqrt(hidden_size / heads) for
    the layer counts it knows as 27B; a config with another query_pre_attn_scalar cannot be written."""
    if not family.query_scale_key or cfg.get(family.query_scale_key) is None:
        return
    hidden_layers = cfg["num_hidden_layers"] in family.query_scale_hidden_layers
    used = cfg["hidden_size"] // cfg["num_attention_heads"] if hidden_layers else head_dim(cfg)
    if cfg[family.query_scale_key] != used:
        raise ModelError(f"config.json: {family.query_scale_key}={cfg[family.query_scale_key]}, but llama.cpp scales "
                         f"'{family.gguf_arch}' attention by 1/sqrt({used}) for a model of {cfg['num_hidden_layers']} "
                         "layers; the GGUF would compute different logits, so none was written")


def add_hparams(w, cfg: dict, family, file_type: int) -> list[str]:
    """Write the model's hyperparameters; returns notes for the user."""
    gguf = _gguf()
    notes: list[str] = []
    _check_query_scale(cfg, family)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    if cfg.get("head_dim"):  # as the converter: only when the config names it
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    _add_rope(w, cfg, notes)
    _add_softcaps(w, cfg, family)
    _add_sliding_window(w, cfg, family, notes)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return notes
