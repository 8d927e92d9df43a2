"""One table of the model families tunesmith knows, keyed by transformers' config.model_type.

Everything that differs between architectures lives here and nowhere else (DESIGN.md: no
`if model_type == ...` in recipes, export or serve): what `target_modules: all-linear` resolves
to, how the GGUF exporter names tensors and writes hyperparameters, whether the chat template
has a system role, the Ollama TEMPLATE, and the hub models tested per family.

`system_role` records what the hub template does with a system message; tunesmith itself finds
that out by rendering (data/templates.system_support) and, where the template refuses or drops
it ('none'), merges it into the first user message as Gemma 3's template does ('merged'):
tests/test_family_templates.py checks that the two agree.

A model of an unlisted architecture still trains through transformers and PEFT (`family_of`
returns None); exports and checks that need the table refuse it by name.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class HubModel:
    alias: str      # what `model.name` accepts
    repo: str       # the Hugging Face hub id it resolves to
    note: str = ""  # gated, size, ...


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]           # transformers config.model_type values
    description: str
    linear_modules: tuple[str, ...]        # what all-linear resolves to (every projection of a block)
    gguf_arch: str                         # llama.cpp architecture name (gguf.MODEL_ARCH_NAMES value)
    rope_permute: bool = False             # llama.cpp's 'llama' arch wants q/k rows interleaved per head
    norm_offset: float = 0.0               # added to RMSNorm weights in GGUF (Gemma stores w - 1)
    final_softcap_key: str | None = None   # config key of the final logit soft-capping, when it has one
    system_role: str = "native"            # native | merged (into the first user turn) | none
    hub: tuple[HubModel, ...] = field(default_factory=tuple)
    # IA3 (`target_modules: all-linear`): rescale keys, values and the feed-forward activations
    # (the IA3 paper's choice; Phi-3's fused qkv_proj rescales its queries too); feed-forward
    # modules get the scale on their input
    ia3_modules: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
    feedforward_modules: tuple[str, ...] = ("down_proj",)
    # --- GGUF export (export/gguf*.py), as llama.cpp's convert_hf_to_gguf.py writes each architecture
    architectures: tuple[str, ...] = ()    # config.json architectures exported as this family's causal LM
    attn_softcap_key: str | None = None    # config key of the attention-logit soft-capping, when it has one
    # sliding window in llama.cpp's architecture: "none" (it has none: nothing written), "ignored" (the
    # converter writes the window but llama.cpp attends to the whole context), "per_layer" (the window
    # and which layers slide, from config.layer_types)
    gguf_sliding_window: str = "none"
    query_scale_key: str | None = None     # config key of the attention scale's denominator (Gemma)
    # layer counts for which llama.cpp scales attention by hidden_size / heads instead of head_dim
    # (it recognises Gemma's 27B by its layer count)
    query_scale_hidden_layers: tuple[int, ...] = ()


_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")

FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama", ("llama",), "Llama 3 / 3.1 / 3.2 (and Llama 2, SmolLM)", _ATTN + _MLP, "llama",
           rope_permute=True, architectures=("LlamaForCausalLM",),
           hub=(HubModel("llama-3.2-1b-instruct", "meta-llama/Llama-3.2-1B-Instruct", "gated"),
                HubModel("llama-3.2-3b-instruct", "meta-llama/Llama-3.2-3B-Instruct", "gated"),
                HubModel("llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct", "gated"))),
    Family("qwen2", ("qwen2",), "Qwen 2 / 2.5 (biases on q, k, v)", _ATTN + _MLP, "qwen2",
           architectures=("Qwen2ForCausalLM",),
           hub=(HubModel("qwen2.5-0.5b-instruct", "Qwen/Qwen2.5-0.5B-Instruct"),
                HubModel("qwen2.5-1.5b-instruct", "Qwen/Qwen2.5-1.5B-Instruct"),
                HubModel("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct"))),
    Family("qwen3", ("qwen3",), "Qwen 3 dense (q/k norms)", _ATTN + _MLP, "qwen3",
           architectures=("Qwen3ForCausalLM",),
           hub=(HubModel("qwen3-0.6b", "Qwen/Qwen3-0.6B"), HubModel("qwen3-1.7b", "Qwen/Qwen3-1.7B"),
                HubModel("qwen3-8b", "Qwen/Qwen3-8B"))),
    Family("mistral", ("mistral",), "Mistral 7B (Llama 2 SentencePiece vocabulary)", _ATTN + _MLP, "llama",
           rope_permute=True, system_role="none", architectures=("MistralForCausalLM",),
           hub=(HubModel("mistral-7b-instruct", "mistralai/Mistral-7B-Instruct-v0.2", "gated"),)),
    Family("gemma2", ("gemma2",), "Gemma 2 (soft-capping, sliding windows)", _ATTN + _MLP, "gemma2",
           norm_offset=1.0, final_softcap_key="final_logit_softcapping", system_role="none",
           architectures=("Gemma2ForCausalLM",), attn_softcap_key="attn_logit_softcapping",
           gguf_sliding_window="per_layer", query_scale_key="query_pre_attn_scalar", query_scale_hidden_layers=(46,),
           hub=(HubModel("gemma-2-2b-it", "google/gemma-2-2b-it", "gated"),
                HubModel("gemma-2-9b-it", "google/gemma-2-9b-it", "gated"))),
    Family("gemma3", ("gemma3_text",), "Gemma 3 text (sliding windows, q/k norms)", _ATTN + _MLP, "gemma3",
           norm_offset=1.0, final_softcap_key="final_logit_softcapping", system_role="merged",
           architectures=("Gemma3ForCausalLM",), gguf_sliding_window="per_layer",
           query_scale_key="query_pre_attn_scalar", query_scale_hidden_layers=(62,),
           hub=(HubModel("gemma-3-270m-it", "google/gemma-3-270m-it", "gated"),
                HubModel("gemma-3-1b-it", "google/gemma-3-1b-it", "gated"))),
    Family("phi3", ("phi3",), "Phi-3 / Phi-3.5 mini (fused qkv and gate_up)",
           ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), "phi3", ia3_modules=("qkv_proj", "down_proj"),
           architectures=("Phi3ForCausalLM",), gguf_sliding_window="ignored",
           hub=(HubModel("phi-3-mini", "microsoft/Phi-3-mini-4k-instruct"),
                HubModel("phi-3.5-mini", "microsoft/Phi-3.5-mini-instruct"))),
]}

_BY_TYPE = {t: f for f in FAMILIES.values() for t in f.model_types}
HUB_ALIASES: dict[str, HubModel] = {h.alias: h for f in FAMILIES.values() for h in f.hub}


def family_of(config) -> Family | None:
    """The family of a transformers config (or a config.json dict); None for an unlisted one."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return _BY_TYPE.get(model_type)


# What an unlisted architecture's forward does to the head's output, under transformers' config
# names (Cohere multiplies by logit_scale, Granite divides by logits_scaling, Gemma-likes soft-cap).
_UNLISTED_SOFTCAP_KEY = "final_logit_softcapping"
_UNLISTED_SCALES = (("logit_scale", False), ("logits_scaling", True))  # (key, divides)


def logit_transform(config) -> tuple[float, float | None]:
    """(scale, soft-cap) that the model's own forward applies to `lm_head(hidden)`:
    logits = cap * tanh(scale * raw / cap) with a cap, else scale * raw. models/load.OutputHead
    applies it wherever tunesmith projects hidden states itself."""
    family = family_of(config)
    get = (lambda key: config.get(key)) if isinstance(config, dict) else (lambda key: getattr(config, key, None))
    if family is not None:
        cap = get(family.final_softcap_key) if family.final_softcap_key else None
        return 1.0, (float(cap) if cap else None)
    scale = 1.0
    for key, divides in _UNLISTED_SCALES:
        value = get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value:
            scale = scale / value if divides else scale * value
    cap = get(_UNLISTED_SOFTCAP_KEY)
    return scale, (float(cap) if cap else None)


def sliding_window(config) -> int | None:
    """The attention window of a model's sliding-window layers, None when it has none. transformers
    names it sliding_window everywhere; layer_types, where a config has them, say whether any layer
    uses it (Qwen2 keeps a window size in its config with use_sliding_window off)."""
    get = (lambda key: config.get(key)) if isinstance(config, dict) else (lambda key: getattr(config, key, None))
    window, types = get("sliding_window"), get("layer_types")
    if not window or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


def supported_model_types() -> list[str]:
    return sorted(_BY_TYPE)
